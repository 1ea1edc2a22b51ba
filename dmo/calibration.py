"""Calibrated objectives: a merged proxy corrected with a few models really trained on mixtures.

A proxy can rank mixtures badly where merging and training disagree (on the tiny world, the OCR expert forgets
counting, the merged proxy inherits that in proportion to the OCR weight, the model trained on that mixture does
not). A few trained mixtures can correct it. The experts are free anchors: each one *is* a model trained on
the pure domain (the vertex of the simplex) with the same budget, so every fit below gets the K vertices as
exact points on top of the k trained mixtures.

Each calibration is a pure function from fitting points to predictions at new mixtures:

- ``regression``: ridge regression on the weights and their pairwise products (RegMix-style; no proxy), the
  baseline every calibration must beat with the same k;
- ``isotonic``: a per-benchmark monotone (non-decreasing) map proxy score -> trained score, linear between the
  fitted points and flat beyond them, as scikit-learn's ``IsotonicRegression(out_of_bounds="clip")``;
- ``scale``: the proxy option of a fixed grid (merge scale lambda, weight transform gamma) whose scores are
  closest to the trained scores at the fitting points (least squares over points and benchmarks);
- ``hybrid``: ridge regression on the weight features plus the proxy's score;
- ``residual``: the proxy plus a ridge correction on the weight features (fitted to trained - proxy), which
  shrinks towards the proxy itself rather than towards a constant.

:func:`min_trained` says how many trained mixtures (besides the vertices) each one needs; fewer are refused.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

from dmo.errors import DmoError

try:  # the package is being reorganised: dmo.correlate moves to dmo.analysis.correlate
    from dmo.analysis.correlate import regression_features, ridge_predict, spearman
except ImportError:  # pragma: no cover - the layout before the move
    from dmo.correlate import regression_features, ridge_predict, spearman  # type: ignore[no-redef]

#: Trained mixtures (besides the K experts at the vertices) each calibration needs, and why.
MIN_TRAINED: dict[str, tuple[int, str]] = {
    # K >= 2 vertices already give K points and a linear fit through them (the expert-mix baseline)
    "regression": (0, "the experts alone fit its linear terms"),
    # the vertices give K points per benchmark to map through
    "isotonic": (0, "the experts alone give its map K points"),
    # a weight transform w^gamma leaves every vertex where it is, so the vertices cannot tell gammas apart
    "scale": (1, "the weight transform gamma leaves the vertices unchanged, so only a mixture inside tells"),
    # at the vertices an exact proxy equals the trained score, which the weights' linear terms also fit
    # exactly: proxy and weights are confounded until two mixtures inside the simplex separate them
    "hybrid": (2, "at the vertices the proxy and the weights explain the experts equally well"),
    # no correction is the fit's starting point, so the vertices alone suffice
    "residual": (0, "the correction starts from the proxy itself"),
}
CALIBRATIONS: tuple[str, ...] = tuple(MIN_TRAINED)


def min_trained(method: str) -> int:
    """How many trained mixtures (besides the experts) ``method`` needs."""
    if method not in MIN_TRAINED:
        raise DmoError(f"unknown calibration {method!r}: choose one of {', '.join(CALIBRATIONS)}")
    return MIN_TRAINED[method][0]


def check_trained(method: str, n_trained: int) -> None:
    """Refuse a calibration asked for with fewer trained mixtures than it needs, in one line."""
    need = min_trained(method)
    if n_trained < need:
        raise DmoError(
            f"calibration {method!r} needs at least {need} trained mixture{'s' if need != 1 else ''} besides the "
            f"experts ({MIN_TRAINED[method][1]}); got {n_trained}: train more mixtures or use 'isotonic' or "
            "'residual', which need none"
        )


# ------------------------------------------------------------------------------------------- isotonic map


def isotonic_fit(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares non-decreasing fit of y on x: ``(distinct x sorted, fitted value at each)``.

    Points with equal x are pooled first (their mean, weighted by their count), then pool-adjacent-violators,
    as scikit-learn does.
    """
    x, y = np.asarray(x, float).ravel(), np.asarray(y, float).ravel()
    if len(x) != len(y) or len(x) == 0:
        raise DmoError(f"isotonic fit needs as many x as y values, at least one; got {len(x)} and {len(y)}")
    ux, inverse = np.unique(x, return_inverse=True)
    weight = np.bincount(inverse).astype(float)
    mean = np.bincount(inverse, weights=y) / weight
    # pool adjacent violators: a stack of blocks (value, weight, length)
    vals: list[float] = []
    wts: list[float] = []
    lens: list[int] = []
    for v, w in zip(mean, weight):
        vals.append(float(v))
        wts.append(float(w))
        lens.append(1)
        while len(vals) > 1 and vals[-2] > vals[-1]:
            w2 = wts[-2] + wts[-1]
            v2 = (vals[-2] * wts[-2] + vals[-1] * wts[-1]) / w2
            n2 = lens[-2] + lens[-1]
            del vals[-1], wts[-1], lens[-1]
            vals[-1], wts[-1], lens[-1] = v2, w2, n2
    return ux, np.repeat(vals, lens)


def isotonic_predict(x: np.ndarray, y: np.ndarray, x_new: np.ndarray) -> np.ndarray:
    """The isotonic fit of y on x evaluated at ``x_new``: linear between fitted points, flat beyond them."""
    ux, fitted = isotonic_fit(x, y)
    return np.interp(np.asarray(x_new, float), ux, fitted)


def calibrate_isotonic(proxy: np.ndarray, truth: np.ndarray, proxy_new: np.ndarray) -> np.ndarray:
    """Per benchmark (column), the isotonic map proxy -> trained fitted on (proxy, truth), applied to proxy_new."""
    proxy, truth, proxy_new = _2d(proxy), _2d(truth), _2d(proxy_new)
    return np.column_stack([isotonic_predict(proxy[:, b], truth[:, b], proxy_new[:, b]) for b in range(truth.shape[1])])


# ------------------------------------------------------------------------------------- a proxy option of a grid


def select_option(options: np.ndarray, truth: np.ndarray) -> int:
    """Index of the option whose scores are closest to ``truth`` (least squares over points and benchmarks).

    ``options`` has shape (O, m, B): option o's proxy scores at the m fitting points; ``truth`` (m, B). Ties
    go to the first option, so put the uncalibrated proxy first.
    """
    options, truth = np.asarray(options, float), _2d(truth)
    if options.ndim == 2:
        options = options[:, :, None]
    if options.shape[1:] != truth.shape:
        raise DmoError(f"options have shape {options.shape[1:]} per option, the trained scores {truth.shape}")
    sse = ((options - truth[None]) ** 2).sum(axis=(1, 2))
    # equal up to rounding counts as a tie, so the first (uncalibrated) option keeps its place
    return int(np.flatnonzero(sse <= sse.min() + 1e-12)[0])


# ------------------------------------------------------------------------------------------------ regressions


def regression_predict(weights: np.ndarray, truth: np.ndarray, weights_new: np.ndarray) -> np.ndarray:
    """Per benchmark (column), ridge on the weights and pairwise products (the penalty by leave-one-out)."""
    x, x_new, truth = regression_features(weights), regression_features(weights_new), _2d(truth)
    return np.column_stack([ridge_predict(x, truth[:, b], x_new) for b in range(truth.shape[1])])


def hybrid_predict(
    weights: np.ndarray, proxy: np.ndarray, truth: np.ndarray, weights_new: np.ndarray, proxy_new: np.ndarray
) -> np.ndarray:
    """Per benchmark, ridge on the weight features plus that benchmark's proxy score."""
    proxy, truth, proxy_new = _2d(proxy), _2d(truth), _2d(proxy_new)
    fw, fw_new = regression_features(weights), regression_features(weights_new)
    return np.column_stack(
        [
            ridge_predict(np.column_stack([fw, proxy[:, b]]), truth[:, b], np.column_stack([fw_new, proxy_new[:, b]]))
            for b in range(truth.shape[1])
        ]
    )


def residual_predict(
    weights: np.ndarray, proxy: np.ndarray, truth: np.ndarray, weights_new: np.ndarray, proxy_new: np.ndarray
) -> np.ndarray:
    """Per benchmark, the proxy plus a ridge fit of (trained - proxy) on the weight features."""
    proxy, proxy_new = _2d(proxy), _2d(proxy_new)
    return proxy_new + regression_predict(weights, _2d(truth) - proxy, weights_new)


# ------------------------------------------------------------------------------------------ cross-validation


def draws(n: int, k: int, n_draws: int, seed: int = 0) -> np.ndarray:
    """Which k of n mixtures are trained, one row per draw: every subset when there are at most ``n_draws``
    (in lexicographic order), else ``n_draws`` random ones (each without repeats, seeded)."""
    if not 0 <= k <= n:
        raise DmoError(f"cannot draw {k} of {n} mixtures")
    if math.comb(n, k) <= n_draws:
        combos = list(itertools.combinations(range(n), k))
        return np.array(combos, dtype=np.intp).reshape(len(combos), k)
    rng = np.random.default_rng(seed)
    return np.sort(np.array([rng.choice(n, size=k, replace=False) for _ in range(n_draws)], dtype=np.intp), axis=1)


def heldout_metrics(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(Spearman rho, regret@1) of predictions against the truth; regret averages over predictions tied first."""
    pred, truth = np.asarray(pred, float), np.asarray(truth, float)
    top = np.flatnonzero(pred == np.max(pred))
    return spearman(pred, truth), float(np.max(truth) - np.mean(truth[top]))


def median_ci(values: np.ndarray, n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """(median, 2.5 and 97.5 percentiles of the bootstrap medians) of the finite values (NaN when none)."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return math.nan, math.nan, math.nan
    boot = np.median(v[np.random.default_rng(seed).integers(0, len(v), size=(n_boot, len(v)))], axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return float(np.median(v)), float(lo), float(hi)


def weight_transform(weights: np.ndarray, gamma: float) -> np.ndarray:
    """w_i^gamma, renormalised per mixture (zero weights stay zero)."""
    w = np.asarray(weights, float)
    if gamma <= 0:
        raise DmoError(f"the weight transform's gamma must be > 0, got {gamma}")
    out = np.where(w > 0, np.power(np.where(w > 0, w, 1.0), gamma), 0.0)
    total = out.sum(axis=-1, keepdims=True)
    if np.any(total <= 0):
        raise DmoError("a mixture with no positive weight cannot be transformed")
    return out / total


def _2d(a: np.ndarray | Sequence[float]) -> np.ndarray:
    a = np.asarray(a, float)
    return a[:, None] if a.ndim == 1 else a
