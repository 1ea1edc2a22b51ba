"""Does the proxy rank mixtures like real training does? Rank correlations, their uncertainty, and baselines.

For each (group, merge method) of proxy rows and each benchmark, over the mixtures that have both a proxy
score and a trained score (the mean over training seeds):
- Spearman rho (with a seeded bootstrap 95% CI, resampling mixtures), Kendall tau, Pearson r;
- the same rho for the free **expert-mix baseline** sum_i w_i * score(expert_i), which costs no merging at
  all: a proxy is only worth its cost where it beats this;
- the **seed ceiling**: rho between two training seeds of the same mixtures (how well trained models agree
  with themselves);
- the **regression baseline** (RegMix-style): a ridge regression on the mixture weights and their pairwise
  products, fitted on the *other* trained mixtures and predicting each held-out one (leave-one-out); its rho
  with the truth is what a few trained mixtures buy without any proxy;
- regret@1: best trained score minus the trained score of the mixture the proxy ranks first (averaged over
  mixtures tied for first place);
- a two-sided permutation p-value of the proxy's rho (seeded; exact enumeration when n! <= n_perm), with
  scipy.stats.permutation_test's definition, so the two agree exactly on the same seed;
- top-k overlap: the share of the trained top k found in the proxy's top k, in expectation over random
  tie-breaking (NaN when there are no more than k mixtures, where it is trivially 1);
- the **calibrated rho** (``mean score`` row only): the proxy's scores mapped to trained scores by a calibration
  (:mod:`dmo.calibration`, ``DEFAULT_CALIBRATION`` unless told), fitted on the group's calibration points
  (:func:`dmo.calibration.calibration_points`, the rule a study's calibrated objective and ``dmo suggest`` use: the
  experts at the vertices plus the *other* trained mixtures) and predicting each held-out one (leave-one-out), per
  benchmark and then averaged; what a study with ``objective: {calibrate: ...}`` maximises, next to the raw
  proxy's rho.
Two summary rows per group: ``mean score`` (rho of the benchmark-averaged scores) and ``mean rho`` (the
average of the per-benchmark rhos, its CI and p-value from the same joint bootstrap and permutations).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import stats

# The ridge regression and Spearman's rho live with the calibrations, which this table also uses; RIDGE_ALPHAS and
# ridge_loo_mse are re-exported for the tests and benchmarks that read them here.
from dmo.calibration import (  # noqa: F401
    DEFAULT_CALIBRATION,
    RIDGE_ALPHAS,
    CalibrationPoints,
    calibration_points,
    loo_predict,
    regression_features,
    ridge_loo_mse,
    ridge_predict,
    spearman,
)

MEAN_SCORE = "mean score"
MEAN_RHO = "mean rho"


@dataclass
class CorrelationRow:
    group: str
    method: str
    benchmark: str
    n: int
    spearman: float
    spearman_lo: float
    spearman_hi: float
    kendall: float
    pearson: float
    baseline_spearman: float
    baseline_lo: float
    baseline_hi: float
    seed_spearman: float
    regret_at_1: float
    proxy_pick: str
    trained_best: str
    # Added after the columns above so that positional readers of old CSVs keep working.
    spearman_p: float = math.nan
    topk_overlap: float = math.nan
    k: int = 3
    regression_spearman: float = math.nan
    regression_lo: float = math.nan
    regression_hi: float = math.nan
    #: The proxy's scores calibrated by ``calibration`` (mean-score row only): each trained mixture predicted by the
    #: calibration fitted on the experts plus the other trained mixtures (leave-one-out), its rho with the truth.
    calibrated_spearman: float = math.nan
    calibrated_lo: float = math.nan
    calibrated_hi: float = math.nan
    calibration: str = ""


def _nan_if_constant(fn, x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(fn(x, y)[0])


def kendall(x: np.ndarray, y: np.ndarray) -> float:
    return _nan_if_constant(stats.kendalltau, np.asarray(x, float), np.asarray(y, float))


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    return _nan_if_constant(stats.pearsonr, np.asarray(x, float), np.asarray(y, float))


def _rowwise_spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman rho of each row pair: Pearson of average ranks (scipy's definition, ties included)."""
    rx = stats.rankdata(x, axis=1)
    ry = stats.rankdata(y, axis=1)
    rx -= rx.mean(axis=1, keepdims=True)
    ry -= ry.mean(axis=1, keepdims=True)
    den = np.sqrt((rx**2).sum(axis=1) * (ry**2).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (rx * ry).sum(axis=1) / den, np.nan)


def bootstrap_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _ci(samples: np.ndarray) -> tuple[float, float]:
    ok = samples[np.isfinite(samples)]
    if len(ok) < 10:
        return math.nan, math.nan
    lo, hi = np.percentile(ok, [2.5, 97.5])
    return float(lo), float(hi)


def permutation_indices(n: int, n_perm: int, seed: int) -> tuple[np.ndarray, bool]:
    """Permutations of ``range(n)`` for a permutation test, and whether they are all n! of them (exact test).

    Drawn as scipy.stats.permutation_test draws them for one sample (``permutation_type="pairings"``,
    ``rng=seed``, one batch), so the p-values below equal scipy's on the same seed.
    """
    if n_perm >= math.factorial(n):
        return np.array(list(itertools.permutations(range(n))), dtype=np.intp).reshape(-1, n), True
    return np.random.default_rng(seed).permuted(np.tile(np.arange(n), (n_perm, 1)), axis=-1), False


def permutation_pvalue(null: np.ndarray, observed: float, exact: bool) -> float:
    """Two-sided p-value of ``observed`` against its permutation ``null`` (scipy's definition)."""
    if not math.isfinite(observed):
        return math.nan
    null = np.asarray(null, float)
    adjustment = 0 if exact else 1
    gamma = abs(np.finfo(float).eps * 100 * observed)
    less = (np.count_nonzero(null <= observed + gamma) + adjustment) / (len(null) + adjustment)
    greater = (np.count_nonzero(null >= observed - gamma) + adjustment) / (len(null) + adjustment)
    return float(min(1.0, max(0.0, 2 * min(less, greater))))


def _top_share(v: np.ndarray, k: int) -> np.ndarray:
    """Probability of each item to be among the k largest when ties are broken uniformly at random."""
    kth = np.sort(v)[::-1][k - 1]
    above, tied = v > kth, v == kth
    out = above.astype(float)
    out[tied] = (k - above.sum()) / tied.sum()
    return out


def topk_overlap(x: np.ndarray, y: np.ndarray, k: int = 3) -> float:
    """Expected share of y's top k that is also in x's top k, ties broken at random; NaN if len <= k."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if k < 1 or len(x) <= k:
        return math.nan
    return float(np.sum(_top_share(x, k) * _top_share(y, k)) / k)


def regression_loo(weights: np.ndarray, y: np.ndarray) -> np.ndarray | None:
    """Leave-one-out predictions of a ridge regression from mixture weights to trained scores.

    Each mixture's score is predicted by a model fitted on the other mixtures only, as a RegMix-style
    predictor fitted on a few trained mixtures would predict an untrained one. None below 4 mixtures.
    """
    y = np.asarray(y, float)
    n = len(y)
    if n < 4:
        return None
    x = regression_features(np.nan_to_num(np.asarray(weights, float)).reshape(n, -1))
    if x.shape[1] == 0 or not (np.ptp(x, axis=0) > 1e-12).any():
        return None  # no weights to regress on (the mean of the others would be perfectly anti-ranked)
    out = np.empty(n)
    for i in range(n):
        rest = np.arange(n) != i
        out[i] = ridge_predict(x[rest], y[rest], x[i : i + 1])[0]
    return out


def pivot_scores(df: pd.DataFrame, index: str | list[str]) -> pd.DataFrame:
    return df.pivot_table(index=index, columns="benchmark", values="score", aggfunc="mean")


def correlate(
    df: pd.DataFrame,
    n_boot: int = 1000,
    seed: int = 0,
    n_perm: int = 1000,
    k: int = 3,
    calibration: str = DEFAULT_CALIBRATION,
) -> pd.DataFrame:
    """One row per (group, method, benchmark) plus the two summary rows; see the module docstring.

    ``calibration``: the method (dmo.calibration) of the mean-score row's calibrated rho.
    """
    ok = df[(df["status"] == "ok") & df["score"].notna()].copy()
    ok["score"] = ok["score"].astype(float)
    # a seed's newest row per benchmark (as dmo.calibration reads them), then the mean over seeds
    trained = ok[ok["kind"] == "trained"].drop_duplicates(["mixture", "seed", "benchmark"], keep="last")
    if trained.empty:
        return pd.DataFrame(columns=list(CorrelationRow.__dataclass_fields__))
    t_mean = pivot_scores(trained, "mixture")
    t_seeds = pivot_scores(trained, ["mixture", "seed"])
    experts = pivot_scores(ok[ok["kind"] == "expert"], "mixture")
    opts = _Options(n_boot, seed, n_perm, k)
    rows: list[CorrelationRow] = []
    proxies = ok[ok["kind"] == "proxy"]
    for (group, method), part in proxies.groupby(["group", "method"], sort=True):
        p = pivot_scores(part, "mixture")
        weights = part.drop_duplicates("mixture").set_index("mixture")[[c for c in part if c.startswith("w_")]]
        weights = weights.loc[:, weights.notna().any()]
        benches = [b for b in p.columns if b in t_mean.columns]
        mix = sorted(set(p.index) & set(t_mean.index))
        if not mix or not benches:
            continue
        per_bench_boot, per_bench_null = [], []
        bench_rows = []
        for b in benches:
            sub = [m for m in mix if pd.notna(p.at[m, b]) and pd.notna(t_mean.at[m, b])]
            if len(sub) < 2:
                continue
            x, y = p.loc[sub, b].to_numpy(), t_mean.loc[sub, b].to_numpy()
            base = expert_mix_scores(weights.loc[sub], experts, b)
            reg = regression_loo(weights.loc[sub].to_numpy(), y)
            row, boot, null = _row(str(group), str(method), b, sub, x, y, base, reg, _seed_rho(t_seeds, sub, b), opts)
            bench_rows.append(row)
            if len(sub) == len(mix):
                if boot is not None:
                    per_bench_boot.append(boot)
                if null is not None:
                    per_bench_null.append(null)
        rows.extend(bench_rows)
        full = [m for m in mix if p.loc[m, benches].notna().all() and t_mean.loc[m, benches].notna().all()]
        if len(full) >= 2:
            x, y = p.loc[full, benches].mean(axis=1).to_numpy(), t_mean.loc[full, benches].mean(axis=1).to_numpy()
            base = None
            if not experts.empty and all(b in experts.columns for b in benches):
                parts = [expert_mix_scores(weights.loc[full], experts, b) for b in benches]
                known = [q for q in parts if q is not None]
                base = np.mean(known, axis=0) if len(known) == len(parts) else None
            reg = regression_loo(weights.loc[full].to_numpy(), y)
            seeds = _seed_rho(t_seeds, full, benches)
            row, _, _ = _row(str(group), str(method), MEAN_SCORE, full, x, y, base, reg, seeds, opts)
            points = calibration_points(df, [c.removeprefix("w_") for c in weights.columns], benches, str(method),
                                        group=str(group))  # fmt: skip
            calibrated = calibrated_loo(calibration, points)
            if calibrated is not None:
                _add_calibrated(row, calibration, *calibrated, opts)
            rows.append(row)
        if bench_rows:
            rows.append(_mean_rho_row(str(group), str(method), bench_rows, per_bench_boot, per_bench_null, opts))
    return pd.DataFrame([asdict(r) for r in rows])


def calibrated_loo(method: str, points: CalibrationPoints) -> tuple[np.ndarray, np.ndarray] | None:
    """Leave-one-out calibrated mean scores of the trained mixtures among the calibration points, and their trained
    mean scores: each predicted by ``method`` fitted on the experts at the vertices plus the other trained mixtures.
    The mean over benchmarks of the per-benchmark predictions, as the study's mean objective; None when there are
    too few trained mixtures for ``method``."""
    nv = points.n_vertices
    pred = loo_predict(method, points.weights[nv:], points.proxy[nv:], points.truth[nv:],
                       points.weights[:nv], points.proxy[:nv], points.truth[:nv])  # fmt: skip
    return None if pred is None else (pred.mean(axis=1), points.truth[nv:].mean(axis=1))


def _add_calibrated(row: CorrelationRow, method: str, pred: np.ndarray, y: np.ndarray, opts: _Options) -> None:
    """The calibrated rho of a mean-score row, its CI from the row's bootstrap resamples of the mixtures."""
    row.calibration = method
    row.calibrated_spearman = spearman(pred, y)
    if len(y) >= 3:
        sel = bootstrap_indices(len(y), opts.n_boot, opts.seed)
        row.calibrated_lo, row.calibrated_hi = _ci(_rowwise_spearman(pred[sel], y[sel]))


@dataclass(frozen=True)
class _Options:
    n_boot: int
    seed: int
    n_perm: int
    k: int


def _mean_rho_row(
    group: str,
    method: str,
    bench_rows: list[CorrelationRow],
    boots: list[np.ndarray],
    nulls: list[np.ndarray],
    opts: _Options,
) -> CorrelationRow:
    """The average of the per-benchmark rows; CI and p-value from resamples shared by the benchmarks."""
    boot_mean = np.nanmean(np.vstack(boots), axis=0) if boots else np.array([])
    lo, hi = _ci(boot_mean) if len(boot_mean) else (math.nan, math.nan)
    p_value = math.nan
    if nulls and len(nulls) == len(bench_rows):
        # Every benchmark covers the same mixtures, so one permutation of them is applied to all at once.
        exact = opts.n_perm >= math.factorial(bench_rows[0].n)
        with np.errstate(invalid="ignore"):
            p_value = permutation_pvalue(np.nanmean(np.vstack(nulls), axis=0), _mean(bench_rows, "spearman"), exact)
    return CorrelationRow(
        group,
        method,
        MEAN_RHO,
        min(r.n for r in bench_rows),
        _mean(bench_rows, "spearman"),
        lo,
        hi,
        _mean(bench_rows, "kendall"),
        _mean(bench_rows, "pearson"),
        _mean(bench_rows, "baseline_spearman"),
        math.nan,
        math.nan,
        _mean(bench_rows, "seed_spearman"),
        _mean(bench_rows, "regret_at_1"),
        "",
        "",
        spearman_p=p_value,
        topk_overlap=_mean(bench_rows, "topk_overlap"),
        k=opts.k,
        regression_spearman=_mean(bench_rows, "regression_spearman"),
    )


def _mean(rows: list[CorrelationRow], attr: str) -> float:
    vals = [getattr(r, attr) for r in rows if not math.isnan(getattr(r, attr))]
    return float(np.mean(vals)) if vals else math.nan


def expert_mix_scores(weights: pd.DataFrame, experts: pd.DataFrame, bench: str) -> np.ndarray | None:
    """sum_i w_i * score(expert_i, bench) per mixture; None when an expert with weight > 0 lacks a score."""
    if experts.empty or bench not in experts.columns:
        return None
    out = np.zeros(len(weights))
    for col in weights.columns:
        domain = col.removeprefix("w_")
        w = weights[col].fillna(0.0).to_numpy(dtype=float)
        if (w > 0).any():
            if domain not in experts.index or pd.isna(experts.at[domain, bench]):
                return None
            out += w * float(experts.at[domain, bench])
    return out


def _seed_rho(t_seeds: pd.DataFrame, mixtures: list[str], bench: str | list[str]) -> float:
    """Spearman rho between the first two training seeds over the mixtures that have both."""
    if t_seeds.empty:
        return math.nan
    benches = [bench] if isinstance(bench, str) else bench
    if any(b not in t_seeds.columns for b in benches):
        return math.nan
    vals = t_seeds[benches].mean(axis=1).dropna().unstack("seed")
    vals = vals.loc[[m for m in mixtures if m in vals.index]]
    if vals.shape[1] < 2:
        return math.nan
    pair = vals.iloc[:, :2].dropna()
    return spearman(pair.iloc[:, 0].to_numpy(), pair.iloc[:, 1].to_numpy())


def _row(group, method, bench, mixtures, x, y, base, reg, seed_rho, opts: _Options):
    """One table row, its bootstrap rhos and its permutation null distribution.

    The resamples depend only on (number of mixtures, n_boot or n_perm, seed), so benchmarks over the same
    mixtures share them, which is what makes the ``mean rho`` CI and p-value joint over benchmarks.
    """
    boot = null = None
    lo = hi = b_lo = b_hi = r_lo = r_hi = math.nan
    if len(mixtures) >= 3:
        sel = bootstrap_indices(len(mixtures), opts.n_boot, opts.seed)
        boot = _rowwise_spearman(x[sel], y[sel])
        lo, hi = _ci(boot)
        if base is not None:
            b_lo, b_hi = _ci(_rowwise_spearman(base[sel], y[sel]))
        if reg is not None:
            r_lo, r_hi = _ci(_rowwise_spearman(reg[sel], y[sel]))
    rho = spearman(x, y)
    p_value = math.nan
    if not math.isnan(rho):
        perms, exact = permutation_indices(len(mixtures), opts.n_perm, opts.seed)
        null = _rowwise_spearman(x[perms], np.broadcast_to(y, perms.shape))
        p_value = permutation_pvalue(null, rho, exact)
    # Mixtures tied for the proxy's first place are equally likely picks: regret is their mean.
    top = np.flatnonzero(x == np.max(x))
    row = CorrelationRow(
        group,
        method,
        bench,
        len(mixtures),
        rho,
        lo,
        hi,
        kendall(x, y),
        pearson(x, y),
        spearman(base, y) if base is not None else math.nan,
        b_lo,
        b_hi,
        seed_rho,
        float(np.max(y) - np.mean(y[top])),
        mixtures[int(top[0])],
        mixtures[int(np.argmax(y))],
        spearman_p=p_value,
        topk_overlap=topk_overlap(x, y, opts.k),
        k=opts.k,
        regression_spearman=spearman(reg, y) if reg is not None else math.nan,
        regression_lo=r_lo,
        regression_hi=r_hi,
    )
    return row, boot, null
