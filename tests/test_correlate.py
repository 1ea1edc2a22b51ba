import math

import numpy as np
import pytest
from scipy import stats

from dmo.analysis.correlate import MEAN_RHO, MEAN_SCORE, _rowwise_spearman, correlate
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


# --- permutation p-values, top-k overlap, the regression baseline ---------------------------------------------

from dmo.analysis.correlate import (  # noqa: E402
    RIDGE_ALPHAS,
    permutation_indices,
    permutation_pvalue,
    regression_features,
    regression_loo,
    ridge_loo_mse,
    ridge_predict,
    spearman,
    topk_overlap,
)


def spearman_permutation_test(x: np.ndarray, y: np.ndarray, n_perm: int = 1000, seed: int = 0) -> float:
    """The proxy rho's p-value as correlate computes it for a row (its permutations, null and p-value)."""
    perms, exact = permutation_indices(len(x), n_perm, seed)
    return permutation_pvalue(_rowwise_spearman(x[perms], np.broadcast_to(y, perms.shape)), spearman(x, y), exact)


def _scipy_perm_p(x, y, n_perm, seed):
    return stats.permutation_test(
        (x,),
        lambda a: stats.spearmanr(a, y).statistic,
        permutation_type="pairings",
        n_resamples=n_perm,
        rng=seed,
        vectorized=False,
    ).pvalue


@pytest.mark.parametrize("n", [4, 6, 9, 14])
def test_permutation_pvalue_equals_scipys_permutation_test_with_ties(n):
    rng = np.random.default_rng(n)
    for _ in range(3):
        x = rng.integers(0, 4, n).astype(float)
        y = (x * rng.random() + rng.integers(0, 4, n)).astype(float)  # weakly related, tied
        if np.ptp(x) == 0 or np.ptp(y) == 0:
            continue
        assert spearman_permutation_test(x, y, n_perm=999, seed=3) == pytest.approx(_scipy_perm_p(x, y, 999, 3))


def test_permutations_are_exact_when_all_fit():
    perms, exact = permutation_indices(5, 1000, seed=0)
    assert exact and len(perms) == 120 and len({tuple(p) for p in perms}) == 120
    perms, exact = permutation_indices(8, 1000, seed=0)
    assert not exact and perms.shape == (1000, 8)
    assert (np.sort(perms, axis=1) == np.arange(8)).all()


def test_correlate_pvalues_equal_scipy_per_benchmark_and_jointly_for_mean_rho(tmp_path):
    rng = np.random.default_rng(4)
    t, mixtures, truth, _ = _table(tmp_path, rng, n_mix=9)
    out = correlate(t.frame(), n_boot=50, seed=5, n_perm=500).set_index("benchmark")
    mixtures = sorted(mixtures, key=lambda m: m.id)  # the order correlate() uses, which the random draws follow
    xs, ys = {}, {}
    for b in ("b1", "b2"):
        xs[b] = np.array([truth[(m.id, b)][0] for m in mixtures])
        ys[b] = np.array([(truth[(m.id, b)][1] + truth[(m.id, b)][2]) / 2 for m in mixtures])
        assert out.at[b, "spearman_p"] == pytest.approx(_scipy_perm_p(xs[b], ys[b], 500, 5))
    # mean rho: one permutation of the mixtures applied to both benchmarks at once
    n = len(mixtures)

    def mean_rho(idx):
        idx = idx.astype(int)
        return np.mean([stats.spearmanr(xs[b][idx], ys[b]).statistic for b in ("b1", "b2")])

    want = stats.permutation_test(
        (np.arange(n, dtype=float),),
        mean_rho,
        permutation_type="pairings",
        n_resamples=500,
        rng=5,
        vectorized=False,
    ).pvalue
    assert out.at[MEAN_RHO, "spearman_p"] == pytest.approx(want)
    assert out.at[MEAN_SCORE, "spearman_p"] == pytest.approx(
        _scipy_perm_p(np.mean([xs["b1"], xs["b2"]], axis=0), np.mean([ys["b1"], ys["b2"]], axis=0), 500, 5)
    )


def _topk_brute(x, y, k):
    """Average overlap over every way of breaking the ties of x and of y (independently)."""
    import itertools

    def shares(v):
        count = np.zeros(len(v))
        perms = list(itertools.permutations(range(len(v))))
        for tiebreak in perms:
            order = sorted(range(len(v)), key=lambda i: (-v[i], tiebreak[i]))
            count[order[:k]] += 1
        return count / len(perms)

    return float(np.sum(shares(x) * shares(y)) / k)


def test_topk_overlap_is_the_expectation_over_random_tie_breaking():
    rng = np.random.default_rng(0)
    for k in (1, 2, 3):
        for _ in range(5):
            x = rng.integers(0, 3, 6).astype(float)
            y = rng.integers(0, 3, 6).astype(float)
            assert topk_overlap(x, y, k) == pytest.approx(_topk_brute(x, y, k))
    assert topk_overlap([1, 2, 3, 4], [10, 20, 30, 40], 3) == 1.0
    assert topk_overlap([4, 3, 2, 1], [10, 20, 30, 40], 2) == 0.0
    assert math.isnan(topk_overlap([1, 2, 3], [1, 2, 3], 3))  # no more mixtures than k: trivially 1, not shown


def test_ridge_closed_form_loo_error_equals_refitting():
    rng = np.random.default_rng(2)
    x = regression_features(rng.dirichlet([1, 1, 1], size=15))
    x = (x - x.mean(axis=0)) / x.std(axis=0)  # standardised once, so the refits below see the same features
    y = rng.random(15)
    alphas = np.array([1e-4, 0.1, 1.0, 30.0])
    for alpha, got in zip(alphas, ridge_loo_mse(x, y, alphas)):
        errs = []
        for i in range(15):
            rest = np.arange(15) != i
            xr, yr = x[rest], y[rest]
            xm, ym = xr.mean(axis=0), yr.mean()
            beta = np.linalg.solve((xr - xm).T @ (xr - xm) + alpha * np.eye(x.shape[1]), (xr - xm).T @ (yr - ym))
            errs.append((ym + (x[i] - xm) @ beta - y[i]) ** 2)
        assert got == pytest.approx(np.mean(errs), rel=1e-8)


def test_regression_baseline_is_leave_one_out():
    rng = np.random.default_rng(3)
    w = rng.dirichlet([1, 1, 1], size=12)
    y = rng.random(12)
    pred = regression_loo(w, y)
    y2 = y.copy()
    y2[4] += 10.0  # a held-out mixture's own score must not move its prediction
    assert regression_loo(w, y2)[4] == pytest.approx(pred[4])
    assert pred[4] == pytest.approx(
        ridge_predict(np.delete(regression_features(w), 4, 0), np.delete(y, 4), regression_features(w)[4:5])[0]
    )
    assert regression_loo(w[:3], y[:3]) is None
    # a surface that is quadratic in the weights is recovered from the other mixtures
    quad = 0.2 + w[:, 0] - 2 * w[:, 1] * w[:, 2] + 0.5 * w[:, 0] ** 2
    assert np.allclose(regression_loo(w, quad), quad, atol=1e-3)
    assert RIDGE_ALPHAS.min() > 0


def test_correlate_reports_regression_baseline_and_topk(tmp_path):
    rng = np.random.default_rng(7)
    t, mixtures, truth, _ = _table(tmp_path, rng, n_mix=10)
    out = correlate(t.frame(), n_boot=100, seed=0, k=2).set_index("benchmark")
    w = np.array([m.weights for m in mixtures])
    for b in ("b1", "b2"):
        x = np.array([truth[(m.id, b)][0] for m in mixtures])
        y = np.array([(truth[(m.id, b)][1] + truth[(m.id, b)][2]) / 2 for m in mixtures])
        assert out.at[b, "regression_spearman"] == pytest.approx(stats.spearmanr(regression_loo(w, y), y).statistic)
        assert out.at[b, "regression_lo"] <= out.at[b, "regression_hi"]
        assert out.at[b, "topk_overlap"] == pytest.approx(topk_overlap(x, y, 2))
        assert out.at[b, "k"] == 2
    assert out.at[MEAN_RHO, "regression_spearman"] == pytest.approx(
        (out.at["b1", "regression_spearman"] + out.at["b2", "regression_spearman"]) / 2
    )
    assert out.at[MEAN_RHO, "topk_overlap"] == pytest.approx(
        (out.at["b1", "topk_overlap"] + out.at["b2", "topk_overlap"]) / 2
    )


def test_groups_are_separate_and_ignore_other_groups_domains(tmp_path):
    """A 2-domain and a 3-domain space in one table: one block of rows each, each with its own weights."""
    rng = np.random.default_rng(11)
    rows = []
    for group, mixtures in (("two", lattice(["a", "b"], 6)), ("three", lattice(["a", "b", "c"], 3))):
        for m in mixtures:
            v = float(rng.random())
            rows.append(
                ScoreRow(
                    "proxy", m.id, "x", v + 0.1 * float(rng.random()), weights=m.as_dict(), group=group, method="linear"
                )
            )
            rows.append(ScoreRow("trained", m.id, "x", v, weights=m.as_dict(), seed=0))
    t = ResultsTable(tmp_path / "s.jsonl")
    t.append(rows)
    out = correlate(t.frame(), n_boot=50)
    assert set(out["group"]) == {"two", "three"}
    three = out[(out["group"] == "three") & (out["benchmark"] == "x")].iloc[0]
    assert three["n"] == 10 and not math.isnan(three["regression_spearman"])
    assert out[(out["group"] == "two") & (out["benchmark"] == "x")].iloc[0]["n"] == 7


def test_regression_baseline_needs_weights():
    assert regression_loo(np.zeros((6, 0)), np.arange(6.0)) is None
    assert regression_loo(np.full((6, 2), 0.5), np.arange(6.0)) is None  # one mixture, repeated
