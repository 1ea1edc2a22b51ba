import math

import numpy as np
import pytest
from scipy import stats

from dmo.correlate import MEAN_RHO, MEAN_SCORE, _rowwise_spearman, correlate
from dmo.mixture import lattice
from dmo.results import ResultsTable, ScoreRow


def _table(tmp_path, rng, n_mix=10, benches=("b1", "b2"), ties=True):
    mixtures = lattice(["a", "b"], n_mix - 1)
    rows = []
    truth = {}
    for b in benches:
        for d in ("a", "b"):
            rows.append(ScoreRow("expert", d, b, float(rng.random())))
        for m in mixtures:
            # scores on a coarse grid so that ties occur, as with accuracy on a few hundred items
            q = (lambda v: round(v * 10) / 10) if ties else (lambda v: v)
            p = q(float(rng.random()))
            t0, t1 = q(float(rng.random())), q(float(rng.random()))
            truth[(m.id, b)] = (p, t0, t1)
            rows.append(ScoreRow("proxy", m.id, b, p, weights=m.as_dict(), group="g", method="linear"))
            rows.append(ScoreRow("trained", m.id, b, t0, weights=m.as_dict(), seed=0))
            rows.append(ScoreRow("trained", m.id, b, t1, weights=m.as_dict(), seed=1))
    t = ResultsTable(tmp_path / "scores.jsonl")
    t.append(rows)
    return t, mixtures, truth, rows


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_values_equal_scipy_on_random_data_with_ties(tmp_path, seed):
    rng = np.random.default_rng(seed)
    t, mixtures, truth, rows = _table(tmp_path, rng)
    out = correlate(t.frame(), n_boot=200, seed=0).set_index("benchmark")
    experts = {(r.mixture, r.benchmark): r.score for r in rows if r.kind == "expert"}
    for b in ("b1", "b2"):
        p = np.array([truth[(m.id, b)][0] for m in mixtures])
        y = np.array([(truth[(m.id, b)][1] + truth[(m.id, b)][2]) / 2 for m in mixtures])
        assert out.at[b, "spearman"] == pytest.approx(stats.spearmanr(p, y).statistic)
        assert out.at[b, "kendall"] == pytest.approx(stats.kendalltau(p, y).statistic)
        assert out.at[b, "pearson"] == pytest.approx(stats.pearsonr(p, y).statistic)
        base = np.array([m["a"] * experts[("a", b)] + m["b"] * experts[("b", b)] for m in mixtures])
        assert out.at[b, "baseline_spearman"] == pytest.approx(stats.spearmanr(base, y).statistic)
        s0 = [truth[(m.id, b)][1] for m in mixtures]
        s1 = [truth[(m.id, b)][2] for m in mixtures]
        assert out.at[b, "seed_spearman"] == pytest.approx(stats.spearmanr(s0, s1).statistic)
        assert out.at[b, "regret_at_1"] == pytest.approx(y.max() - y[p == p.max()].mean())
        assert out.at[b, "spearman_lo"] <= out.at[b, "spearman"] + 1e-9 <= out.at[b, "spearman_hi"] + 2e-9
        assert out.at[b, "n"] == len(mixtures)
    pm = np.mean([[truth[(m.id, b)][0] for b in ("b1", "b2")] for m in mixtures], axis=1)
    ym = np.mean([[sum(truth[(m.id, b)][1:]) / 2 for b in ("b1", "b2")] for m in mixtures], axis=1)
    assert out.at[MEAN_SCORE, "spearman"] == pytest.approx(stats.spearmanr(pm, ym).statistic)
    assert out.at[MEAN_RHO, "spearman"] == pytest.approx((out.at["b1", "spearman"] + out.at["b2", "spearman"]) / 2)


def test_rowwise_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(5)
    x = rng.integers(0, 4, size=(50, 12)).astype(float)
    y = rng.integers(0, 4, size=(50, 12)).astype(float)
    got = _rowwise_spearman(x, y)
    for i in range(50):
        want = stats.spearmanr(x[i], y[i]).statistic
        assert (math.isnan(want) and math.isnan(got[i])) or got[i] == pytest.approx(want)


def test_bootstrap_ci_is_seeded_and_shrinks_with_more_mixtures(tmp_path):
    rng = np.random.default_rng(0)
    t, *_ = _table(tmp_path, rng, n_mix=8, ties=False)
    a = correlate(t.frame(), n_boot=300, seed=1)
    b = correlate(t.frame(), n_boot=300, seed=1)
    assert a.equals(b)
    # a proxy equal to the truth: rho 1, CI collapsed at 1
    rows = []
    for m in lattice(["a", "b"], 30):
        v = m["a"] ** 2
        rows.append(ScoreRow("proxy", m.id, "x", v, weights=m.as_dict(), group="g", method="linear"))
        rows.append(ScoreRow("trained", m.id, "x", v, weights=m.as_dict(), seed=0))
    t2 = ResultsTable(tmp_path / "other.jsonl")
    t2.append(rows)
    out = correlate(t2.frame(), n_boot=200).set_index("benchmark")
    assert out.at["x", "spearman"] == pytest.approx(1.0)
    assert out.at["x", "spearman_lo"] == pytest.approx(1.0)
    assert out.at["x", "regret_at_1"] == 0.0


def test_no_trained_rows_gives_empty_table(tmp_path):
    t = ResultsTable(tmp_path / "s.jsonl")
    t.append([ScoreRow("proxy", "a-1", "x", 0.5, group="g", method="linear")])
    assert correlate(t.frame()).empty
