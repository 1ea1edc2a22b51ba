"""Trade-offs end to end on the small tiny world (real merges, real lmms-eval scoring with the hf backend): a
constrained grid study and a two-objective study on two workers (resumed), then ``dmo pareto`` and ``dmo report``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from dmo.search.storage import make_storage
from dmo.search.study import study_paths
from dmo.session import Session

pytestmark = pytest.mark.slow

BENCHES = ["dmo_tiny_general", "dmo_tiny_ocr"]
COMMON = {
    "name": "pp",
    "domains": ["general", "ocr"],
    "experts": "tinyworld-small",
    "mixtures": {"preset": "paper-2d"},
    "benchmarks": BENCHES,
    "scoring": {"backend": "hf", "device": "cpu", "limit": 16},
}


def cli(tmp_path: Path, *args: str) -> str:
    env = {**os.environ, "DMO_RESULTS": str(tmp_path / "results")}
    out = subprocess.run([sys.executable, "-m", "dmo.cli", *args], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=900)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return " ".join(out.stdout.split())


def test_trade_off_studies_dmo_pareto_and_the_report_on_the_small_tiny_world(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DMO_RESULTS", str(tmp_path / "results"))
    constrained = {**COMMON, "objective": "mean", "sampler": {"name": "grid"},
                   "constraints": [{"benchmark": "dmo_tiny_general", "min": "base"}]}  # fmt: skip
    pareto = {**COMMON, "objective": {"pareto": BENCHES}, "sampler": {"name": "tpe", "n_trials": 4, "seed": 0}}
    (tmp_path / "constrained.yaml").write_text(yaml.safe_dump(constrained))
    (tmp_path / "pareto.yaml").write_text(yaml.safe_dump(pareto))

    # the ground truth: base, experts and the trained mixtures of the paper's 2-domain grid
    session = Session.open(tmp_path / "constrained.yaml")
    session.score(session.references(), "references", progress=False)

    out = cli(tmp_path, "study", "constrained.yaml")
    assert "constraint: dmo_tiny_general >=" in out and "(base)" in out
    assert "best feasible mixture of study pp.grid" in out or "no trial is feasible" in out
    paths = study_paths(session.space)
    assert paths.study_name == "pp.grid"
    study = optuna.load_study(study_name=paths.study_name, storage=make_storage(paths.storage))
    done = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(done) == len(session.space.candidates()) and all("dmo_feasible" in t.user_attrs for t in done)

    out = cli(tmp_path, "study", "pareto.yaml", "--workers", "2")
    assert "front of study pp.tpe" in out and "4 new evaluations" in out
    out = cli(tmp_path, "study", "pareto.yaml", "--n-trials", "5")
    # two workers may each start a 4th trial; the loser is failed unscored as surplus, so count complete ones
    tpe = optuna.load_study(study_name="pp.tpe", storage=make_storage(paths.storage))
    assert len(tpe.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 5
    assert "front of study pp.tpe" in out and f"{len(tpe.trials)} trials" in out

    out = cli(tmp_path, "pareto", "results/pp", "--n-boot", "50")
    assert "pp / linear: the proxies' front" in out and "front fidelity" in out
    for source in ("proxy", "expert mix", "regression", "seed ceiling"):
        assert source in out

    out = cli(tmp_path, "report", "results/pp")
    page = (tmp_path / "results" / "pp" / "report.html").read_text()
    assert "Trade-offs: the front of the benchmarks" in page
    assert "Front of dmo_tiny_general and dmo_tiny_ocr: pp / linear" in page
    assert "Front fidelity: pp / linear" in page
    assert "Study pp.tpe: trials and front" in page and "Study pp.tpe: front" in page
    assert page.count("data:image/png;base64,") >= 4
