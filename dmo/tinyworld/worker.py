"""What one pool process does: LoRA-train an expert or a mixture, and evaluate models on the test splits.

The builder runs these jobs in ``config.threads`` spawned processes with one torch thread each (independent
small trainings scale better across processes than across threads). A process loads the base model, the
processor, the pixel arrays and the encoded test batches once and keeps them for every job it runs.
Each job writes its outputs atomically, so a killed build resumes from the last finished job.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import time
from pathlib import Path
from typing import Any

from dmo.atomic import atomic_dir, write_text
from dmo.tinyworld.config import WorldConfig

#: The training record saved next to each adapter (adapter folders may hold extra files, like a README).
TRAINING_RECORD = "dmo_training.json"

_STATE: dict[tuple[str, ...], Any] = {}

#: Environment of pool processes. OpenMP's default spin-waiting made a 2-thread training step 3.5x slower than
#: a 1-thread one whenever other processes competed for the two cores; passive waiting removes that cliff.
WORKER_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}


def init_process() -> None:
    """Pool initializer: never reach for a model hub, and keep the worker environment."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    for key, value in WORKER_ENV.items():
        os.environ.setdefault(key, value)


def _setup(threads: int = 1) -> None:
    import warnings

    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(threads)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


def _base(root: Path) -> tuple[Any, Any]:
    key = ("base", str(root))
    if key not in _STATE:
        _setup()
        from dmo.tinyworld.model import load_base

        _STATE[key] = load_base(root)
    return _STATE[key]


def _pool_features(root: Path, domain: str) -> Any:
    """The base's vision-tower output for ``domain``'s whole train pool, once per process: every LoRA run of the
    world takes its images' rows from it (the tower is frozen in them)."""
    key = ("features", str(root), domain)
    if key not in _STATE:
        from dmo.tinyworld.data import load_pixels
        from dmo.tinyworld.train import vision_features

        base, processor = _base(root)
        _STATE[key] = vision_features(base, processor, load_pixels(root, domain, "train"))
    return _STATE[key]


def processor_job(root: str, config_json: str) -> None:
    """Build the processor (tokenizer + image/video processors + chat template) and save it atomically."""
    from dmo.tinyworld.tokenizer import build_processor

    _setup()
    with atomic_dir(Path(root) / "processor") as tmp:
        build_processor(WorldConfig.model_validate_json(config_json)).save_pretrained(str(tmp))


def pretrain_job(root: str, config_json: str, progress_file: str) -> dict:
    """Pre-train the base on ``config.threads`` threads and save ``base/`` (model + processor) atomically.

    Writes the number of finished steps to ``progress_file`` now and then, for the builder's progress bar.
    """
    config = WorldConfig.model_validate_json(config_json)
    _setup(config.threads)
    import torch

    from dmo.tinyworld.model import init_model, n_parameters
    from dmo.tinyworld.tokenizer import image_tokens, load_processor
    from dmo.tinyworld.train import pretrain

    root_p = Path(root)
    processor = load_processor(root_p / "processor")
    model = init_model(config, processor.tokenizer)

    def on_step(step: int, total: int) -> None:
        if step % 8 == 0 or step == total:
            Path(progress_file).write_text(f"{step} {total}")

    try:
        res = pretrain(model, processor, root_p, config, image_tokens(config), on_step=on_step)
    finally:
        torch.set_num_threads(1)
    record = {
        "kind": "base",
        "parameters": n_parameters(model),
        "samples": config.pretrain_samples,
        "steps": res.steps,
        "threads": config.threads,
        "train_seconds": round(res.seconds, 3),
        "first_loss": round(res.first_loss, 6),
        "final_loss": round(res.final_loss, 6),
    }
    with atomic_dir(root_p / "base") as tmp:
        model.save_pretrained(str(tmp))
        processor.save_pretrained(str(tmp))
        (tmp / TRAINING_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


def test_batches(root: Path, config: WorldConfig, processor: Any, domain: str) -> tuple[list, list[str]]:
    """Encoded test split of ``domain`` (cached per process) and its answers."""
    from dmo.tinyworld.data import load_pixels, read_split
    from dmo.tinyworld.generate import encode

    key = ("test", str(root), domain)
    if key not in _STATE:
        rows = read_split(root, domain, "test")
        pixels = load_pixels(root, domain, "test", rows)
        batches = encode(processor, pixels, [r["question"] for r in rows], config.eval_batch)
        _STATE[key] = (batches, [r["answer"] for r in rows])
    return _STATE[key]


def evaluate(model: Any, processor: Any, root: Path, config: WorldConfig) -> dict[str, float]:
    """Exact-match accuracy of ``model`` on every domain's test split."""
    from dmo.tinyworld.generate import accuracy, generate_encoded, with_vision_outputs

    out = {}
    for domain in config.domains:
        batches, answers = test_batches(root, config, processor, domain)
        # the models evaluated here share the base's vision tower: its output is computed once per process
        preds = generate_encoded(model, processor, with_vision_outputs(model, batches), config.max_new_tokens)
        out[domain] = round(accuracy(preds, answers), 6)
    return out


def eval_job(root: str, config_json: str, adapter: str | None, out: str) -> dict:
    """Evaluate the base (``adapter`` None) or base + adapter; write the result to ``out`` (JSON)."""
    root_p, config = Path(root), WorldConfig.model_validate_json(config_json)
    base, processor = _base(root_p)
    start = time.perf_counter()
    model = base
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(copy.deepcopy(base), adapter).merge_and_unload()
    acc = evaluate(model, processor, root_p, config)
    result = {"accuracy": acc, "eval_seconds": round(time.perf_counter() - start, 3)}
    write_text(out, json.dumps(result, indent=2, sort_keys=True) + "\n")
    return result


def lora_job(
    root: str, config_json: str, counts: dict[str, int], seed: int, out_dir: str, eval_out: str | None, meta: dict
) -> dict:
    """Train one LoRA adapter on ``counts`` samples per domain, save it to ``out_dir``, then evaluate it (unless
    ``eval_out`` is None)."""
    from dmo.tinyworld.tokenizer import image_tokens
    from dmo.tinyworld.train import train_lora

    root_p, config = Path(root), WorldConfig.model_validate_json(config_json)
    base, processor = _base(root_p)
    if not Path(out_dir, "adapter_model.safetensors").exists():
        features = functools.partial(_pool_features, root_p)
        model, res = train_lora(
            copy.deepcopy(base), processor, root_p, config, counts, seed, image_tokens(config), features
        )
        record = {
            **meta,
            "counts": counts,
            "seed": seed,
            "steps": res.steps,
            "train_seconds": round(res.seconds, 3),
            "first_loss": round(res.first_loss, 6),
            "final_loss": round(res.final_loss, 6),
        }
        with atomic_dir(out_dir, overwrite=True) as tmp:
            model.save_pretrained(str(tmp))
            (tmp / TRAINING_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        if eval_out is None:
            return record
        model = model.merge_and_unload()
        start = time.perf_counter()
        acc = evaluate(model, processor, root_p, config)
        result = {"accuracy": acc, "eval_seconds": round(time.perf_counter() - start, 3)}
        write_text(eval_out, json.dumps(result, indent=2, sort_keys=True) + "\n")
        return {**record, **result}
    return eval_job(root, config_json, out_dir, eval_out) if eval_out is not None else {}
