"""The search-efficiency benchmark's replay and bookkeeping, on a synthetic recorded surface.

The replay runs real dmo studies (samplers, stick-breaking, storage, results-table cache); only the scores
come from the recorded surface instead of a model.
"""

import importlib.util
import math
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest

from dmo.config import load_space
from dmo.mixture import Mixture, lattice
from dmo.presets import paper_3d

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def se():
    spec = importlib.util.spec_from_file_location("search_efficiency", ROOT / "benchmarks" / "search_efficiency.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["search_efficiency"] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def space():
    return load_space(ROOT / "search_spaces" / "tiny-3d.yaml")


@pytest.fixture(scope="module")
def surface(se, space):
    return se.synthetic_surface(space, 16, seed=0)


def test_synthetic_surface_covers_the_lattice(se, space, surface):
    assert len(surface.objective) == 153 == len(lattice(space.domains, 16))
    assert set(next(iter(surface.scores.values()))) == set(space.benchmarks)
    for m, s in surface.scores.items():
        assert surface.objective[m] == pytest.approx(space.objective(s))
        assert all(0 <= v <= 1 for v in s.values())
    assert surface.optimum == max(surface.objective.values())


def test_snap_finds_the_nearest_lattice_mixture(se, surface):
    ids = set(surface.objective)
    for m in lattice(surface.domains, 16):
        assert surface.snap(m) == m.id  # lattice points map to themselves
    rng = np.random.default_rng(0)
    grid = np.array([m.weights for m in lattice(surface.domains, 16)])
    for w in rng.dirichlet([1, 1, 1], size=200):
        snapped = surface.snap(Mixture(surface.domains, tuple(w)))
        assert snapped in ids
        # no lattice point is closer in L1 (largest-remainder rounding is L1-optimal)
        got = np.array(Mixture.parse(snapped, surface.domains).weights)
        assert np.abs(got - w).sum() <= np.abs(grid - w).sum(axis=1).min() + 1e-9


def test_bookkeeping(se, surface):
    assert se.evals_to_reach([0.1, 0.5, 0.9, 0.95], 0.9) == 3
    assert se.evals_to_reach([0.1, 0.5], 0.9) is None
    assert se.regret_after([0.1, 0.5, 0.9], 1.0, 2) == pytest.approx(0.5)
    assert se.regret_after([0.1, 0.5, 0.9], 1.0, 40) == pytest.approx(0.1)  # fewer evaluations than asked: all
    opt = surface.optimum
    runs = [(surface, [opt * 0.5, opt]), (surface, [opt * 0.5] * 5)]
    s = se.summarize("x", runs, 0.01)
    assert s.reached == 1 and s.evals_worst == math.inf and s.evals_median == math.inf
    s = se.summarize("x", [(surface, [opt * 0.5, opt]), (surface, [opt])], 0.01)
    assert s.evals_median == 1.5 and s.evals_worst == 2
    assert s.regret[10] == pytest.approx(0.0)
    # pooled over surfaces: each run is measured against its own surface's optimum
    other = se.synthetic_surface(se.load_space(ROOT / "search_spaces" / "tiny-3d.yaml"), 16, seed=3)
    s = se.summarize("x", [(surface, [opt]), (other, [opt])], 0.01)
    assert s.regret[10] == pytest.approx(statistics.median([0.0, other.optimum - opt]))


def test_replay_runs_real_studies_against_the_recorded_surface(se, space, surface):
    values = set(surface.objective.values())
    rnd = se.replay(surface, space, "random", seed=0, budget=12)
    assert len(rnd) == 12 and all(v in values for v in rnd)
    assert se.replay(surface, space, "random", seed=0, budget=12) == rnd  # seeded
    assert se.replay(surface, space, "random", seed=1, budget=12) != rnd
    grid = se.replay(surface, space, "grid", seed=0, budget=30)
    preset_values = sorted(surface.objective[m.id] for m in paper_3d())
    assert sorted(grid) == pytest.approx(preset_values)  # the whole preset, nothing else, in some order
    assert se.replay(surface, space, "grid", seed=1, budget=30) != grid  # seeded order
    assert len(se.replay(surface, space, "grid", seed=0, budget=5)) == 5  # the budget caps the grid too


def test_benchmark_table_and_winner(se, space, surface):
    surfaces = [surface, se.synthetic_surface(space, 16, seed=4)]
    summaries, seconds = se.run_benchmark(surfaces, space, ["random", "tpe", "grid"], seeds=1, budget=12)
    by = {s.sampler: s for s in summaries}
    assert set(by) == {"random", "tpe", "grid"} and all(s.runs == 2 for s in summaries)
    assert by["grid"].evaluations == 12 and by["random"].evaluations == 12
    for s in summaries:
        assert s.regret[10] >= s.regret[20] >= s.regret[40] >= 0
    assert se.winner(summaries).sampler in ("random", "tpe")  # the fixed grid cannot be the default
    text = se.render(summaries, surfaces, 12, 0.01, seconds)
    assert "winner:" in text and "regret@40" in text and "153 lattice mixtures" in text
    for name in ("random", "tpe", "grid"):
        assert any(line.startswith(name) for line in text.splitlines())


def test_surface_from_a_results_table(se, space, surface, tmp_path):
    from dmo.results import ResultsTable, ScoreRow

    rows = [
        ScoreRow(
            "proxy",
            m,
            b,
            v,
            weights=Mixture.parse(m, space.domains).as_dict(),
            group=space.name,
            method=space.merge.method,
        )
        for m, s in surface.scores.items()
        for b, v in s.items()
    ]
    ResultsTable(tmp_path / "scores.jsonl").append(rows)
    again = se.surface_from_table(tmp_path / "scores.jsonl", space, 16)
    assert again.objective == pytest.approx(surface.objective)
    ResultsTable(tmp_path / "part.jsonl").append(rows[:30])
    with pytest.raises(SystemExit, match="lacks"):
        se.surface_from_table(tmp_path / "part.jsonl", space, 16)


def test_the_registered_replay_backend_answers_with_the_nearest_lattice_mixture(se, space, surface, tmp_path):
    from dmo.scoring.base import Target
    from dmo.scoring.replay_backend import ReplayScorer

    scorer = se.make_replay_scorer(surface, tmp_path)
    assert isinstance(scorer, ReplayScorer)
    own = se.ReplayScorer(surface)  # the script's fallback
    rng = np.random.default_rng(1)
    for w in rng.dirichlet([1, 1, 1], size=50):
        target = Target("proxy", mixture=Mixture(surface.domains, tuple(w)).canonical(), method="linear")
        want = surface.scores[surface.snap(target.mixture)]
        assert scorer.evaluate(target, space.benchmarks).scores == want
        assert own.evaluate(target, space.benchmarks).scores == want
