"""Does the proxy rank mixtures like real training does? Rank correlations, their uncertainty, and baselines.

For each (group, merge method) of proxy rows and each benchmark, over the mixtures that have both a proxy
score and a trained score (the mean over training seeds):
- Spearman rho (with a seeded bootstrap 95% CI, resampling mixtures), Kendall tau, Pearson r;
- the same rho for the free **expert-mix baseline** sum_i w_i * score(expert_i), which costs no merging at
  all: a proxy is only worth its cost where it beats this;
- the **seed ceiling**: rho between two training seeds of the same mixtures (how well trained models agree
  with themselves);
- regret@1: best trained score minus the trained score of the mixture the proxy ranks first (averaged over
  mixtures tied for first place).
Two summary rows per group: ``mean score`` (rho of the benchmark-averaged scores) and ``mean rho`` (the
average of the per-benchmark rhos, its CI from the same joint bootstrap).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import stats

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


def _nan_if_constant(fn, x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(fn(x, y)[0])


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return _nan_if_constant(stats.spearmanr, np.asarray(x, float), np.asarray(y, float))


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


def _pivot(df: pd.DataFrame, index: str | list[str]) -> pd.DataFrame:
    return df.pivot_table(index=index, columns="benchmark", values="score", aggfunc="mean")


def correlate(df: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row per (group, method, benchmark) plus the two summary rows; see the module docstring."""
    ok = df[(df["status"] == "ok") & df["score"].notna()].copy()
    ok["score"] = ok["score"].astype(float)
    trained = ok[ok["kind"] == "trained"]
    if trained.empty:
        return pd.DataFrame(columns=list(CorrelationRow.__dataclass_fields__))
    t_mean = _pivot(trained, "mixture")
    t_seeds = _pivot(trained, ["mixture", "seed"])
    experts = _pivot(ok[ok["kind"] == "expert"], "mixture")
    rows: list[CorrelationRow] = []
    proxies = ok[ok["kind"] == "proxy"]
    for (group, method), part in proxies.groupby(["group", "method"], sort=True):
        p = _pivot(part, "mixture")
        weights = part.drop_duplicates("mixture").set_index("mixture")[[c for c in part if c.startswith("w_")]]
        benches = [b for b in p.columns if b in t_mean.columns]
        mix = sorted(set(p.index) & set(t_mean.index))
        if not mix or not benches:
            continue
        per_bench_boot = []
        bench_rows = []
        for b in benches:
            sub = [m for m in mix if pd.notna(p.at[m, b]) and pd.notna(t_mean.at[m, b])]
            if len(sub) < 2:
                continue
            x, y = p.loc[sub, b].to_numpy(), t_mean.loc[sub, b].to_numpy()
            base = _expert_mix(weights.loc[sub], experts, b)
            row, boot = _row(str(group), str(method), b, sub, x, y, base, _seed_rho(t_seeds, sub, b), n_boot, seed)
            bench_rows.append(row)
            if boot is not None and len(sub) == len(mix):
                per_bench_boot.append(boot)
        rows.extend(bench_rows)
        full = [m for m in mix if p.loc[m, benches].notna().all() and t_mean.loc[m, benches].notna().all()]
        if len(full) >= 2:
            x, y = p.loc[full, benches].mean(axis=1).to_numpy(), t_mean.loc[full, benches].mean(axis=1).to_numpy()
            base = None
            if not experts.empty and all(b in experts.columns for b in benches):
                parts = [_expert_mix(weights.loc[full], experts, b) for b in benches]
                base = None if any(q is None for q in parts) else np.mean(parts, axis=0)
            seeds = _seed_rho(t_seeds, full, benches)
            row, _ = _row(str(group), str(method), MEAN_SCORE, full, x, y, base, seeds, n_boot, seed)
            rows.append(row)
        if bench_rows:
            boot_mean = np.nanmean(np.vstack(per_bench_boot), axis=0) if per_bench_boot else np.array([])
            lo, hi = _ci(boot_mean) if len(boot_mean) else (math.nan, math.nan)
            rows.append(CorrelationRow(
                str(group), str(method), MEAN_RHO, min(r.n for r in bench_rows), _mean(bench_rows, "spearman"),
                lo, hi, _mean(bench_rows, "kendall"), _mean(bench_rows, "pearson"),
                _mean(bench_rows, "baseline_spearman"), math.nan, math.nan, _mean(bench_rows, "seed_spearman"),
                _mean(bench_rows, "regret_at_1"), "", "",
            ))
    return pd.DataFrame([asdict(r) for r in rows])


def _mean(rows: list[CorrelationRow], attr: str) -> float:
    vals = [getattr(r, attr) for r in rows if not math.isnan(getattr(r, attr))]
    return float(np.mean(vals)) if vals else math.nan


def _expert_mix(weights: pd.DataFrame, experts: pd.DataFrame, bench: str) -> np.ndarray | None:
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


def _row(group, method, bench, mixtures, x, y, base, seed_rho, n_boot, seed):
    """One table row and its bootstrap rhos.

    The resamples depend only on (number of mixtures, n_boot, seed), so benchmarks over the same mixtures
    share them, which is what makes the ``mean rho`` CI a joint bootstrap.
    """
    boot = None
    lo = hi = b_lo = b_hi = math.nan
    if len(mixtures) >= 3:
        sel = bootstrap_indices(len(mixtures), n_boot, seed)
        boot = _rowwise_spearman(x[sel], y[sel])
        lo, hi = _ci(boot)
        if base is not None:
            b_lo, b_hi = _ci(_rowwise_spearman(base[sel], y[sel]))
    # Mixtures tied for the proxy's first place are equally likely picks: regret is their mean.
    top = np.flatnonzero(x == np.max(x))
    row = CorrelationRow(
        group, method, bench, len(mixtures), spearman(x, y), lo, hi, kendall(x, y), pearson(x, y),
        spearman(base, y) if base is not None else math.nan, b_lo, b_hi, seed_rho,
        float(np.max(y) - np.mean(y[top])), mixtures[int(top[0])], mixtures[int(np.argmax(y))],
    )
    return row, boot
