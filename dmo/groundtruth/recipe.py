"""The training recipe of a LLaMA-Factory run: the DMO paper's defaults, written down once, where dmo differs from
them and why, and the YAML a run is trained with (see :mod:`dmo.groundtruth.llamafactory` for the runs).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dmo.errors import DmoError
from dmo.manifest import FinetuneKind
from dmo.presets import PAPER_BUDGET

# ------------------------------------------------------------------------------------------------ the defaults
#: The DMO paper's training recipe, the one place it is written down: its LLaMA-Factory config
#: ``training_configs/qwen2_2b_lora.yaml`` (and ``qwen2_2b_full.yaml``), with the values its scripts pass on the
#: command line. The budget is 800 steps x 128 = 102,400 samples per model, experts and mixtures alike; LoRA rank 16
#: on every linear layer of the language model (alpha 32: LLaMA-Factory's default of 2 x rank, which the paper
#: leaves unset); lr 2e-5 with cosine decay and 10% warm-up; bf16; images of at most 518,400 pixels; sequences cut
#: at 4096 tokens; the vision tower frozen and the multi-modal projector (Qwen2-VL's merger) not frozen. With LoRA
#: the projector flag changes nothing in LLaMA-Factory 0.9.4/0.9.5 (``lora_target: all`` never reaches the
#: projector, and LoRA trains adapters only); with ``--method full`` the projector is trained, as in the paper.
#: Where dmo deliberately differs from the paper's config, :data:`PAPER_DIFFERENCES` says which key and why.
PAPER_GLOBAL_BATCH = 128
PAPER_PER_DEVICE_BATCH = 4
PAPER_DEFAULTS: dict[str, Any] = {
    "image_max_pixels": 518_400,
    "stage": "sft",
    "do_train": True,
    "freeze_vision_tower": True,
    "freeze_multi_modal_projector": False,
    "freeze_language_model": False,
    "cutoff_len": 4096,
    "overwrite_cache": True,
    "preprocessing_num_workers": 16,
    "dataloader_num_workers": 4,
    "logging_steps": 10,
    "save_steps": 100,  # checkpoints in .partial/<run> let a killed run resume; removed once it finishes
    "save_total_limit": 1,
    "plot_loss": True,
    "report_to": "none",
    "learning_rate": 2.0e-5,
    "lr_scheduler_type": "cosine",
    "warmup_ratio": 0.1,
    "bf16": True,
    "ddp_timeout": 180000000,
}
LORA_DEFAULTS: dict[str, Any] = {"lora_rank": 16, "lora_alpha": 32, "lora_target": "all", "lora_dropout": 0.0}
#: Evaluation during training, as the paper's configs do it, whenever every domain of a run has a validation split
#: (``dmo.groundtruth.data_mix``: ``<domain>-val``): the loss on it every 1/8 of training (``eval_steps: 0.125``,
#: a fraction of the steps). ``per_device_eval_batch_size`` is the run's per-device training batch.
#: ``eval_on_each_dataset`` is dmo's own: one loss per domain (``eval_<domain>-val_loss``) rather than one over
#: the pooled domains.
EVAL_DEFAULTS: dict[str, Any] = {"eval_strategy": "steps", "eval_steps": 0.125, "eval_on_each_dataset": True}
#: Every key where a config written by dmo deliberately differs from the paper's (qwen2_2b_lora.yaml with the values
#: its train scripts pass), and why. tests/test_llamafactory.py compares the two key by key and fails on any other
#: difference, so this list is complete.
PAPER_DIFFERENCES: dict[str, str] = {
    "model_name_or_path": "a hub id or a local folder (--base), not the paper's ../checkpoints/base_models/<name>",
    "trust_remote_code": "not set (off): Qwen2-VL and InternVL3.5-HF are built into transformers, so no checkpoint "
    "code needs to run",
    "dataset": "dmo's names: the domain's pool, or the mixture's own set (exact strategy) or the domains' pools "
    "(interleave), where the paper names expert_<domain>-102400 sets",
    "eval_dataset": "<domain>-val for each domain of the run, where the paper names expert_<domain>-102400_eval_small "
    "(the same thing: the first 500 held-out rows of each domain)",
    "output_dir": "the run folder's .partial/<run>, moved into place when finished",
    "run_name": "dmo's run name",
    "save_steps": "100 with save_total_limit 1, only so that a killed run resumes; the checkpoints are deleted when "
    "it finishes (the paper's scripts pass save_steps=100000 or 10000: no intermediate checkpoint)",
    "save_only_model": "not set: resuming needs the optimizer state",
    "overwrite_output_dir": "not set: a planned run resumes from its checkpoint instead of starting over",
    "resume_from_checkpoint": "not set: LLaMA-Factory resumes from the output folder's last checkpoint by itself",
    "report_to": "none instead of wandb (offline): dmo keeps LLaMA-Factory's own logs and loss plot",
    "per_device_train_batch_size": "--per-device-batch (default 4) x --gpus (default 1) x accumulation = the same "
    "global batch of 128; the paper ran 8 x 4 GPUs x 4",
    "gradient_accumulation_steps": "made up so that the global batch is 128 on the GPUs given (see above)",
    "per_device_eval_batch_size": "the per-device training batch (the paper: 8 for Qwen2-VL-2B LoRA)",
    "num_train_epochs": "not set: max_steps (800 = 102,400 / 128) decides the length, as the paper's scripts make it",
    "mix_strategy": "mixtures only: not set by dmo's default --strategy exact, which trains on exactly round(w_i x "
    "budget) rows of each domain; --strategy interleave writes the paper's interleave_under",
    "interleave_probs": "mixtures only: as mix_strategy; with --strategy interleave, the mixture's weights, as the "
    "paper passes them",
}
#: Keys dmo writes that the paper's config does not (all at LLaMA-Factory's default value or equivalent, or dmo's).
DMO_ONLY_KEYS: dict[str, str] = {
    "lora_alpha": "32, LLaMA-Factory's default (2 x lora_rank) that the paper's config leaves unset",
    "lora_dropout": "0.0, LLaMA-Factory's default",
    "dataset_dir": "the dmo data folder",
    "save_total_limit": "1: only the last resumption checkpoint is kept",
    "seed": "the run's training seed (--seeds), LLaMA-Factory's default 42 in the paper",
    "eval_on_each_dataset": "one validation loss per domain instead of one over the pooled domains",
}
#: Keys dmo sets from its own options; ``--set`` may not override them.
_OWNED_KEYS = frozenset(
    {
        "model_name_or_path",
        "template",
        "dataset",
        "dataset_dir",
        "media_dir",
        "output_dir",
        "seed",
        "max_steps",
        "num_train_epochs",
        "finetuning_type",
        "mix_strategy",
        "interleave_probs",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "run_name",
        "overwrite_output_dir",
        "resume_from_checkpoint",
        "eval_dataset",
    }
)
LORA_FILES = ("adapter_config.json", "adapter_model.safetensors")
PLAN = "plan.json"
DEFAULT_LF_BIN = Path(".venv-lf/bin/llamafactory-cli")


@dataclass(frozen=True)
class Recipe:
    """Everything about how a model is trained that is the same for all runs of a run folder."""

    base: str
    template: str
    method: FinetuneKind = "lora"
    budget: int = PAPER_BUDGET
    global_batch: int = PAPER_GLOBAL_BATCH
    per_device_batch: int = PAPER_PER_DEVICE_BATCH
    gpus: int = 1
    overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in ("lora", "full"):
            raise DmoError(f"unknown training method {self.method!r}: choose lora or full")
        for what, v in (
            ("budget", self.budget),
            ("global batch", self.global_batch),
            ("per-device batch", self.per_device_batch),
            ("gpus", self.gpus),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise DmoError(f"{what} must be a positive whole number, got {v!r}")
        if self.global_batch % (self.per_device_batch * self.gpus):
            raise DmoError(
                f"global batch {self.global_batch} is not a multiple of per-device batch {self.per_device_batch} x "
                f"{self.gpus} GPU(s): change --batch, --per-device-batch or --gpus"
            )
        owned = sorted(set(self.overrides) & _OWNED_KEYS)
        if owned:
            raise DmoError(
                f"--set {owned[0]}=... is set by dmo itself: use dmo's options (--base, --template, --budget, "
                "--batch, --per-device-batch, --gpus, --seeds, --strategy) instead"
            )

    @property
    def max_steps(self) -> int:
        return math.ceil(self.budget / self.global_batch)

    @property
    def accumulation(self) -> int:
        return self.global_batch // (self.per_device_batch * self.gpus)

    def config(self, *, dataset_dir: Path, data: Mapping[str, Any], output_dir: Path, seed: int, run: str) -> dict:
        """The LLaMA-Factory YAML of one run (a dict, in the paper's order).

        ``data`` holds the dataset keys (``dataset``, ``mix_strategy``, ``interleave_probs``) and, when the run's
        domains have validation splits, ``eval_dataset``: then evaluation is switched on (:data:`EVAL_DEFAULTS`).
        """
        data = dict(data)
        eval_dataset = data.pop("eval_dataset", None)
        d = PAPER_DEFAULTS
        cfg: dict[str, Any] = {"model_name_or_path": self.base, "image_max_pixels": d["image_max_pixels"]}
        cfg.update({k: d[k] for k in ("stage", "do_train")})
        cfg["finetuning_type"] = self.method
        cfg.update({k: d[k] for k in ("freeze_vision_tower", "freeze_multi_modal_projector", "freeze_language_model")})
        if self.method == "lora":
            cfg.update(LORA_DEFAULTS)
        cfg.update({**data, "template": self.template, "dataset_dir": str(dataset_dir)})
        cfg.update({k: d[k] for k in ("cutoff_len", "overwrite_cache", "preprocessing_num_workers")})
        cfg["dataloader_num_workers"] = d["dataloader_num_workers"]
        cfg["output_dir"] = str(output_dir)
        cfg.update({k: d[k] for k in ("logging_steps", "save_steps", "save_total_limit", "plot_loss", "report_to")})
        cfg["run_name"] = run
        cfg.update(
            {
                "per_device_train_batch_size": self.per_device_batch,
                "gradient_accumulation_steps": self.accumulation,
                **{k: d[k] for k in ("learning_rate", "lr_scheduler_type", "warmup_ratio", "bf16", "ddp_timeout")},
                "max_steps": self.max_steps,
                "seed": int(seed),
            }
        )
        if eval_dataset:
            cfg.update(
                {
                    "eval_dataset": eval_dataset,
                    "per_device_eval_batch_size": self.per_device_batch,
                    "eval_strategy": EVAL_DEFAULTS["eval_strategy"],
                    "eval_steps": EVAL_DEFAULTS["eval_steps"],
                    "eval_on_each_dataset": EVAL_DEFAULTS["eval_on_each_dataset"],
                }
            )
        cfg.update(self.overrides)
        return cfg

    def header(self) -> dict[str, Any]:
        return {"base": self.base, "template": self.template, "method": self.method, "budget": self.budget}


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``--set key=value`` (values read as YAML: ``true``, ``5``, ``1e-4``, ``none``)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise DmoError(f"cannot read --set {item!r}: write --set key=value, e.g. --set use_cpu=true")
        try:
            parsed = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            parsed = value
        if isinstance(parsed, str):  # YAML 1.1 reads 1e-4 as a string; LLaMA-Factory's float fields need a number
            with contextlib.suppress(ValueError):
                parsed = float(parsed) if parsed.strip().lower() not in ("nan", "inf", "-inf", "infinity") else parsed
        out[key] = parsed
    return out
