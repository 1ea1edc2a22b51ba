"""Calibrated objectives (dmo/calibration.py) against independent references on random inputs."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import Ridge

from dmo import calibration as cal
from dmo.errors import DmoError


def _simplex(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    return rng.dirichlet(np.ones(k), size=n)


@pytest.mark.parametrize("seed", range(20))
def test_isotonic_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 30))
    # rounded x: many ties, as proxy scores on a 200-item benchmark have
    x = np.round(rng.uniform(0, 1, n), 1)
    y = x + rng.normal(0, 0.3, n)
    x_new = rng.uniform(-0.2, 1.2, 50)
    ref = IsotonicRegression(out_of_bounds="clip").fit(x, y)
    np.testing.assert_allclose(cal.isotonic_predict(x, y, x_new), ref.predict(x_new), atol=1e-12)
    np.testing.assert_allclose(cal.isotonic_predict(x, y, x), ref.predict(x), atol=1e-12)


def test_isotonic_is_monotone_and_least_squares() -> None:
    rng = np.random.default_rng(1)
    x = rng.uniform(size=12)
    y = rng.normal(size=12)
    ux, fitted = cal.isotonic_fit(x, y)
    assert np.all(np.diff(fitted) >= -1e-12)
    # no other non-decreasing sequence does better: compare with a brute-force check on random monotone ones
    order = np.argsort(x)
    best = np.sum((fitted - y[order]) ** 2)
    for _ in range(2000):
        other = np.sort(rng.normal(size=12))
        assert np.sum((other - y[order]) ** 2) >= best - 1e-12
    np.testing.assert_array_equal(ux, np.sort(x))


def test_calibrate_isotonic_is_per_column() -> None:
    rng = np.random.default_rng(2)
    p, t, p_new = rng.uniform(size=(9, 3)), rng.uniform(size=(9, 3)), rng.uniform(size=(5, 3))
    out = cal.calibrate_isotonic(p, t, p_new)
    for b in range(3):
        ref = IsotonicRegression(out_of_bounds="clip").fit(p[:, b], t[:, b]).predict(p_new[:, b])
        np.testing.assert_allclose(out[:, b], ref, atol=1e-12)


def _ridge_reference(x: np.ndarray, y: np.ndarray, x_new: np.ndarray, alpha: float) -> np.ndarray:
    """Ridge with an unpenalised intercept on standardised features, by numpy lstsq on the augmented system."""
    mu, sd = x.mean(axis=0), x.std(axis=0)
    keep = sd > 1e-12
    xs, xn = (x[:, keep] - mu[keep]) / sd[keep], (x_new[:, keep] - mu[keep]) / sd[keep]
    xc, yc = xs - xs.mean(axis=0), y - y.mean()  # xs is centred already; kept for clarity
    p = xs.shape[1]
    aug_x = np.vstack([xc, math.sqrt(alpha) * np.eye(p)])
    aug_y = np.concatenate([yc, np.zeros(p)])
    beta = np.linalg.lstsq(aug_x, aug_y, rcond=None)[0]
    return y.mean() + xn @ beta


def _loo_alpha(x: np.ndarray, y: np.ndarray) -> float:
    """The penalty of RIDGE_ALPHAS with the least leave-one-out error, by refitting n times (no shortcut)."""
    from dmo.calibration import regression_features  # noqa: F401 - same module the code uses

    try:
        from dmo.analysis.correlate import RIDGE_ALPHAS
    except ImportError:  # pragma: no cover
        from dmo.correlate import RIDGE_ALPHAS
    best, best_err = None, math.inf
    mu, sd = x.mean(axis=0), x.std(axis=0)
    keep = sd > 1e-12
    xs = (x[:, keep] - mu[keep]) / sd[keep]  # standardised once on all points, as the closed form does
    for alpha in RIDGE_ALPHAS:
        errs = []
        for i in range(len(y)):
            rest = np.arange(len(y)) != i
            xr, yr = xs[rest], y[rest]
            xm = xr.mean(axis=0)
            beta = np.linalg.solve(
                (xr - xm).T @ (xr - xm) + alpha * np.eye(xs.shape[1]), (xr - xm).T @ (yr - yr.mean())
            )
            errs.append((y[i] - (yr.mean() + (xs[i] - xm) @ beta)) ** 2)
        err = float(np.mean(errs))
        if err < best_err - 1e-15:
            best, best_err = float(alpha), err
    assert best is not None
    return best


@pytest.mark.parametrize("seed", range(8))
def test_regression_matches_lstsq_ridge(seed: int) -> None:
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 5))
    w, w_new = _simplex(rng, 12, k), _simplex(rng, 6, k)
    y = rng.normal(size=(12, 2))
    out = cal.regression_predict(w, y, w_new)
    x, x_new = cal.regression_features(w), cal.regression_features(w_new)
    # the features by hand: weights, then products of each pair
    pairs = [w[:, i] * w[:, j] for i, j in itertools.combinations(range(k), 2)]
    np.testing.assert_allclose(x, np.column_stack([w, *pairs]) if pairs else w)
    for b in range(2):
        alpha = _loo_alpha(x, y[:, b])
        np.testing.assert_allclose(out[:, b], _ridge_reference(x, y[:, b], x_new, alpha), atol=1e-8)
        # and scikit-learn's Ridge on the same standardised features agrees
        mu, sd = x.mean(axis=0), x.std(axis=0)
        keep = sd > 1e-12
        model = Ridge(alpha=alpha).fit((x[:, keep] - mu[keep]) / sd[keep], y[:, b])
        np.testing.assert_allclose(out[:, b], model.predict((x_new[:, keep] - mu[keep]) / sd[keep]), atol=1e-8)


@pytest.mark.parametrize("seed", range(6))
def test_hybrid_and_residual_against_lstsq(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    k = 3
    w, w_new = _simplex(rng, 10, k), _simplex(rng, 5, k)
    p, p_new = rng.uniform(size=(10, 2)), rng.uniform(size=(5, 2))
    t = 0.5 * p + rng.normal(0, 0.1, size=(10, 2))
    hyb = cal.hybrid_predict(w, p, t, w_new, p_new)
    res = cal.residual_predict(w, p, t, w_new, p_new)
    fw, fw_new = cal.regression_features(w), cal.regression_features(w_new)
    for b in range(2):
        x = np.column_stack([fw, p[:, b]])
        xn = np.column_stack([fw_new, p_new[:, b]])
        np.testing.assert_allclose(hyb[:, b], _ridge_reference(x, t[:, b], xn, _loo_alpha(x, t[:, b])), atol=1e-8)
        r = t[:, b] - p[:, b]
        ref = p_new[:, b] + _ridge_reference(fw, r, fw_new, _loo_alpha(fw, r))
        np.testing.assert_allclose(res[:, b], ref, atol=1e-8)


def test_residual_with_exact_proxy_is_the_proxy() -> None:
    rng = np.random.default_rng(3)
    w, w_new = _simplex(rng, 6, 3), _simplex(rng, 4, 3)
    p, p_new = rng.uniform(size=(6, 2)), rng.uniform(size=(4, 2))
    np.testing.assert_allclose(cal.residual_predict(w, p, p, w_new, p_new), p_new, atol=1e-12)


def test_select_option_least_squares_and_first_on_ties() -> None:
    rng = np.random.default_rng(4)
    truth = rng.uniform(size=(7, 3))
    options = rng.uniform(size=(5, 7, 3))
    sse = ((options - truth) ** 2).sum(axis=(1, 2))
    assert cal.select_option(options, truth) == int(np.argmin(sse))
    options[3] = truth
    options[1] = truth
    assert cal.select_option(options, truth) == 1
    with pytest.raises(DmoError, match="shape"):
        cal.select_option(options[:, :4], truth)


@pytest.mark.parametrize(("n", "k"), [(7, 0), (7, 2), (7, 4), (21, 4), (20, 8)])
def test_draws(n: int, k: int) -> None:
    d = cal.draws(n, k, 200, seed=1)
    if math.comb(n, k) <= 200:
        assert [tuple(r) for r in d] == list(itertools.combinations(range(n), k))
    else:
        assert d.shape == (200, k)
        assert all(len(set(r)) == k for r in d)
        assert np.array_equal(d, cal.draws(n, k, 200, seed=1))
    assert d.shape[1] == k


def test_heldout_metrics() -> None:
    rng = np.random.default_rng(5)
    pred, truth = rng.uniform(size=9), rng.uniform(size=9)
    rho, regret = cal.heldout_metrics(pred, truth)
    assert rho == pytest.approx(stats.spearmanr(pred, truth)[0])
    assert regret == pytest.approx(truth.max() - truth[np.argmax(pred)])
    # ties for first place: the mean of the tied mixtures' truth
    pred = np.array([1.0, 1.0, 0.0])
    assert cal.heldout_metrics(pred, np.array([0.2, 0.6, 0.9]))[1] == pytest.approx(0.9 - 0.4)


def test_median_ci_brackets_median() -> None:
    v = np.random.default_rng(6).normal(size=300)
    med, lo, hi = cal.median_ci(v, seed=0)
    assert med == pytest.approx(np.median(v))
    assert lo < med < hi
    assert all(math.isnan(x) for x in cal.median_ci(np.array([np.nan])))


def test_weight_transform() -> None:
    w = np.array([[0.25, 0.75, 0.0], [0.5, 0.25, 0.25]])
    out = cal.weight_transform(w, 0.5)
    ref = np.sqrt(w) / np.sqrt(w).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(out, ref)
    np.testing.assert_allclose(cal.weight_transform(w, 1.0), w)
    assert out[0, 2] == 0.0
    with pytest.raises(DmoError, match="gamma"):
        cal.weight_transform(w, 0.0)


def test_too_few_trained_mixtures_refused_in_one_line() -> None:
    assert {m: cal.min_trained(m) for m in cal.CALIBRATIONS} == {
        "regression": 0,
        "isotonic": 0,
        "scale": 1,
        "hybrid": 2,
        "residual": 0,
    }
    for method in cal.CALIBRATIONS:
        cal.check_trained(method, cal.min_trained(method))
    with pytest.raises(DmoError) as err:
        cal.check_trained("hybrid", 1)
    msg = str(err.value)
    assert "needs at least 2 trained mixtures" in msg and "got 1" in msg and "\n" not in msg
    with pytest.raises(DmoError, match="needs at least 1 trained mixture "):
        cal.check_trained("scale", 0)
    with pytest.raises(DmoError, match="unknown calibration"):
        cal.min_trained("magic")
