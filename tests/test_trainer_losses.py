"""`dmo ingest RUN_FOLDER`: LLaMA-Factory's per-domain validation losses of finished runs become ``loss:<domain>`` rows
(score exp(-loss)), read from the files LLaMA-Factory's trainer writes into a run's output folder, in their format
(transformers' ``save_metrics``: ``all_results.json``; ``save_state``: ``trainer_state.json`` with ``log_history``).
The real files of a real LLaMA-Factory run are read in test_llamafactory_integration.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from data_sources import make_sources
from typer.testing import CliRunner

from dmo.cli import app
from dmo.groundtruth.llamafactory import plan_runs
from dmo.groundtruth.recipe import Recipe
from dmo.groundtruth.runs import RunFolder
from dmo.mixture import Mixture
from dmo.results import ResultsTable
from dmo.scoring.loss import loss_of

MIX = Mixture(("general", "ocr"), (0.25, 0.75))


def _eval(name: str, loss: float, step: int, epoch: float) -> dict:
    """One evaluation's log entry, as Trainer.evaluate logs it for one of several eval datasets."""
    p = f"eval_{name}-val"
    return {f"{p}_loss": loss, f"{p}_runtime": 0.41, f"{p}_samples_per_second": 7.3, f"{p}_steps_per_second": 2.4,
            "epoch": epoch, "step": step}  # fmt: skip


def _state(evals: dict[int, dict[str, float]], global_step: int = 5) -> dict:
    history: list[dict] = []
    for step in range(1, global_step + 1):
        history.append({"epoch": step / global_step, "grad_norm": 1.5, "learning_rate": 2e-5, "loss": 3.0 - 0.1 * step,
                        "step": step})  # fmt: skip
        for name, loss in evals.get(step, {}).items():
            history.append(_eval(name, loss, step, step / global_step))
    history.append({"epoch": 1.0, "step": global_step, "total_flos": 1234.0, "train_loss": 2.7, "train_runtime": 9.1,
                    "train_samples_per_second": 4.4, "train_steps_per_second": 0.55})  # fmt: skip
    return {"best_global_step": None, "best_metric": None, "best_model_checkpoint": None, "epoch": 1.0,
            "eval_steps": 0.125, "global_step": global_step, "is_hyper_param_search": False,
            "is_local_process_zero": True, "is_world_process_zero": True, "log_history": history, "logging_steps": 1,
            "max_steps": global_step, "num_input_tokens_seen": 0, "num_train_epochs": 1, "save_steps": 100,
            "stateful_callbacks": {}, "total_flos": 1234.0, "train_batch_size": 8, "trial_name": None,
            "trial_params": None}  # fmt: skip


def _all_results(losses: dict[str, float]) -> dict:
    out = {"epoch": 1.0, "total_flos": 1234.0, "train_loss": 2.7, "train_runtime": 9.1,
           "train_samples_per_second": 4.4, "train_steps_per_second": 0.55}  # fmt: skip
    for name, loss in losses.items():
        out |= {k: v for k, v in _eval(name, loss, 5, 1.0).items() if k not in ("step",)}
    return out


def _finish(folder: Path, files: dict[str, dict]) -> None:
    """A finished LoRA run's output folder: the adapter and LLaMA-Factory's metrics files."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    (folder / "adapter_model.safetensors").write_bytes(b"stand-in")
    for name, doc in files.items():
        (folder / name).write_text(json.dumps(doc, indent=4, sort_keys=True))


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    src = make_sources(tmp_path, n_general=16)
    out = tmp_path / "runs"
    recipe = Recipe(base="org/base-model", template="qwen2_vl", budget=16, global_batch=8, per_device_batch=8)
    plan_runs("experts", recipe, data=src, out=out, domains=["general", "ocr"])
    plan_runs("mixtures", recipe, data=src, out=out, mixtures=[MIX], seeds=[0, 1, 2])
    plan_runs("mixtures", recipe, data=src, out=out, mixtures=[MIX], seeds=[0], strategy="interleave")
    runs = RunFolder(out).runs()
    # the interleave-mixed run of the same mixture and seed: another ground truth, never mixed into these rows
    inter = next(r for r in runs.values() if r.strategy == "interleave")
    _finish(out / inter.output, {"all_results.json": _all_results({"general": 4.0, "ocr": 4.0})})
    # the final evaluation's metrics (all_results.json), next to a trainer state that says otherwise: the former wins
    _finish(out / runs["expert-general"].output, {"all_results.json": _all_results({"general": 1.25}),
                                                  "trainer_state.json": _state({5: {"general": 9.0}})})  # fmt: skip
    # only the trainer state: its evaluation at the last step is the final model's
    _finish(out / runs["expert-ocr"].output, {"trainer_state.json": _state({2: {"ocr": 2.0}, 5: {"ocr": 0.5}})})
    seeds = {r.seed: r for r in runs.values() if r.kind == "trained" and r.strategy == "exact"}
    _finish(out / seeds[0].output, {"all_results.json": _all_results({"general": 1.5, "ocr": 0.75})})
    _finish(out / seeds[1].output, {"trainer_state.json": _state({4: {"general": 1.0, "ocr": 1.0}})})  # not at 5
    return out  # seed 2 never finished


def test_ingest_reads_the_final_validation_loss_of_every_finished_run(runs: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["ingest", str(runs), "--results", str(tmp_path / "res"),
                                   "--domains", "general,ocr"])  # fmt: skip
    assert res.exit_code == 0, res.output
    flat = " ".join(res.output.split())
    assert "added 4 row(s)" in flat and "2 expert, 2 trained" in flat
    assert "not the final step 5" in flat and "not finished" in flat  # seed 1 and seed 2, each said
    assert "trained with interleave mixing" in flat
    records = ResultsTable(tmp_path / "res" / "scores.jsonl").records()
    rows = {(r["kind"], r["mixture"], r["seed"], r["benchmark"]): r for r in records}
    want = {
        ("expert", "general", None, "loss:general"): 1.25,
        ("expert", "ocr", None, "loss:ocr"): 0.5,
        ("trained", MIX.id, 0, "loss:general"): 1.5,
        ("trained", MIX.id, 0, "loss:ocr"): 0.75,
    }
    assert set(rows) == set(want)
    for k, loss in want.items():
        assert rows[k]["score"] == pytest.approx(math.exp(-loss), rel=1e-12)
        assert loss_of(rows[k]["score"]) == pytest.approx(loss, rel=1e-12)
        assert rows[k]["metric"] == "loss" and rows[k]["source"].startswith("llamafactory:")
    assert rows[("trained", MIX.id, 0, "loss:ocr")]["weights"] == {"general": 0.25, "ocr": 0.75}
    # again: nothing new
    again = CliRunner().invoke(app, ["ingest", str(runs), "--results", str(tmp_path / "res")])
    assert again.exit_code == 0 and "added 0 row(s)" in " ".join(again.output.split())


def test_a_space_over_other_domains_skips_those_runs(runs: Path, tmp_path: Path) -> None:
    from dmo.groundtruth.trainer_losses import loss_rows

    notes: list[str] = []
    rows = loss_rows(runs, domains=["general", "chart"], report=notes)
    # the ocr expert and the mixture that weighs ocr: skipped, and said
    assert {(r.kind, r.mixture) for r in rows} == {("expert", "general")}
    assert any("expert-ocr: an expert of another domain" in n for n in notes)
    assert any("trained on other domains than general, chart" in n for n in notes)
