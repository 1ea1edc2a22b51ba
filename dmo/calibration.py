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
:func:`calibrated_predict` applies any of them but ``scale`` (:data:`SCORE_CALIBRATIONS`: those that map a proxy's
scores, what a study's calibrated objective and ``dmo correlate``'s calibrated rho use, by :func:`loo_predict`).
The ridge regression and Spearman's rho live here too, so that dmo.analysis.correlate can use this module.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats

from dmo.errors import DmoError

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


# ------------------------------------------------------------------------------------ ridge and rank correlation
# Here rather than in dmo.analysis.correlate (which re-exports them) so that the correlation table can use the
# calibrations below without an import cycle.

#: Ridge penalties tried by the regression baseline; the one with the least inner leave-one-out error wins.
RIDGE_ALPHAS = np.logspace(-6, 3, 19)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho; NaN with fewer than 2 points or a constant side (where scipy warns)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(stats.spearmanr(x, y)[0])


def regression_features(weights: np.ndarray) -> np.ndarray:
    """The weights and their pairwise products (RegMix's regression inputs, with interactions)."""
    w = np.asarray(weights, float)
    pairs = [w[:, i] * w[:, j] for i, j in itertools.combinations(range(w.shape[1]), 2)]
    return np.column_stack([w, *pairs]) if pairs else w


def _standardise(x: np.ndarray, x_new: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre and scale the training features (dropping constant ones); the same transform for x_new."""
    mu, sd = x.mean(axis=0), x.std(axis=0)
    keep = sd > 1e-12
    return (x[:, keep] - mu[keep]) / sd[keep], (x_new[:, keep] - mu[keep]) / sd[keep]


def ridge_loo_mse(x: np.ndarray, y: np.ndarray, alphas: np.ndarray = RIDGE_ALPHAS) -> np.ndarray:
    """Leave-one-out mean squared error of a ridge fit for each penalty, in closed form (no refits).

    The features are standardised once on all of (x, y); with an unpenalised intercept the hat matrix is
    H = 1/m + Xc (Xc'Xc + a I)^-1 Xc' and the held-out residual of point i is e_i / (1 - H_ii).
    """
    xs, _ = _standardise(x, x[:0])
    yc = y - y.mean()
    u, s, _ = np.linalg.svd(xs, full_matrices=False)
    uty = u.T @ yc
    out = np.empty(len(alphas))
    for j, alpha in enumerate(alphas):
        shrink = s**2 / (s**2 + alpha)
        h = (u**2) @ shrink + 1.0 / len(y)
        with np.errstate(divide="ignore", invalid="ignore"):
            out[j] = np.mean(((yc - u @ (shrink * uty)) / (1.0 - h)) ** 2)
    return out


def ridge_predict(x: np.ndarray, y: np.ndarray, x_new: np.ndarray, alpha: float | None = None) -> np.ndarray:
    """Ridge regression on standardised features with an unpenalised intercept, evaluated at ``x_new``.

    Without ``alpha``, the penalty of :data:`RIDGE_ALPHAS` with the least leave-one-out error on (x, y) is used.
    """
    xs, xn = _standardise(x, x_new)
    if xs.shape[1] == 0:
        return np.full(len(x_new), y.mean())
    if alpha is None:
        mse = ridge_loo_mse(x, y)
        ok = np.isfinite(mse)
        alpha = float(RIDGE_ALPHAS[ok][np.argmin(mse[ok])]) if ok.any() else float(RIDGE_ALPHAS[-1])
    u, s, vt = np.linalg.svd(xs, full_matrices=False)
    beta = vt.T @ (s / (s**2 + alpha) * (u.T @ (y - y.mean())))
    return y.mean() + xn @ beta


def ridge_loo_many(
    x: np.ndarray, y: np.ndarray, anchor_x: np.ndarray | None = None, anchor_y: np.ndarray | None = None
) -> np.ndarray:
    """Leave-one-out predictions of :func:`ridge_predict` for many targets at once: column c of the result, row i, is
    ``ridge_predict(x_fit, y_fit[:, c], x[i:i+1])[0]`` with the fit on the anchors plus every row but i (each column
    choosing its own penalty). The factorisation of each fit's features is shared by all columns, which is what makes
    a bootstrap of a leave-one-out regression affordable."""
    x, y = np.asarray(x, float), np.asarray(y, float).reshape(len(x), -1)
    ax = np.zeros((0, x.shape[1])) if anchor_x is None else np.asarray(anchor_x, float)
    ay = np.zeros((0, y.shape[1])) if anchor_y is None else np.asarray(anchor_y, float).reshape(len(ax), -1)
    n = len(x)
    out = np.empty((n, y.shape[1]))
    for i in range(n):
        rest = np.arange(n) != i
        xf, yf = np.vstack([ax, x[rest]]), np.vstack([ay, y[rest]])
        xs, xn = _standardise(xf, x[i : i + 1])
        mean = yf.mean(axis=0)
        if xs.shape[1] == 0:
            out[i] = mean
            continue
        u, sv, vt = np.linalg.svd(xs, full_matrices=False)
        yc = yf - mean
        uty = u.T @ yc
        mse = np.empty((len(RIDGE_ALPHAS), y.shape[1]))
        for j, alpha in enumerate(RIDGE_ALPHAS):
            shrink = sv**2 / (sv**2 + alpha)
            h = (u**2) @ shrink + 1.0 / len(yf)
            with np.errstate(divide="ignore", invalid="ignore"):
                mse[j] = np.mean(((yc - u @ (shrink[:, None] * uty)) / (1.0 - h)[:, None]) ** 2, axis=0)
        finite = np.isfinite(mse)
        best = np.where(finite.any(axis=0), np.argmin(np.where(finite, mse, np.inf), axis=0), len(RIDGE_ALPHAS) - 1)
        alpha = RIDGE_ALPHAS[best]
        beta = vt.T @ ((sv[:, None] / (sv[:, None] ** 2 + alpha[None, :])) * uty)
        out[i] = mean + (xn @ beta)[0]
    return out


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


# ------------------------------------------------------------------------------- calibrated objectives and tables

#: The calibration `dmo correlate` reports and a space's ``objective: {calibrate: {}}`` uses when it names none: what
#: benchmarks/proxy_fidelity.py's pre-registered decision rule picked (benchmarks/results/proxy_fidelity.json,
#: ``decision.default``): regression alone. Its best calibrated candidate (residual on the svd proxy) beat regression
#: by more than its CI in 3d and 4d but not in 2d, where every method ranks the held-out mixtures perfectly, so by the
#: rule the default stays regression. Name ``residual``, ``hybrid`` or ``isotonic`` to calibrate the proxy instead.
DEFAULT_CALIBRATION = "regression"
#: Calibrations that map a mixture and its proxy's scores to predicted trained scores (what a study objective and
#: the correlation table need); ``scale`` instead picks another proxy (merge option), which changes what is scored.
SCORE_CALIBRATIONS: tuple[str, ...] = tuple(m for m in CALIBRATIONS if m != "scale")


def check_score_calibration(method: str) -> None:
    """Refuse, in one line, a calibration that does not map proxy scores (or is unknown)."""
    if method not in MIN_TRAINED:
        raise DmoError(f"unknown calibration {method!r}: choose one of {', '.join(SCORE_CALIBRATIONS)}")
    if method not in SCORE_CALIBRATIONS:
        raise DmoError(
            f"calibration {method!r} picks a proxy option instead of mapping a proxy's scores, which a study objective "
            f"cannot do: use one of {', '.join(SCORE_CALIBRATIONS)}"
        )


def calibrated_predict(
    method: str,
    weights: np.ndarray,
    proxy: np.ndarray,
    truth: np.ndarray,
    weights_new: np.ndarray,
    proxy_new: np.ndarray,
) -> np.ndarray:
    """Predicted trained scores (n_new, B) at new mixtures by ``method``, fitted per benchmark on the points
    (weights (m, K), proxy scores (m, B), trained scores (m, B)); the experts belong among the points."""
    check_score_calibration(method)
    proxy, truth, proxy_new = _2d(proxy), _2d(truth), _2d(proxy_new)
    weights, weights_new = np.asarray(weights, float), np.asarray(weights_new, float)
    if method == "isotonic":
        return calibrate_isotonic(proxy, truth, proxy_new)
    if method == "regression":
        return regression_predict(weights, truth, weights_new)
    fit = hybrid_predict if method == "hybrid" else residual_predict
    return np.column_stack(
        [fit(weights, proxy[:, b], truth[:, b], weights_new, proxy_new[:, b])[:, 0] for b in range(truth.shape[1])]
    )


def loo_predict(
    method: str,
    weights: np.ndarray,
    proxy: np.ndarray,
    truth: np.ndarray,
    anchor_weights: np.ndarray | None = None,
    anchor_proxy: np.ndarray | None = None,
    anchor_truth: np.ndarray | None = None,
) -> np.ndarray | None:
    """Leave-one-out predicted trained scores (n, B) of n trained mixtures: each one by ``method`` fitted on the
    anchors (the experts at the vertices) plus the other n - 1 mixtures, as a calibration fitted on a few trained
    mixtures predicts an untrained one. None when n - 1 is fewer than the method needs."""
    weights, proxy, truth = np.asarray(weights, float), _2d(proxy), _2d(truth)
    n = len(truth)
    if n < 2 or n - 1 < min_trained(method):
        return None
    aw = np.zeros((0, weights.shape[1])) if anchor_weights is None else np.asarray(anchor_weights, float)
    ap = np.zeros((0, proxy.shape[1])) if anchor_proxy is None else _2d(anchor_proxy)
    at = np.zeros((0, truth.shape[1])) if anchor_truth is None else _2d(anchor_truth)
    out = np.empty_like(truth)
    for i in range(n):
        rest = np.arange(n) != i
        out[i] = calibrated_predict(
            method,
            np.vstack([aw, weights[rest]]),
            np.vstack([ap, proxy[rest]]),
            np.vstack([at, truth[rest]]),
            weights[i : i + 1],
            proxy[i : i + 1],
        )[0]
    return out


# ------------------------------------------------------------------------------------- the points of every fit


@dataclass(frozen=True)
class CalibrationPoints:
    """What every calibration of one simplex is fitted on, read from a results table by :func:`calibration_points`.

    The first ``n_vertices`` points are the experts at the vertices, in domain order; then the trained mixtures
    (mean over seeds), sorted by id. Rows of ``proxy`` and ``truth`` are per point, columns per benchmark.
    """

    domains: tuple[str, ...]
    benchmarks: tuple[str, ...]
    names: tuple[str, ...]  # an expert's domain, or a trained mixture's id
    weights: np.ndarray  # (m, K)
    proxy: np.ndarray  # (m, B)
    truth: np.ndarray  # (m, B)
    n_vertices: int
    n_trained: int  # trained points strictly inside the simplex (what :func:`check_trained` counts)
    #: every trained mixture over the domains with a score on every benchmark, a point or not: id -> weights
    trained: dict[str, np.ndarray] = field(default_factory=dict)
    #: trained mixtures (in ``trained``) left out for want of a proxy score: id -> weights
    without_proxy: dict[str, np.ndarray] = field(default_factory=dict)
    #: ids of trained mixtures over other domains, left out
    foreign: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


#: how the note on trained mixtures over other domains starts
FOREIGN_NOTE = "left out"


def calibration_points(
    frame: Any, domains: Sequence[str], benchmarks: Sequence[str], method: str, group: str | None = None
) -> CalibrationPoints:
    """The calibration points of the simplex over ``domains`` in a results table (``ResultsTable.frame()``).

    The one rule that a study's calibrated objective, ``dmo correlate``'s calibrated rho and ``dmo suggest`` share:

    - **vertices**: each expert (``kind == "expert"``, ``mixture`` a domain) with an ok score on every benchmark is
      a point at its vertex, truth = its scores; its proxy is the ``method`` proxy scored at the pure mixture when
      the table has one on every benchmark, else the expert's own scores (a one-expert linear merge *is* the
      expert). An expert missing a benchmark is left out, with a note;
    - **seeds**: a trained mixture's score on a benchmark is the mean over its seeds of each seed's newest row;
    - **trained mixtures** over ``domains`` (weights matched to 6 decimals, missing domains 0) with a score on every
      benchmark are points, with the ``method`` proxy scored at the same weights (newest row; ``group``: only
      proxies of that group) or, at a vertex, the vertex's proxy. Those **without a proxy** on every benchmark are
      left out, with a note that says how to score them (``without_proxy`` lists them);
    - trained mixtures **over other domains** (a positive weight elsewhere) are left out, with a note.
    """
    import pandas as pd

    domains, benchmarks = tuple(domains), tuple(benchmarks)
    k, notes = len(domains), []
    # rows are matched by index label below: a frame concatenated from several tables may repeat labels
    frame = frame.reset_index(drop=True)
    ok = frame[(frame["status"] == "ok") & pd.to_numeric(frame["score"], errors="coerce").notna()].copy()
    ok["score"] = ok["score"].astype(float)
    ok = ok[np.isfinite(ok["score"]) & ok["benchmark"].isin(benchmarks)]

    def newest(part: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
        # the table's row order is its file order: the last row of each key is the newest
        return part.drop_duplicates(subset=keys, keep="last")

    def complete(scores: pd.DataFrame) -> pd.DataFrame:
        return scores.reindex(columns=list(benchmarks)).dropna()

    # where a row sits on this simplex: weights over `domains` (None: a positive weight on another domain)
    wcols = [c for c in ok.columns if c.startswith("w_")]
    weights = ok[wcols].apply(pd.to_numeric, errors="coerce").fillna(0.0) if wcols else pd.DataFrame(index=ok.index)
    inside = ~(weights[[c for c in wcols if c.removeprefix("w_") not in domains]] > ZERO_WEIGHT).any(axis=1)
    on = np.column_stack([weights[f"w_{d}"] if f"w_{d}" in weights else np.zeros(len(ok)) for d in domains])
    on = on.reshape(len(ok), k)
    ok["_at"] = [_place(w) for w in on]

    experts = complete(newest(ok[ok["kind"] == "expert"], ["mixture", "benchmark"]).pivot(
        index="mixture", columns="benchmark", values="score"))  # fmt: skip
    proxies = ok[(ok["kind"] == "proxy") & (ok["method"] == method) & inside]
    if group is not None:
        proxies = proxies[proxies["group"] == group]
    proxy_at = complete(newest(proxies, ["_at", "benchmark"]).pivot(index="_at", columns="benchmark", values="score"))

    names, w_rows, p_rows, t_rows = [], [], [], []
    vertex_proxy: dict[str, np.ndarray] = {}
    missing = [d for d in domains if d not in experts.index]
    for i, d in enumerate(domains):
        if d in missing:
            continue
        at = _place(np.eye(k)[i])
        truth = experts.loc[d, list(benchmarks)].to_numpy(float)
        vertex_proxy[at] = proxy_at.loc[[at], list(benchmarks)].to_numpy(float)[0] if at in proxy_at.index else truth
        names.append(d)
        w_rows.append(np.eye(k)[i])
        p_rows.append(vertex_proxy[at])
        t_rows.append(truth)
    if missing:
        notes.append(
            f"expert(s) {', '.join(missing)} without a score on every one of {', '.join(benchmarks)}: their vertices "
            "are left out of the fit"
        )
    n_vertices = len(names)

    trained_rows = ok[ok["kind"] == "trained"]
    foreign = sorted(set(trained_rows.loc[~inside.reindex(trained_rows.index, fill_value=True), "mixture"].astype(str)))
    if foreign:
        notes.append(
            f"{FOREIGN_NOTE} {len(foreign)} trained mixture(s) over other domains than {', '.join(domains)}: "
            + ", ".join(foreign[:3])
            + (", ..." if len(foreign) > 3 else "")
        )
    trained_rows = trained_rows[inside.reindex(trained_rows.index, fill_value=False)]
    seeds = newest(trained_rows.assign(_seed=trained_rows["seed"].astype(str)), ["_at", "_seed", "benchmark"])
    truth_at = complete(seeds.pivot_table(index="_at", columns="benchmark", values="score", aggfunc="mean"))
    trained: dict[str, np.ndarray] = {}
    without: dict[str, np.ndarray] = {}
    points = []
    for at in truth_at.index:
        w = np.array([float(x) for x in at.split(",")])
        if abs(w.sum() - 1.0) > 1e-4:
            continue  # not a mixture of these domains (rows of another simplex without weights here)
        mid = _mixture_id(domains, w)
        trained[mid] = w
        p = proxy_at.loc[[at], list(benchmarks)].to_numpy(float)[0] if at in proxy_at.index else vertex_proxy.get(at)
        if p is None:
            without[mid] = w
            continue
        points.append((mid, w, p, truth_at.loc[[at], list(benchmarks)].to_numpy(float)[0]))
    if without:
        ids = sorted(without)
        notes.append(
            f"{len(ids)} trained mixture(s) without a {method!r} proxy score on every benchmark left out of the fit: "
            + ", ".join(ids[:3])
            + (", ..." if len(ids) > 3 else "")
            + " (score their proxies, e.g. a grid study over them, to use them)"
        )
    points.sort(key=lambda p: p[0])
    for mid, w, p, t in points:
        names.append(mid)
        w_rows.append(w)
        p_rows.append(p)
        t_rows.append(t)
    n_inside = sum(1 for _, w, _, _ in points if np.count_nonzero(w > ZERO_WEIGHT) > 1)
    b = len(benchmarks)
    return CalibrationPoints(
        domains, benchmarks, tuple(names),
        weights=np.array(w_rows, float).reshape(-1, k), proxy=np.array(p_rows, float).reshape(-1, b),
        truth=np.array(t_rows, float).reshape(-1, b), n_vertices=n_vertices, n_trained=n_inside,
        trained=trained, without_proxy=without, foreign=tuple(foreign), notes=tuple(notes),
    )  # fmt: skip


def _place(weights: np.ndarray) -> str:
    """Where a row sits on the simplex, as a key: its weights to 6 decimals (as mixture ids round them)."""
    return ",".join(f"{x:.6f}" for x in np.asarray(weights, float) + 0.0)


#: a weight counts as zero below this (mixture ids round weights to 6 digits)
ZERO_WEIGHT = 1e-9


def _mixture_id(domains: Sequence[str], weights: np.ndarray) -> str:
    from dmo.mixture import Mixture

    return Mixture(tuple(domains), tuple(float(x) for x in weights), tolerance=1e-4).id
