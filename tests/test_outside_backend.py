"""A scoring backend from another package (issue 23): registered through an entry point of group ``dmo.scorers``,
its own options checked by its own model under its name in the space's ``scoring`` section, a real study run with it.

The package is written into a folder with a ``*.dist-info`` that declares the entry point; that folder on the
``PYTHONPATH`` of a ``dmo`` subprocess is all an installed package would give ``importlib.metadata``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dmo.errors import DmoError
from dmo.mixture import Mixture
from dmo.results import ResultsTable

PACKAGE = '''\
"""A bowl-shaped score around a centre mixture: an outside backend with options of its own."""

import json
from pathlib import Path

from pydantic import Field

from dmo.scoring.base import Backend, BackendOptions, Evaluation, Scorer


class BowlOptions(BackendOptions):
    centre: dict[str, float]
    sharpness: float = Field(default=1.0, gt=0)
    #: where the scorer writes down the context it was built with (relative to the space file)
    log: Path


class BowlScorer(Scorer):
    name = "bowl"

    @classmethod
    def from_context(cls, context, options):
        options.log.write_text(json.dumps({
            "options": options.model_dump(mode="json"),
            "manifest": context.manifest.name,
            "experts": sorted(context.manifest.experts),
            "limit": context.limit,
            "batch_size": context.batch_size,
            "device": context.device,
            "include_path": None if context.include_path is None else str(context.include_path),
            "metric_map": context.metric_map is not None,
        }))
        return cls(options)

    def __init__(self, options):
        self.options = options

    def fingerprint(self, target):
        return f"bowl:{target.kind}:{target.method}:{target.label}"

    def settings(self):
        return {"backend": self.name, "centre": self.options.centre, "sharpness": self.options.sharpness}

    def evaluate(self, target, benchmarks):
        w = target.weights
        score = 1.0 - self.options.sharpness * sum((w.get(d, 0.0) - c) ** 2 for d, c in self.options.centre.items())
        return Evaluation({b: score for b in benchmarks}, metrics=dict.fromkeys(benchmarks, "bowl"))


BOWL = Backend("acme_bowl:BowlScorer", BowlOptions)
'''

CENTRE = {"a": 0.5, "b": 0.25, "c": 0.25}


def _site(root: Path) -> Path:
    """An 'installed' package: its module and a dist-info that names its entry point."""
    site = root / "site"
    (site / "acme_bowl").mkdir(parents=True)
    (site / "acme_bowl" / "__init__.py").write_text(PACKAGE)
    info = site / "acme_bowl-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-bowl\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[dmo.scorers]\nbowl = acme_bowl:BOWL\n")
    return site


def _space(root: Path, scoring: str) -> Path:
    for d in ("base", "ea", "eb", "ec"):
        (root / "models" / d).mkdir(parents=True, exist_ok=True)
    (root / "experts.yaml").write_text(
        "name: fake\nbase: ./models/base\nexperts: {a: ./models/ea, b: ./models/eb, c: ./models/ec}\n"
    )
    path = root / "spaces" / "bowl.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(
        textwrap.dedent(f"""\
        name: bowl
        domains: [a, b, c]
        experts: ../experts.yaml
        mixtures: {{lattice: {{resolution: 4}}}}
        benchmarks: [fit_one, fit_two]
        sampler: {{name: grid, n_trials: 15, seed: 0}}
        scoring: {scoring}
        """)
    )
    return path


def _dmo(root: Path, site: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DMO_RESULTS": str(root / "results"), "DMO_HEARTBEAT_INTERVAL": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH", "")) if p)
    return subprocess.run(
        [sys.executable, "-m", "dmo.cli", *args], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )


def _bowl(weights: dict[str, float], sharpness: float) -> float:
    return 1.0 - sharpness * sum((weights[d] - c) ** 2 for d, c in CENTRE.items())


def test_an_outside_backend_with_its_own_options_runs_a_study(tmp_path: Path) -> None:
    site = _site(tmp_path)
    options = f"{{centre: {json.dumps(CENTRE)}, sharpness: 2.0, log: ../context.json}}"
    space = _space(tmp_path, f"{{backend: bowl, limit: 3, bowl: {options}}}")
    storage = f"sqlite:///{tmp_path / 'studies' / 'bowl.db'}"

    assert "bowl" in _dmo(tmp_path, site, "study", "--help").stdout  # the CLI lists it with dmo's own
    out = _dmo(tmp_path, site, "study", str(space), "--storage", storage)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "studies" / "bowl.db").is_file()

    # the context every backend receives, and the backend's own options (its path resolved against the space file)
    seen = json.loads((tmp_path / "context.json").read_text())
    assert seen["options"] == {"centre": CENTRE, "sharpness": 2.0, "log": str((tmp_path / "context.json").resolve())}
    assert seen["manifest"] == "fake" and seen["experts"] == ["a", "b", "c"]
    assert (seen["limit"], seen["batch_size"], seen["device"]) == (3, 64, "auto")
    assert seen["include_path"] is None and seen["metric_map"] is False

    # every trial scored by the outside backend, with the bowl's values; the grid's best is the centre
    rows = [r for r in ResultsTable(tmp_path / "results" / "bowl" / "scores.jsonl").records() if r["kind"] == "proxy"]
    assert {r["benchmark"] for r in rows} == {"fit_one", "fit_two"} and len(rows) == 2 * 15
    assert all(r["source"] == "bowl" and r["status"] == "ok" and r["metric"] == "bowl" for r in rows)
    for r in rows:
        assert r["score"] == pytest.approx(_bowl(r["weights"], 2.0), abs=1e-12)
    centre = Mixture.from_mapping(CENTRE, ["a", "b", "c"]).id
    assert centre in {r["mixture"] for r in rows}
    assert f"best mixture of study bowl.grid: {centre} (objective {_bowl(CENTRE, 2.0):.4f}" in out.stdout


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("{centre: {a: 1}, sharpnes: 2, log: c.json}", r"bowl\.sharpnes: not an option of the bowl backend"),
        ("{centre: {a: 1}, sharpness: -1, log: c.json}", r"bowl\.sharpness: Input should be greater than 0 \(an opt"),
        ("{sharpness: 2, log: c.json}", r"bowl\.centre: Field required \(an option of the bowl backend\)"),
    ],
    ids=["unknown-option", "bad-value", "missing-option"],
)
def test_a_wrong_option_of_an_outside_backend_is_one_line_naming_it(tmp_path: Path, options: str, message: str):
    site = _site(tmp_path)
    space = _space(tmp_path, f"{{backend: bowl, bowl: {options}}}")
    out = _dmo(tmp_path, site, "study", str(space))
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert "bowl.yaml: scoring: " in lines[0]
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "results" / "bowl").exists()  # refused before anything was written


def test_a_registry_entry_must_be_a_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """One kind of entry: an entry point naming a scorer class (the old second kind) is refused with what to fix."""
    from dmo.scoring.base import SCORERS, backend
    from dmo.scoring.replay_backend import ReplayScorer

    monkeypatch.setitem(SCORERS._registered, "classy", ReplayScorer)
    with pytest.raises(
        DmoError, match=r"'classy' is registered as <class .*ReplayScorer'>, not a dmo.scoring.base.Backend"
    ):
        backend("classy")


def test_an_entry_must_name_a_scorer_that_can_be_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dmo.manifest import ExpertManifest
    from dmo.scoring.base import SCORERS, Backend, ScoringContext, make_scorer

    (tmp_path / "half_done.py").write_text(
        "from dmo.scoring.base import Scorer\n"
        "class NoContext(Scorer):\n"
        "    name = 'nc'\n"
        "    def fingerprint(self, target): return ''\n"
        "    def settings(self): return {}\n"
        "    def evaluate(self, target, benchmarks): raise AssertionError\n"
        "class NotAScorer:\n"
        "    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(SCORERS._registered, "nc", Backend("half_done:NoContext"))
    monkeypatch.setitem(SCORERS._registered, "plain", Backend("half_done:NotAScorer"))
    context = ScoringContext(
        ExpertManifest.model_validate({"name": "m", "base": {"path": tmp_path}, "experts": {"a": {"path": tmp_path}}})
    )
    with pytest.raises(DmoError, match=r"class NoContext does not implement from_context"):
        make_scorer("nc", context)
    with pytest.raises(DmoError, match=r"half_done:NotAScorer is not a dmo.scoring.base.Scorer subclass"):
        make_scorer("plain", context)
    with pytest.raises(DmoError, match=r"nc\.x: not an option of the nc backend \(its options: none\)"):
        make_scorer("nc", context, {"x": 1})
