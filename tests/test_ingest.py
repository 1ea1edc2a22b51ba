"""`dmo ingest`: lmms-eval output folders into the results table as base / expert / trained rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dmo.errors import DmoError
from dmo.ingest import ingest, ingest_rows, parse_model_name
from dmo.results import ResultsTable


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
