"""Proxy and trained scores side by side, per mixture and benchmark, with their ranks.

Where :mod:`dmo.analysis.correlate` sums the agreement up in one number per benchmark, this table shows where the
proxy is wrong: which mixtures it over- or under-rates, and by how many places.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from dmo.analysis.correlate import MEAN_SCORE, expert_mix_scores, pivot_scores
from dmo.errors import DmoError

COLUMNS = [
    "group",
    "method",
    "benchmark",
    "mixture",
    "trained",
    "seeds",
    "proxy",
    "expert_mix",
    "trained_rank",
    "proxy_rank",
    "rank_diff",
]


def _rank(values: pd.Series) -> pd.Series:
    """1 = best; tied mixtures share the better rank (1, 2, 2, 4); missing values get no rank."""
    return values.rank(ascending=False, method="min").astype("Int64")


def compare(df: pd.DataFrame, benchmark: str | None = None, include_all: bool = False) -> pd.DataFrame:
    """One row per (proxy group, merge method, benchmark, mixture); ``mean score`` averages the benchmarks.

    Only mixtures with both a proxy and a trained score are listed, unless ``include_all``. Sorted by
    group, method, benchmark, then trained rank (then proxy rank for mixtures that were not trained).
    ``rank_diff`` = proxy rank - trained rank: positive where the proxy under-rates a mixture.
    """
    ok = df[(df["status"] == "ok") & df["score"].notna()].copy()
    ok["score"] = ok["score"].astype(float)
    trained = ok[ok["kind"] == "trained"]
    proxies = ok[ok["kind"] == "proxy"]
    if proxies.empty or (trained.empty and not include_all):
        return pd.DataFrame(columns=COLUMNS)
    t_mean = pivot_scores(trained, "mixture") if not trained.empty else pd.DataFrame()
    seeds = (
        trained.groupby(["mixture", "benchmark"])["seed"].nunique(dropna=False).unstack() if not trained.empty else None
    )
    experts = pivot_scores(ok[ok["kind"] == "expert"], "mixture")
    known: set[str] = set()
    parts = []
    for (group, method), part in proxies.groupby(["group", "method"], sort=True):
        p = pivot_scores(part, "mixture")
        w_cols = [c for c in part if c.startswith("w_") and part[c].notna().any()]
        weights = pd.concat([part, trained]).drop_duplicates("mixture").set_index("mixture")[w_cols]
        benches = [b for b in p.columns if include_all or b in t_mean.columns]
        known.update(benches)
        for b in [*benches, MEAN_SCORE] if len(benches) > 1 else benches:
            if benchmark is not None and b != benchmark:
                continue
            if b == MEAN_SCORE:
                both = [x for x in benches if x in t_mean.columns]
                prox = p[benches].mean(axis=1, skipna=False)
                train = t_mean[both].mean(axis=1, skipna=False) if len(both) == len(benches) else pd.Series()
                n_seeds = seeds[both].min(axis=1) if seeds is not None and both else None
            else:
                prox = p[b]
                train = t_mean[b] if b in t_mean.columns else pd.Series(dtype=float)
                n_seeds = seeds[b] if seeds is not None and b in seeds.columns else None
            frame = pd.DataFrame({"proxy": prox.dropna()}).join(
                pd.DataFrame({"trained": train.dropna()}), how="outer" if include_all else "inner"
            )
            if frame.empty:
                continue
            frame["seeds"] = n_seeds.reindex(frame.index) if n_seeds is not None else pd.NA
            frame["expert_mix"] = _mix_baseline(weights, experts, frame.index, benches if b == MEAN_SCORE else [b])
            frame["trained_rank"] = _rank(frame["trained"])
            frame["proxy_rank"] = _rank(frame["proxy"])
            frame["rank_diff"] = frame["proxy_rank"] - frame["trained_rank"]
            frame = frame.rename_axis("mixture").reset_index()
            frame.insert(0, "group", str(group))
            frame.insert(1, "method", str(method))
            frame.insert(2, "benchmark", b)
            parts.append(frame.sort_values(["trained_rank", "proxy_rank", "mixture"], na_position="last"))
    if benchmark is not None and benchmark != MEAN_SCORE and benchmark not in known:
        raise DmoError(
            f"no proxy scores on benchmark {benchmark!r} in this results table: "
            f"choose one of {', '.join(sorted(known)) or '(none)'} or {MEAN_SCORE!r}"
        )
    if not parts:
        return pd.DataFrame(columns=COLUMNS)
    out = pd.concat(parts, ignore_index=True)
    out["seeds"] = out["seeds"].astype("Int64")
    return out[COLUMNS]


def _mix_baseline(weights: pd.DataFrame, experts: pd.DataFrame, mixtures: pd.Index, benches: list[str]) -> list:
    """The expert-mix baseline per mixture (None where an expert score or the mixture's weights are missing)."""
    present = [m for m in mixtures if m in weights.index]
    if not present:
        return [None] * len(mixtures)
    vals = [expert_mix_scores(weights.loc[present], experts, b) for b in benches]
    known = [v for v in vals if v is not None]
    if len(known) < len(vals):
        return [None] * len(mixtures)
    mean = dict(zip(present, np.mean(known, axis=0)))
    return [float(mean[m]) if m in mean else None for m in mixtures]
