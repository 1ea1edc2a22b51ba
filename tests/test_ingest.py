"""`dmo ingest`: lmms-eval output folders into the results table as base / expert / trained rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dmo.errors import DmoError
from dmo.groundtruth.ingest import ingest, ingest_rows, parse_model_name
from dmo.mixture import Mixture
from dmo.results import ResultsTable

ROOT = Path(__file__).resolve().parent.parent


def write_result(root: Path, model: str, bench: str, value: float, date: str = "20250101_120000", **extra) -> Path:
    folder = root / model / bench / "dmo__model"  # lmms-eval adds a folder named after the model
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{date}_results.json"
    metrics = {"exact_match,none": value, "exact_match_stderr,none": 0.01, **extra}
    path.write_text(json.dumps({"results": {bench: {"alias": bench, **metrics}}, "config": {"model": "dmo"}}))
    return path


@pytest.mark.parametrize(
    ("name", "kind", "label", "seed"),
    [
        ("base", "base", "base", None),
        ("expert-ocr", "expert", "ocr", None),
        ("expert_chart", "expert", "chart", None),
        ("general", "expert", "general", None),
        ("ocr-102400", "expert", "ocr", None),
        ("general-25600++ocr-76800", "trained", "chart-0+general-0.25+ocr-0.75", 0),
        ("general-0.25+ocr-0.75.seed1", "trained", "chart-0+general-0.25+ocr-0.75", 1),
        ("general-25600++ocr-76800_seed2", "trained", "chart-0+general-0.25+ocr-0.75", 2),
    ],
)
def test_model_names(name, kind, label, seed):
    parsed = parse_model_name(name, ["chart", "general", "ocr"])
    assert (parsed.kind, parsed.label, parsed.seed) == (kind, label, seed)


@pytest.mark.parametrize("name", ["my-model", "general-0.3+ocr-0.3", "base.seed1", "Qwen2-VL"])
def test_unreadable_model_names(name):
    with pytest.raises(DmoError):
        parse_model_name(name, ["general", "ocr"])


def test_ingest_rows_newest_wins_and_idempotent(tmp_path):
    root = tmp_path / "evals"
    write_result(root, "base", "dmo_tiny_ocr", 0.1)
    write_result(root, "expert-ocr", "dmo_tiny_ocr", 0.6)
    write_result(root, "expert-general", "dmo_tiny_ocr", 0.2)
    write_result(root, "general-0.25+ocr-0.75.seed0", "dmo_tiny_ocr", 0.5)
    old = write_result(root, "general-0.25+ocr-0.75.seed1", "dmo_tiny_ocr", 0.3, date="20250101_120000")
    write_result(root, "general-0.25+ocr-0.75.seed1", "dmo_tiny_ocr", 0.45, date="20250102_090000")
    os.utime(old, (2e9, 2e9))  # a newer mtime does not beat a newer date in the name
    rows = ingest_rows(root, domains=["general", "ocr"], group="tiny")
    got = {(r.kind, r.mixture, r.seed): r.score for r in rows}
    assert got == {
        ("base", "base", None): 0.1,
        ("expert", "general", None): 0.2,
        ("expert", "ocr", None): 0.6,
        ("trained", "general-0.25+ocr-0.75", 0): 0.5,
        ("trained", "general-0.25+ocr-0.75", 1): 0.45,
    }
    trained = [r for r in rows if r.kind == "trained"]
    assert all(r.weights == {"general": 0.25, "ocr": 0.75} and r.group == "tiny" for r in trained)
    assert all(r.metric == "exact_match" and r.source.startswith("lmms-eval:") for r in rows)

    table = ResultsTable(tmp_path / "results" / "scores.jsonl")
    new, known = ingest(root, table, domains=["general", "ocr"], group="tiny")
    assert (len(new), known) == (5, 0)
    new, known = ingest(root, table, domains=["general", "ocr"], group="tiny")
    assert (len(new), known) == (0, 5)  # re-ingesting the same files adds nothing
    write_result(root, "base", "dmo_tiny_ocr", 0.15, date="20250103_000000")
    new, known = ingest(root, table, domains=["general", "ocr"], group="tiny")
    assert (len(new), known) == (1, 4)
    frame = table.frame()
    assert len(frame) == 5  # the newer base row supersedes the old one
    assert float(frame[frame["kind"] == "base"]["score"].iloc[0]) == 0.15
    assert set(frame["kind"]) == {"base", "expert", "trained"}
    assert frame[frame["kind"] == "trained"]["w_ocr"].tolist() == [0.75, 0.75]


def test_metric_map_is_used(tmp_path):
    root = tmp_path / "evals"
    write_result(root, "base", "mme", 0.0, **{"mme_cognition_score,none": 300.0, "mme_perception_score,none": 1100.0})
    (row,) = ingest_rows(root)
    assert row.score == pytest.approx(1400 / 2800) and row.metric == "mme_cognition_score+mme_perception_score"


def test_domains_default_to_all_named(tmp_path):
    root = tmp_path / "evals"
    write_result(root, "general-0.5+ocr-0.5", "dmo_tiny_ocr", 0.5)
    write_result(root, "chart-0.5+ocr-0.5", "dmo_tiny_ocr", 0.4)
    ids = sorted(r.mixture for r in ingest_rows(root))
    assert ids == ["chart-0+general-0.5+ocr-0.5", "chart-0.5+general-0+ocr-0.5"]


def test_bad_folders(tmp_path):
    with pytest.raises(DmoError, match="not a folder"):
        ingest_rows(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DmoError, match="no model folders"):
        ingest_rows(tmp_path / "empty")
    root = tmp_path / "evals"
    write_result(root, "base", "dmo_tiny_ocr", 0.1)
    (root / "expert-ocr" / "dmo_tiny_ocr" / "run").mkdir(parents=True)
    with pytest.raises(DmoError, match=r"no lmms-eval results JSON \(\*_results.json\) under .*expert-ocr"):
        ingest_rows(root)
    write_result(root, "expert-ocr", "unknown_bench", 0.1)
    (root / "expert-ocr" / "dmo_tiny_ocr").rename(root / "expert-ocr" / "x")
    with pytest.raises(DmoError):
        ingest_rows(root)


def test_cli_writes_nothing_on_bad_input(tmp_path):
    root = tmp_path / "evals"
    write_result(root, "base", "dmo_tiny_ocr", 0.1)
    write_result(root, "expert-ocr", "dmo_tiny_ocr", 0.5)
    (root / "expert-general" / "dmo_tiny_ocr").mkdir(parents=True)  # an evaluation that never finished
    cmd = [sys.executable, "-m", "dmo.cli", "ingest", str(root), "--results", str(tmp_path / "res")]
    bad = subprocess.run(cmd, capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "expert-general" in bad.stderr
    assert not (tmp_path / "res").exists()  # nothing half-written
    (root / "expert-general").rename(tmp_path / "moved")
    ok = subprocess.run(cmd, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "added 2 row(s)" in ok.stdout
    assert len(ResultsTable(tmp_path / "res" / "scores.jsonl").records()) == 2


# ------------------------------------------------------------------------------------------------ the paper's tree
# The DMO paper's results (mLLMs_merging_4_DMO: scripts/*/eval_bench_*.sh, utils/eval_bench_utils.py) live in
# eval_bench/<experiment>/<model id>/<benchmark>/<lmms-eval's model folder>/<date>_results.json, base models in
# eval_bench/base_models/<name>/...; model ids are <family>_<size>_<ft>_{expert,mixed,merged}_<domain>-<n>++...


def paper_result(folder: Path, task: str, metrics: dict, date: str = "20251015_051555", model_path: str = "") -> Path:
    """An lmms-eval 0.4-style results file, as the paper's vllm runs write it (shape of a real one)."""
    model_path = model_path or f"/scratch/checkpoints/exported_models/{folder.name}"
    out = folder / task / model_path.strip("/").replace("/", "__") / f"{date}_results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    results = {
        "results": {task: {"alias": task, **metrics, **{k.replace(",", "_stderr,"): "N/A" for k in metrics}}},
        "group_subtasks": {task: []},
        "configs": {task: {"task": task, "output_type": "generate_until", "metadata": {"version": 0.0}}},
        "versions": {task: 0.0},
        "n-shot": {task: 0},
        "higher_is_better": {task: {k.split(",")[0]: True for k in metrics}},
        "n-samples": {task: {"original": 1000, "effective": 16}},
        "config": {
            "model": "vllm",
            "model_args": f"model={model_path},gpu_memory_utilization=0.85",
            "batch_size": "4",
            "limit": 16.0,
            "bootstrap_iters": 100000,
        },
        "git_hash": "0f1e2d3",
        "date": date,
    }
    out.write_text(json.dumps(results, indent=2))
    return out


EB = "exp_qwen2_2b_100k"
M2 = "general-25600++ocr-76800"
M4 = "chart-33249++counting-32307++general-32973++ocr-3871"  # the paper's first 4-domain mixture at 102,400
GQA = "exact_match,none"


def paper_tree(root: Path) -> Path:
    eb = root / "eval_bench"
    base = eb / "base_models"
    exp = eb / EB
    paper_result(base / "Qwen2-VL-2B", "gqa", {GQA: 0.30})
    paper_result(base / "Qwen2-VL-2B-Instruct", "gqa", {GQA: 0.55})  # the instruct model: another experiment's base
    paper_result(base / "InternVL3_5-2B-Pretrained", "gqa", {GQA: 0.40})
    for d, v in (("general", 0.50), ("ocr", 0.35), ("chart", 0.31), ("counting", 0.33)):
        paper_result(exp / f"qwen2_2b_lora_expert_{d}-102400", "gqa", {GQA: v})
    paper_result(exp / "qwen2_2b_lora_expert_ocr-102400" / "checkpoint-400", "gqa", {GQA: 0.2})  # intermediate
    paper_result(exp / f"qwen2_2b_lora_mixed_{M2}", "gqa", {GQA: 0.47})
    paper_result(exp / f"qwen2_2b_lora_mixed_{M2}", "cv_bench_2d", {"count_acc_softer,none": 0.6,
                                                                     "count_acc_soft,none": 0.5})  # fmt: skip
    paper_result(exp / f"qwen2_2b_lora_mixed_{M2}", "mme", {"mme_cognition_score,none": 280.0,
                                                            "mme_perception_score,none": 1120.0})  # fmt: skip
    paper_result(exp / f"qwen2_2b_lora_merged_{M2}--task_arithmetic", "gqa", {GQA: 0.44})
    paper_result(exp / f"qwen2_2b_lora_merged_{M2}--task_arithmetic", "cv_bench_2d", {"count_acc_softer,none": 0.5})
    paper_result(exp / f"qwen2_2b_lora_merged_{M2}--ties", "gqa", {GQA: 0.41})
    paper_result(exp / f"qwen2_2b_lora_mixed_{M4}", "gqa", {GQA: 0.45})
    paper_result(exp / f"qwen2_2b_lora_merged_{M4}--task_arithmetic", "gqa", {GQA: 0.43})
    return eb


def _by(rows):
    return {(r.kind, r.mixture, r.method, r.benchmark): r for r in rows}


def test_paper_tree_on_a_2d_space(tmp_path):
    eb = paper_tree(tmp_path)
    report: list[str] = []
    rows = ingest_rows(eb, domains=["general", "ocr"], group="paper-2d", report=report)
    got = {k: r.score for k, r in _by(rows).items()}
    mix = "general-0.25+ocr-0.75"
    assert got == {
        ("base", "base", "", "gqa"): 0.30,  # Qwen2-VL-2B: the base of qwen2_2b models, not the -Instruct one
        ("expert", "general", "", "gqa"): 0.50,
        ("expert", "ocr", "", "gqa"): 0.35,
        ("trained", mix, "", "gqa"): 0.47,
        ("trained", mix, "", "cv_bench_2d_dmo"): 0.6,  # the paper's cv_bench_2d is dmo's cv_bench_2d_dmo
        ("trained", mix, "", "mme"): pytest.approx(0.5),
        ("proxy", mix, "task_arithmetic", "gqa"): 0.44,
        ("proxy", mix, "task_arithmetic", "cv_bench_2d_dmo"): 0.5,
        ("proxy", mix, "ties", "gqa"): 0.41,
    }
    by = _by(rows)
    trained, proxy = by[("trained", mix, "", "gqa")], by[("proxy", mix, "task_arithmetic", "gqa")]
    assert trained.weights == proxy.weights == {"general": 0.25, "ocr": 0.75}
    assert (trained.seed, proxy.seed) == (0, None) and by[("trained", mix, "", "cv_bench_2d_dmo")].metric == (
        "count_acc_softer"
    )
    assert len({r.key for r in rows}) == len(rows)  # the two merge methods of one mixture are two models
    assert by[("base", "base", "", "gqa")].source.startswith("lmms-eval:base_models/Qwen2-VL-2B/gqa/")
    text = "\n".join(report)
    assert "checkpoint-400: an intermediate checkpoint" in text
    assert f"qwen2_2b_lora_mixed_{M4}: trained on chart, counting, outside" in text
    assert "qwen2_2b_lora_expert_chart-102400" in text and "Instruct" not in text

    # the experiment folder itself reads the same, the base from ../base_models
    again = ingest_rows(eb / EB, domains=["general", "ocr"], group="paper-2d")
    assert {(k, r.score) for k, r in _by(again).items()} == {(k, r.score) for k, r in by.items()}


def test_paper_tree_weights_are_counts_over_the_budget(tmp_path):
    """The 4-domain name's counts (33249, ...) stand for the paper's mixture (0.3247, ...): round(w x 102400) of it;
    trained and proxy rows of one name get one id, that of the mixture dmo scores proxies for."""
    from dmo.presets import paper_4d

    eb = paper_tree(tmp_path)
    rows = ingest_rows(eb)  # every domain named under the tree
    by = _by(rows)
    first = paper_4d()[0]
    assert by[("trained", first.id, "", "gqa")].weights == first.as_dict()
    assert by[("proxy", first.id, "task_arithmetic", "gqa")].weights == first.as_dict()
    two = by[("trained", "chart-0+counting-0+general-0.25+ocr-0.75", "", "gqa")]
    assert two.weights == {"chart": 0.0, "counting": 0.0, "general": 0.25, "ocr": 0.75}  # n_i / 102400
    assert {r.mixture for r in rows if r.kind == "expert"} == {"chart", "counting", "general", "ocr"}
    # without a budget to go by (no experts), a name that is no known mixture reads as n_i / sum(n)
    from dmo.groundtruth.ingest import paper_mixture

    odd = paper_mixture({"general": 1000, "ocr": 3000}, None, None)
    assert odd.as_dict() == {"general": 0.25, "ocr": 0.75}
    with pytest.raises(DmoError, match="names 4000 samples in all, not the budget 102400"):
        paper_mixture({"general": 1000, "ocr": 3000}, None, 102_400, name="x")
    # a space's own candidate is matched the same way
    cand = Mixture(("general", "ocr"), (1 / 3, 2 / 3))
    assert paper_mixture({"general": 34133, "ocr": 68267}, None, 102_400, [cand]).id == cand.id


def test_paper_hf_exports_and_instruct_experiments(tmp_path):
    eb = tmp_path / "eval_bench"
    exp = eb / "exp_qwen2instr_2b_100k"
    paper_result(eb / "base_models" / "Qwen2-VL-2B", "gqa", {GQA: 0.30})
    paper_result(eb / "base_models" / "Qwen2-VL-2B-Instruct-HF", "gqa", {GQA: 0.55})
    paper_result(exp / "qwen2instr_2b_lora_expert_ocr-102400", "gqa", {GQA: 0.6})
    paper_result(exp / "qwen2instr_2b_lora_expert_general-102400-HF", "gqa", {GQA: 0.7})
    paper_result(exp / f"qwen2instr_2b_lora_mixed_{M2}", "gqa", {GQA: 0.1}, date="20251015_000000")
    paper_result(exp / f"qwen2instr_2b_lora_mixed_{M2}-HF", "gqa", {GQA: 0.65}, date="20251016_000000")
    rows = ingest_rows(eb)
    got = {(r.kind, r.mixture): r.score for r in rows}
    assert got == {
        ("base", "base"): 0.55,  # an instruct experiment's base is the instruct model
        ("expert", "ocr"): 0.6,
        ("expert", "general"): 0.7,
        ("trained", "general-0.25+ocr-0.75"): 0.65,  # the export and its -HF twin are one model: the newest wins
    }


@pytest.mark.parametrize("tree", ["two_experiments", "two_tags"])
def test_paper_trees_that_are_refused(tmp_path, tree):
    eb = tmp_path / "eval_bench"
    paper_result(eb / EB / "qwen2_2b_lora_expert_ocr-102400", "gqa", {GQA: 0.6})
    if tree == "two_experiments":
        paper_result(eb / "exp_qwen2_2b_10k" / "qwen2_2b_lora_expert_ocr-10240", "gqa", {GQA: 0.6})
        match = "2 of the paper's experiments"
    else:
        paper_result(eb / EB / "qwen2_2b_full_expert_general-102400", "gqa", {GQA: 0.6})
        match = "several of the paper's base models or methods .qwen2_2b_full, qwen2_2b_lora"
    with pytest.raises(DmoError, match=match):
        ingest_rows(eb)


def test_unknown_names_are_listed_never_guessed(tmp_path):
    root = tmp_path / "evals"
    write_result(root, "base", "gqa", 0.3)
    write_result(root, "expert-ocr", "gqa", 0.6)
    write_result(root, "my-model", "gqa", 0.9)
    write_result(root, "qwen2_2b_lora_mergedckpt_general-1++ocr-3--ties", "gqa", 0.9)
    write_result(root, "qwen2_2b_lora_merged_general-25600++ocr-76800", "gqa", 0.9)  # no merge method
    write_result(root, "expert-general", "refcoco_mine", 0.9)  # a benchmark the metric map lacks
    with pytest.raises(DmoError) as exc:
        ingest_rows(root)
    msg = str(exc.value)
    assert "4 unknown folder(s)" in msg and "--skip-unknown" in msg and "\n" not in msg
    for name in ("my-model", "mergedckpt", "qwen2_2b_lora_merged_general-25600++ocr-76800", "refcoco_mine"):
        assert name in msg
    report: list[str] = []
    rows = ingest_rows(root, skip_unknown=True, report=report)
    assert {(r.kind, r.mixture) for r in rows} == {("base", "base"), ("expert", "ocr")}
    assert len([line for line in report if line.startswith("skipped unknown")]) == 4

    cmd = [sys.executable, "-m", "dmo.cli", "ingest", str(root), "--results", str(tmp_path / "res")]
    bad = subprocess.run(cmd, capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "my-model" in bad.stderr
    assert not (tmp_path / "res").exists()
    ok = subprocess.run([*cmd, "--skip-unknown"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "added 2 row(s)" in ok.stdout and ok.stderr.count("skipped unknown") == 4


def test_cli_on_the_papers_tree_with_its_space(tmp_path):
    """`dmo ingest eval_bench/ --space search_spaces/paper-4d.yaml`: the space's domains, name and candidates; the
    trained and proxy rows pair up in `dmo correlate`'s input."""
    eb = paper_tree(tmp_path)
    space = ROOT / "search_spaces" / "paper-4d.yaml"
    res = tmp_path / "res"
    cmd = [sys.executable, "-m", "dmo.cli", "ingest", str(eb / EB), "--space", str(space), "--results", str(res)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    frame = ResultsTable(res / "scores.jsonl").frame()
    assert set(frame["group"]) == {"paper-4d"} and set(frame["kind"]) == {"base", "expert", "trained", "proxy"}
    pairs = frame[frame["benchmark"] == "gqa"].groupby("mixture")["kind"].apply(set).to_dict()
    from dmo.presets import paper_4d

    assert pairs[paper_4d()[0].id] == {"trained", "proxy"}
    assert "intermediate checkpoint" in out.stderr
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert "added 0 row(s)" in again.stdout
