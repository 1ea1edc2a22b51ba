"""Ground truth by LLaMA-Factory: training YAMLs for experts and mixtures, local runs or a SLURM array, registration.

LLaMA-Factory 0.9.5 pins transformers<=5.6, peft<=0.18.1 and datasets<=4.0, so it never shares dmo's environment:
dmo writes its YAML files and runs ``llamafactory-cli train`` (``--lf-bin``) from LLaMA-Factory's own venv
(``scripts/install_llamafactory.sh``). Every YAML is checked first by LLaMA-Factory's own parser, in that venv:
``get_train_args`` (unknown keys, inconsistent values), the template name against ``TEMPLATES`` and the datasets
against ``get_dataset_list`` (which ``get_train_args`` does not check).

A *run folder* (``--out``) holds everything about one set of trainings::

    plan.json                          base, template, method, budget, and one entry per run
    configs/<run>.yaml                 the LLaMA-Factory training config of each run
    logs/<run>.log                     its output
    .partial/<run>/                    LLaMA-Factory's output_dir while training (checkpoints make it resumable)
    experts/<domain>/                  a finished expert (moved here only once complete)
    mixtures/<mixture id>/seed<N>/     a finished model trained on an exact mixture
    mixtures-interleave/<id>/seed<N>/  the same, trained with LLaMA-Factory's interleave_under mixing
    train_<what>.sbatch, slurm/        with --slurm: the array script and its job list

A finished run is registered: experts into the expert manifest(s) (``experts/<name>.yaml``), trained mixtures into
that manifest's ``trained:`` list (``experts/<name>-interleave.yaml`` for interleave-mixed ones: the two strategies
are two different ground truths sharing the experts). Their scores enter the results table as ``trained`` rows once
scored (``dmo study``, or ``dmo ingest`` for lmms-eval runs made elsewhere).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dmo.atomic import atomic_file, explain_os_error, file_lock, write_text
from dmo.errors import DmoError
from dmo.groundtruth.data_mix import (
    SHAREGPT_ENTRY,
    DataFolder,
    MixRecord,
    prepare,
    source_pools,
    source_val_pools,
    val_name,
)
from dmo.mixture import Mixture
from dmo.paths import safe_name
from dmo.presets import PAPER_BUDGET

Method = Literal["lora", "full"]

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
#: ``eval_on_each_dataset`` is dmo's own: one loss per domain (``eval_<domain>-val_loss``) rather than one over the pooled domains.
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
#: Templates dmo knows to fit a model family (LLaMA-Factory has many more; any of its names is accepted).
KNOWN_TEMPLATES = {"qwen2_vl": "Qwen2-VL and Qwen2.5-VL", "intern_vl": "InternVL3/3.5 (the -HF checkpoints)"}
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
    method: Method = "lora"
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


# ------------------------------------------------------------------------------------------------ runs and plans


@dataclass
class Run:
    """One training: an expert (one domain) or a model trained on a mixture, with one seed."""

    name: str
    kind: Literal["expert", "trained"]
    mixture: str  # canonical mixture id (an expert's is ``<domain>-1``)
    weights: dict[str, float]
    seed: int
    strategy: str
    data: dict[str, Any]  # the LLaMA-Factory dataset keys (dataset, mix_strategy, interleave_probs)
    output: str  # relative to the run folder
    manifest: str  # absolute path of the manifest it is registered in
    domain: str | None = None

    @property
    def config(self) -> str:
        return f"configs/{self.name}.yaml"

    @property
    def partial(self) -> str:
        return f".partial/{self.name}"

    @property
    def log(self) -> str:
        return f"logs/{self.name}.log"


def expert_run(domain: str, record: MixRecord, manifest: Path, seed: int) -> Run:
    return Run(
        name=f"expert-{domain}",
        kind="expert",
        mixture=record.mixture,
        weights=record.weights,
        seed=seed,
        strategy="exact",
        data=dict(record.llamafactory),
        output=f"experts/{domain}",
        manifest=str(manifest),
        domain=domain,
    )


def mixture_run(record: MixRecord, manifest: Path, seed: int) -> Run:
    suffix = "" if record.strategy == "exact" else f"-{record.strategy}"
    name = f"{record.mixture}{suffix}.seed{seed}"
    return Run(
        name=safe_name(name, "run name"),
        kind="trained",
        mixture=record.mixture,
        weights=record.weights,
        seed=seed,
        strategy=record.strategy,
        data=dict(record.llamafactory),
        output=f"mixtures{suffix}/{record.mixture}/seed{seed}",
        manifest=str(manifest),
    )


class RunFolder:
    """A run folder (see the module docstring); ``plan.json`` is read-modify-written under a lock."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        with file_lock(self.root / ".dmo-train.lock"):
            yield

    def plan(self) -> dict[str, Any]:
        path = self.root / PLAN
        if not path.is_file():
            raise DmoError(
                f"{self.root} is not a dmo run folder (no {PLAN}): plan runs with 'dmo train experts|mixtures'"
            )
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DmoError(f"corrupt {path}: {exc}") from None

    def runs(self) -> dict[str, Run]:
        return {name: Run(**r) for name, r in self.plan().get("runs", {}).items()}

    def recipe_header(self) -> dict[str, Any]:
        return self.plan()["recipe"]

    def check_compatible(self, recipe: Recipe) -> None:
        if not (self.root / PLAN).is_file():
            return
        old = self.recipe_header()
        new = recipe.header()
        diff = [k for k in new if old.get(k) != new[k]]
        if diff:
            k = diff[0]
            raise DmoError(
                f"run folder {self.root} was planned with {k} {old.get(k)!r}, not {new[k]!r}: use another --out "
                "(experts and mixtures compared with each other must share one recipe)"
            )

    def add(self, recipe: Recipe, runs: Sequence[Run], configs: Mapping[str, dict[str, Any]], name: str) -> None:
        """Write the runs' configs, then merge them into plan.json (the plan last: it is what marks them planned)."""
        for run in runs:
            write_text(self.root / run.config, yaml.safe_dump(configs[run.name], sort_keys=False))
        plan = self.plan() if (self.root / PLAN).is_file() else {"version": 1, "recipe": recipe.header(), "runs": {}}
        plan["name"] = name
        for run in runs:
            plan["runs"][run.name] = asdict(run)
        write_text(self.root / PLAN, json.dumps(plan, indent=2) + "\n")

    def finished(self, run: Run) -> bool:
        return is_complete(self.root / run.output, self.recipe_header()["method"])

    def config_of(self, run: Run) -> dict[str, Any]:
        return yaml.safe_load((self.root / run.config).read_text())


def is_complete(folder: Path, method: str) -> bool:
    if method == "lora":
        return all((folder / f).is_file() for f in LORA_FILES)
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


# ------------------------------------------------------------------------------------------------ validation

_VALIDATOR = r"""
import json, os, sys
payload = json.load(sys.stdin)
configs, dataset_info = payload["configs"], payload.get("dataset_info")
results = {}
try:
    import torch
    from llamafactory.data.parser import get_dataset_list
    from llamafactory.data.template import TEMPLATES
    from llamafactory.hparams import get_train_args
except BaseException as exc:  # the environment itself is broken
    print("@@DMO@@" + json.dumps({"*": f"cannot import LLaMA-Factory: {type(exc).__name__}: {exc}"}), flush=True)
    sys.exit(0)
for name, cfg in configs.items():
    try:
        template = cfg.get("template")
        if template not in TEMPLATES:
            import difflib
            close = difflib.get_close_matches(str(template), list(TEMPLATES), n=4, cutoff=0.5) or sorted(TEMPLATES)[:6]
            raise ValueError(f"unknown template {template!r}: did you mean {' or '.join(close)}?")
        names = [d.strip() for d in str(cfg.get("dataset", "")).split(",") if d.strip()]
        names += [d.strip() for d in str(cfg.get("eval_dataset") or "").split(",") if d.strip()]
        # dataset_info: what dataset_info.json will hold once dmo has written the mixtures these configs train on
        get_dataset_list(names, dataset_info if dataset_info is not None else cfg.get("dataset_dir", "data"))
        check = dict(cfg)
        if not torch.cuda.is_available() and (check.get("bf16") or check.get("fp16")):
            # No GPU where dmo runs (a login node): mixed precision is checked by LLaMA-Factory when it trains.
            check.update(bf16=False, fp16=False, use_cpu=True)
        get_train_args(check)
        results[name] = None
    except BaseException as exc:
        results[name] = f"{type(exc).__name__}: {exc}"
print("@@DMO@@" + json.dumps(results), flush=True)
"""


def lf_python(lf_bin: Path) -> Path:
    """The Python interpreter of the venv that ``llamafactory-cli`` belongs to (its shebang, else its sibling)."""
    lf_bin = Path(lf_bin)
    try:
        first = lf_bin.read_bytes()[:512].split(b"\n", 1)[0].decode()
    except OSError:
        first = ""
    if first.startswith("#!"):
        cand = Path(shlex.split(first[2:].strip())[0])
        if cand.name != "env" and cand.exists():
            return cand
    sibling = lf_bin.parent / "python"
    if sibling.exists():
        return sibling
    raise DmoError(f"cannot find the Python of {lf_bin}: pass the llamafactory-cli of a venv (--lf-bin)")


def check_lf_bin(lf_bin: Path | None) -> Path:
    path = Path(lf_bin) if lf_bin is not None else DEFAULT_LF_BIN
    if not path.is_file() or not os.access(path, os.X_OK):
        hint = (
            "fix --lf-bin"
            if lf_bin is not None
            else ("run 'bash scripts/install_llamafactory.sh' (it makes .venv-lf) or pass --lf-bin")
        )
        raise DmoError(f"LLaMA-Factory not found: {path} is not an executable llamafactory-cli; {hint}")
    return path.absolute()


def validate(
    configs: Mapping[str, dict[str, Any]],
    lf_bin: Path,
    dataset_info: Mapping[str, Any] | None = None,
    timeout: float = 900,
) -> None:
    """Check every config with LLaMA-Factory's own parser, in its venv; raise on the first bad one.

    ``dataset_info`` stands in for the configs' ``dataset_info.json`` (the datasets they name may not be written yet).
    """
    if not configs:
        return
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "DISABLE_VERSION_CHECK": "1", "LLAMAFACTORY_VERBOSITY": "WARN"}
    try:
        proc = subprocess.run(
            [str(lf_python(lf_bin)), "-c", _VALIDATOR],
            input=json.dumps({"configs": dict(configs), "dataset_info": dataset_info}),
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise DmoError(
            f"LLaMA-Factory's config check did not finish in {timeout:.0f} s: is {lf_bin} working?"
        ) from None
    except OSError as exc:
        raise DmoError(f"cannot run LLaMA-Factory's Python for {lf_bin}: {exc.strerror or exc}") from None
    marked = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@DMO@@")]
    if not marked:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise DmoError(f"LLaMA-Factory's config check failed (exit {proc.returncode}): {tail}")
    results = json.loads(marked[-1][len("@@DMO@@") :])
    if results.get("*"):
        raise DmoError(f"{lf_bin}: {results['*']}; reinstall with 'bash scripts/install_llamafactory.sh'")
    for name, error in results.items():
        if error:
            raise DmoError(f"LLaMA-Factory refuses the config of run {name}: {error}")


# ------------------------------------------------------------------------------------------------ planning


@dataclass
class Planned:
    folder: RunFolder
    runs: list[Run]
    notes: list[str]
    validated: bool


def default_manifest(name: str, strategy: str = "exact") -> Path:
    return Path("experts") / (f"{name}.yaml" if strategy == "exact" else f"{name}-{strategy}.yaml")


def plan_runs(
    kind: Literal["experts", "mixtures"],
    recipe: Recipe,
    *,
    data: Path,
    out: Path,
    domains: Sequence[str] = (),
    mixtures: Sequence[Mixture] = (),
    seeds: Sequence[int] = (0,),
    strategy: str = "exact",
    data_seed: int = 0,
    allow_repeats: bool = False,
    manifest: Path | None = None,
    name: str | None = None,
    lf_bin: Path | None = None,
) -> Planned:
    """Write the training sets (where missing), the configs and the plan of expert or mixture runs.

    ``data`` is a dmo data folder (``dmo data mix``), whose new mixtures are added to it, or per-domain source data,
    converted into ``<out>/data``. Everything is read and checked first, the configs by LLaMA-Factory's parser when
    ``lf_bin`` exists here, so a refusal writes nothing.
    """
    folder = RunFolder(out)
    name = safe_name(name or folder.root.name, "manifest name")
    folder.check_compatible(recipe)
    if not seeds or len(set(seeds)) != len(seeds):
        raise DmoError(f"give one or more distinct seeds, got {list(seeds)}")
    if kind == "experts":
        if not domains:
            raise DmoError("no domains given: pass --domains general,ocr")
        if len(seeds) != 1:
            raise DmoError("experts are trained with one seed: pass a single --seeds value")
        targets = [Mixture((d,), (1.0,)) for d in domains]
        strategy = "exact"  # an expert trains on `budget` rows of its domain, drawn like an exact mixture's
    else:
        if not mixtures:
            raise DmoError("no mixtures given: pass --mixture general=0.25,ocr=0.75 (repeatable) or a search space")
        targets = list(mixtures)
    needed = sorted({d for m in targets for d, n in m.counts(recipe.budget).items() if n > 0})
    if not needed:
        raise DmoError(f"every mixture rounds to 0 samples at budget {recipe.budget}: raise --budget")
    manifest = Path(manifest if manifest is not None else default_manifest(name, strategy)).absolute()

    # Read and check everything first.
    given = DataFolder(data)
    val_pools = None
    if given.is_dmo():
        data_folder, pools, sizes = given, None, given.pool_sizes(needed)
        with_val = set(given.val_domains())
    else:
        data_folder = DataFolder(folder.root / "data")
        pools, sizes = source_pools(Path(data), needed, None)
        val_pools = source_val_pools(Path(data), needed, None)
        with_val = set(val_pools) | set(data_folder.val_domains())
    plans = [
        data_folder.plan_mix(m, recipe.budget, sizes, seed=data_seed, strategy=strategy, allow_repeats=allow_repeats)
        for m in targets
    ]
    runs: list[Run] = []
    for m, (record, _) in zip(targets, plans):
        for seed in seeds:
            if kind == "experts":
                runs.append(expert_run(m.domains[0], record, manifest, seed))
            else:
                runs.append(mixture_run(record, manifest, seed))
    notes = _wire_validation(runs, plans, with_val)
    configs = {
        r.name: recipe.config(
            dataset_dir=data_folder.root, data=r.data, output_dir=folder.root / r.partial, seed=r.seed, run=r.name
        )
        for r in runs
    }
    validated = False
    if lf_bin is not None and Path(lf_bin).is_file():
        info = data_folder.info()
        info.update({d: {"file_name": f"domains/{d}.jsonl", **SHAREGPT_ENTRY} for d in needed})
        info.update({val_name(d): {"file_name": f"validation/{d}.jsonl", **SHAREGPT_ENTRY} for d in with_val})
        for record, picked in plans:
            if picked is not None:
                info[record.name] = {"file_name": f"mixtures/{record.name}.jsonl", **SHAREGPT_ENTRY}
        validate(configs, Path(lf_bin), dataset_info=info)
        validated = True

    # Then write: the pools and mixtures, the configs, the plan.
    if pools is not None:
        prepare(Path(data), data_folder.root, needed, pools=pools, val_pools=val_pools)
    with data_folder.locked():
        for record, picked in plans:
            data_folder.write_mix(record, picked)
    with folder.locked():
        folder.add(recipe, runs, configs, name)
    notes = [n for record, _ in plans for n in record.notes()] + notes
    return Planned(folder, runs, notes, validated)


def _wire_validation(runs: Sequence[Run], plans: Sequence[tuple[MixRecord, Any]], with_val: set[str]) -> list[str]:
    """Give each run whose domains all have a validation split LLaMA-Factory's ``eval_dataset``; say who has none."""
    counts = {record.mixture: record.counts for record, _ in plans}
    notes: list[str] = []
    lacking: set[str] = set()
    for run in runs:
        domains = sorted(d for d, n in counts[run.mixture].items() if n > 0)
        if all(d in with_val for d in domains):
            run.data["eval_dataset"] = ",".join(val_name(d) for d in domains)
        else:
            lacking |= {d for d in domains if d not in with_val}
    if lacking:
        which = ", ".join(sorted(lacking))
        notes.append(
            f"no validation split for domain(s) {which}: runs on them train without LLaMA-Factory's evaluation "
            "(add <domain>/val.jsonl beside the training data to evaluate as the paper does)"
        )
    return notes


# ------------------------------------------------------------------------------------------------ running


@dataclass
class RunResult:
    run: Run
    seconds: float
    skipped: bool = False  # already finished


def train_runs(
    folder: RunFolder,
    lf_bin: Path,
    *,
    only: Sequence[str] | None = None,
    overwrite: bool = False,
    validate_first: bool = True,
    echo: Callable[[str], None] = print,
) -> list[RunResult]:
    """Train the planned runs (``only`` these names) one after another with ``llamafactory-cli train``.

    A finished run is skipped unless ``overwrite``; a run killed half-way resumes from its last checkpoint. Each
    finished run is moved from ``.partial/`` into place and registered at once, so a later failure loses nothing.
    """
    lf_bin = check_lf_bin(lf_bin)
    runs = folder.runs()
    if only:
        unknown = [n for n in only if n not in runs]
        if unknown:
            raise DmoError(f"run {unknown[0]!r} is not planned in {folder.root}: planned are {sorted(runs)}")
        runs = {n: runs[n] for n in only}
    todo = [r for r in runs.values() if overwrite or not folder.finished(r)]
    if validate_first and todo:
        validate({r.name: folder.config_of(r) for r in todo}, lf_bin)
    method = folder.recipe_header()["method"]
    results = [RunResult(r, 0.0, skipped=True) for r in runs.values() if r not in todo]
    for i, run in enumerate(todo, 1):
        partial = folder.root / run.partial
        log = folder.root / run.log
        t0 = time.perf_counter()
        if not is_complete(partial, method):
            echo(f"[{i}/{len(todo)}] training {run.name} (log: {log})")
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "w") as fh:
                proc = subprocess.run(
                    [str(lf_bin), "train", str(folder.root / run.config)],
                    cwd=folder.root,
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            if proc.returncode != 0 or not is_complete(partial, method):
                raise DmoError(
                    f"training run {run.name} failed (exit {proc.returncode}): {_last_error(log)}; full log: {log}"
                )
        _finish(partial, folder.root / run.output)
        seconds = time.perf_counter() - t0
        results.append(RunResult(run, seconds))
        echo(f"[{i}/{len(todo)}] {run.name} finished in {seconds:.1f} s -> {folder.root / run.output}")
        register(folder, echo=echo)
    return results


def _last_error(log: Path) -> str:
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    for ln in reversed(lines):
        if "Error" in ln or "error:" in ln.lower():
            return ln[:300]
    return lines[-1][:300] if lines else "no output"


def _finish(partial: Path, output: Path) -> None:
    """Drop the resumption checkpoints and move the finished run into place (atomically)."""
    for ckpt in partial.glob("checkpoint-*"):
        shutil.rmtree(ckpt, ignore_errors=True)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        if output.exists():
            old = output.with_name(f".{output.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(output, old)
            os.replace(partial, output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(partial, output)
    except OSError as exc:
        raise explain_os_error(exc, output) from exc


# ------------------------------------------------------------------------------------------------ registration


def _rel(path: Path, start: Path) -> str:
    """A path relative to ``start`` that a manifest reads as a local path (``./x`` or ``../x``)."""
    rel = os.path.relpath(path, start)
    return rel if rel.startswith(("../", "/")) else f"./{rel}"


def _weights_key(weights: Mapping[str, float]) -> tuple[tuple[str, float], ...]:
    return tuple(sorted((d, round(float(w), 6)) for d, w in weights.items() if round(float(w), 6) > 0))


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with file_lock(path.with_name(f".{path.name}.lock")):
        yield


def register(folder: RunFolder, echo: Callable[[str], None] = print) -> dict[Path, list[str]]:
    """Write every finished run of the folder into its manifest(s); returns {manifest: registered run names}.

    Experts go into every manifest of the folder, trained mixtures into their own. A manifest is written only once
    it has an expert for every domain its trained mixtures use, so that it always loads.
    """
    plan = folder.plan()
    recipe = plan["recipe"]
    runs = folder.runs()
    experts = [r for r in runs.values() if r.kind == "expert" and folder.finished(r)]
    out: dict[Path, list[str]] = {}
    for manifest in sorted({Path(r.manifest) for r in runs.values()}):
        trained = [r for r in runs.values() if r.kind == "trained" and Path(r.manifest) == manifest]
        trained = [r for r in trained if folder.finished(r)]
        if not experts and not trained:
            continue
        names = _update_manifest(manifest, plan.get("name") or folder.root.name, recipe, experts, trained, folder, echo)
        if names:
            out[manifest] = names
    return out


def _update_manifest(
    path: Path,
    name: str,
    recipe: Mapping[str, Any],
    experts: Sequence[Run],
    trained: Sequence[Run],
    folder: RunFolder,
    echo: Callable[[str], None],
) -> list[str]:
    root = path.parent.resolve()
    base = recipe["base"]
    base_text = _rel(Path(base), root) if Path(base).is_absolute() else base
    with _file_lock(path):
        data: dict[str, Any] = {}
        if path.is_file():
            try:
                data = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as exc:
                raise DmoError(f"{path}: not valid YAML ({exc}); fix or remove it before registering runs") from None
            old_base = data.get("base")
            same = old_base == base_text or (
                isinstance(old_base, str) and Path(base).is_absolute() and (root / old_base).resolve() == Path(base)
            )
            if old_base is not None and not same:
                raise DmoError(
                    f"{path} is the manifest of base {old_base!r}, not {base}: pass another --manifest for these runs"
                )
            for key, value in (("kind", recipe["method"]), ("budget", recipe["budget"])):
                if data.get(key) not in (None, value):
                    raise DmoError(
                        f"{path} has {key} {data.get(key)!r}, but these runs have {value!r}: use another --manifest"
                    )
        entries = dict(data.get("experts") or {})
        for r in experts:
            entries[r.domain] = _rel(folder.root / r.output, root)
        held = [r for r in trained if any(d not in entries for d in _weights_key_domains(r.weights))]
        for r in held:
            echo(
                f"{r.name}: not registered in {path} yet: it has no expert for every domain of {r.mixture} "
                "(registered once they are)"
            )
        if not entries:
            return []
        listed = list(data.get("trained") or [])
        index = {(_weights_key(t.get("mixture") or {}), int(t.get("seed", 0))): i for i, t in enumerate(listed)}
        for r in trained:
            if r in held:
                continue
            entry = {
                "mixture": {d: w for d, w in r.weights.items() if w > 0},
                "seed": r.seed,
                "path": _rel(folder.root / r.output, root),
            }
            key = (_weights_key(r.weights), r.seed)
            if key in index:
                listed[index[key]] = entry
            else:
                index[key] = len(listed)
                listed.append(entry)
        new = {
            "name": data.get("name") or name,
            "base": base_text,
            "kind": recipe["method"],
            "budget": recipe["budget"],
            **{k: v for k, v in data.items() if k not in ("name", "base", "kind", "budget", "experts", "trained")},
            "experts": dict(sorted(entries.items())),
            "trained": listed,
        }
        if new != data:
            header = "# Written by 'dmo train': experts and models trained on mixtures (paths relative to this file).\n"
            write_text(path, header + yaml.safe_dump(new, sort_keys=False))
    return [r.name for r in experts] + [r.name for r in trained if r not in held]


def _weights_key_domains(weights: Mapping[str, float]) -> list[str]:
    return [d for d, _ in _weights_key(weights)]


# ------------------------------------------------------------------------------------------------ SLURM


def write_slurm(
    folder: RunFolder,
    runs: Sequence[Run],
    script: Path,
    lf_bin: Path,
    *,
    what: str,
    gpus: int = 1,
    cpus: int = 8,
    time_limit: str = "24:00:00",
    partition: str | None = None,
    account: str | None = None,
    sbatch: Sequence[str] = (),
) -> Path:
    """An array script with one task per run; each task runs ``dmo train run`` (train, move into place, register)."""
    if not runs:
        raise DmoError("no runs to put into a SLURM script")
    jobs = folder.root / "slurm" / f"{script.stem}.jobs"
    write_text(jobs, "".join(f"{r.name}\n" for r in runs))
    name = folder.plan().get("name") or folder.root.name
    directives = [
        f"--job-name=dmo-{name}-{what}",
        f"--array=0-{len(runs) - 1}",
        "--nodes=1",
        "--ntasks=1",
        f"--gres=gpu:{gpus}",
        f"--cpus-per-task={cpus}",
        f"--time={time_limit}",
        f"--output={folder.root / 'logs'}/slurm-%A_%a.out",
    ]
    directives += [f"--partition={partition}"] if partition else []
    directives += [f"--account={account}"] if account else []
    directives += [s if s.startswith("--") else f"--{s}" for s in sbatch]
    q = shlex.quote
    text = (
        "#!/bin/bash\n"
        + "".join(f"#SBATCH {d}\n" for d in directives)
        + f"""
# Written by 'dmo train {what}': one array task per run listed in the job file below. Each task trains its run with
# LLaMA-Factory, moves it into place and registers it in the expert manifest (safe to run concurrently). A task
# killed half-way resumes from its last checkpoint when resubmitted; finished runs are skipped.
#   submit:   sbatch {q(str(script))}
#   one run:  sbatch --array=K {q(str(script))}   (K = line number - 1 in the job file)
set -euo pipefail
RUN_FOLDER={q(str(folder.root))}
JOBS={q(str(jobs))}
DMO_PYTHON=${{DMO_PYTHON:-{q(sys.executable)}}}
LF_BIN=${{DMO_LF_BIN:-{q(str(Path(lf_bin).absolute()))}}}
RUN=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" "$JOBS")
if [ -z "$RUN" ]; then echo "no run at array index $SLURM_ARRAY_TASK_ID in $JOBS" >&2; exit 1; fi
mkdir -p "$RUN_FOLDER/logs"
exec "$DMO_PYTHON" -m dmo.cli train run "$RUN_FOLDER" --run "$RUN" --lf-bin "$LF_BIN"
"""
    )
    with atomic_file(script) as fh:
        fh.write(text)
    os.chmod(script, 0o755)
    return script


def default_slurm_script(what: str, name: str) -> Path:
    return Path("scripts") / "slurm" / f"train_{what}-{name}.sbatch"
