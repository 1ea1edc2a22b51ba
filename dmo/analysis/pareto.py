"""``dmo pareto``: the proxies' non-dominated mixtures, and how well they recover the front of the trained models.

Objectives are benchmarks or weighted groups of benchmarks (a space's ``objective.pareto``; by default every
benchmark), all maximised. For each (group, merge method) of proxy rows of a results table:

- **the proxy front** (:func:`proxy_front`): the proxy-scored mixtures no other proxy-scored mixture dominates, with
  their trained scores where the table has them;
- **its fidelity** (:func:`front_fidelity_table`), over the mixtures that have both a proxy and a trained score (the
  mean over training seeds): the precision and recall of the trained non-dominated set among the proxy's picks, and
  the hypervolume of the trained scores of the proxy's front relative to the trained front's own
  (:func:`dmo.pareto.front_fidelity`; one reference point: per objective the worst trained score minus a tenth of
  the range). The same figures for the free baselines of ``dmo correlate``: the **expert mix**
  ``sum_i w_i * score(expert_i)``, the **regression** on the weights (each mixture predicted by a ridge fit on the
  other trained mixtures, leave-one-out), optionally a **calibrated** proxy (a :mod:`dmo.calibration` method fitted
  on the experts at the vertices and the other trained mixtures, leave-one-out), and the **seed ceiling**: the front
  of one training seed's scores judged by the mean of the other seeds (averaged over which seed picks).

The 95% CIs are a bootstrap **over training seeds**: each resample draws, for every mixture, as many seeds as it has
with replacement and averages them; the true front, the reference point and every fitted baseline (regression,
calibration) are recomputed on each resample, the proxy's and the expert mix's picks stay fixed. The seed ceiling
compares the seeds themselves, so it has no seed bootstrap.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from dmo.calibration import calibration_points, loo_predict, min_trained, regression_features, ridge_loo_many
from dmo.errors import DmoError
from dmo.pareto import FrontFidelity, front_fidelity, non_dominated

__all__ = [
    "FIGURES",
    "FidelityResult",
    "Objectives",
    "front_fidelity_table",
    "paired_scores",
    "proxy_front",
]

#: The three figures of a fidelity row, in order.
FIGURES = ("precision", "recall", "hypervolume_ratio")
PROXY, EXPERT_MIX, REGRESSION, CEILING = "proxy", "expert mix", "regression", "seed ceiling"


@dataclass(frozen=True)
class Objectives:
    """Named objectives, each the weighted mean of some benchmarks' scores (a benchmark alone: weight 1)."""

    names: tuple[str, ...]
    weights: tuple[dict[str, float], ...]

    @classmethod
    def each(cls, benchmarks: Sequence[str]) -> Objectives:
        return cls(tuple(benchmarks), tuple({b: 1.0} for b in benchmarks))

    @property
    def benchmarks(self) -> list[str]:
        return sorted({b for w in self.weights for b in w})

    def of(self, scores: pd.DataFrame) -> np.ndarray:
        """(rows, objectives) from a frame with one column per benchmark; NaN where a benchmark is missing."""
        out = np.full((len(scores), len(self.names)), np.nan)
        for j, w in enumerate(self.weights):
            if all(b in scores.columns for b in w):
                total = sum(w.values())
                out[:, j] = sum(scores[b].to_numpy(float) * x for b, x in w.items()) / total
        return out


def _ok(df: pd.DataFrame) -> pd.DataFrame:
    ok = df[(df["status"] == "ok") & pd.to_numeric(df["score"], errors="coerce").notna()].copy()
    ok["score"] = ok["score"].astype(float)
    return ok


def _trained_per_seed(ok: pd.DataFrame) -> pd.DataFrame:
    """Trained scores, one row per (mixture, seed), a column per benchmark (each seed's newest row)."""
    trained = ok[ok["kind"] == "trained"].drop_duplicates(["mixture", "seed", "benchmark"], keep="last")
    # a trained row without a seed is one seed of its own
    trained = trained.assign(seed=trained["seed"].astype("Int64").fillna(-1))
    return trained.pivot_table(index=["mixture", "seed"], columns="benchmark", values="score", aggfunc="mean")


def _proxy_groups(ok: pd.DataFrame, method: str | None):
    proxies = ok[ok["kind"] == "proxy"]
    if method is not None:
        proxies = proxies[proxies["method"] == method]
    return proxies.groupby(["group", "method"], sort=True)


def _weights(part: pd.DataFrame) -> pd.DataFrame:
    """Per mixture of a group's proxy rows, its weight on each of the group's domains."""
    cols = [c for c in part.columns if c.startswith("w_") and part[c].notna().any()]
    return part.drop_duplicates("mixture").set_index("mixture")[cols].astype(float).fillna(0.0)


def proxy_front(df: pd.DataFrame, objectives: Objectives, method: str | None = None) -> pd.DataFrame:
    """Per (group, method), the proxy-scored mixtures on the proxies' front (maximising every objective): their
    weights, proxy objectives and, where trained, the trained objectives (mean over seeds) and whether the mixture is
    on the trained front of the mixtures that have both scores. Best first on the first objective."""
    ok = _ok(df)
    per_seed = _trained_per_seed(ok)
    t_mean = objectives_frame(per_seed.groupby(level="mixture").mean(), objectives) if not per_seed.empty else None
    rows: list[dict[str, object]] = []
    for (group, meth), part in _proxy_groups(ok, method):
        p = objectives_frame(part.pivot_table(index="mixture", columns="benchmark", values="score", aggfunc="mean"),
                             objectives).dropna()  # fmt: skip
        if p.empty:
            continue
        weights = _weights(part)
        front = p[non_dominated(p.to_numpy())]
        trained_front: set[str] = set()
        if t_mean is not None:
            both = sorted(set(p.index) & set(t_mean.dropna().index))
            if both:
                trained_front = {both[i] for i in np.flatnonzero(non_dominated(t_mean.loc[both].to_numpy()))}
        order = sorted(front.index, key=lambda m: (-front.at[m, objectives.names[0]], m))
        for m in order:
            row: dict[str, object] = {"group": group, "method": meth, "mixture": m}
            row.update({c: float(weights.at[m, c]) for c in weights.columns})
            row.update({f"proxy:{o}": float(front.at[m, o]) for o in objectives.names})
            trained = t_mean is not None and m in t_mean.index and t_mean.loc[m].notna().all()
            for o in objectives.names:
                row[f"trained:{o}"] = float(t_mean.at[m, o]) if trained and t_mean is not None else math.nan
            row["on_trained_front"] = (m in trained_front) if trained else None
            rows.append(row)
    return pd.DataFrame(rows)


def objectives_frame(scores: pd.DataFrame, objectives: Objectives) -> pd.DataFrame:
    return pd.DataFrame(objectives.of(scores), index=scores.index, columns=list(objectives.names))


# -------------------------------------------------------------------------------------------------- the fidelity


@dataclass
class Paired:
    """The mixtures of one (group, method) with a proxy and a trained score on every objective."""

    group: str
    method: str
    mixtures: list[str]
    domains: list[str]
    weights: np.ndarray  # (n, K)
    proxy: np.ndarray  # (n, O)
    seeds: list[np.ndarray]  # per mixture, (its seeds, O)
    seed_names: list[list[object]]
    expert_mix: np.ndarray | None  # (n, O), None when an expert lacks a score
    #: the experts at the vertices as calibration anchors (weights, proxy, truth), objective-level
    anchors: tuple[np.ndarray, np.ndarray, np.ndarray]

    @property
    def truth(self) -> np.ndarray:
        return np.array([s.mean(axis=0) for s in self.seeds]).reshape(len(self.seeds), -1)


def paired_scores(df: pd.DataFrame, objectives: Objectives, method: str | None = None) -> list[Paired]:
    """Per (group, method) of proxy rows, the mixtures that have a proxy and a trained score on every objective."""
    ok = _ok(df)
    per_seed = _trained_per_seed(ok)
    if per_seed.empty:
        return []
    seed_obj = objectives_frame(per_seed, objectives).dropna()
    experts = ok[ok["kind"] == "expert"].pivot_table(index="mixture", columns="benchmark", values="score",
                                                     aggfunc="mean")  # fmt: skip
    e_obj = objectives_frame(experts, objectives) if not experts.empty else None
    out = []
    for (group, meth), part in _proxy_groups(ok, method):
        p = objectives_frame(part.pivot_table(index="mixture", columns="benchmark", values="score", aggfunc="mean"),
                             objectives).dropna()  # fmt: skip
        have = set(seed_obj.index.get_level_values("mixture"))
        mixtures = sorted(m for m in p.index if m in have)
        if len(mixtures) < 2:
            continue
        weights = _weights(part)
        domains = [c.removeprefix("w_") for c in weights.columns]
        w = weights.loc[mixtures].to_numpy(float)
        seeds = [seed_obj.loc[m].to_numpy(float) for m in mixtures]
        names = [list(seed_obj.loc[m].index) for m in mixtures]
        mix = None
        if e_obj is not None and all(d in e_obj.index and e_obj.loc[d].notna().all() for d in domains):
            mix = w @ e_obj.loc[domains].to_numpy(float)
        points = calibration_points(df, domains, objectives.benchmarks, str(meth), group=str(group))
        nv = points.n_vertices
        bench = pd.DataFrame(points.proxy[:nv], columns=list(points.benchmarks))
        truth = pd.DataFrame(points.truth[:nv], columns=list(points.benchmarks))
        anchors = (points.weights[:nv], objectives.of(bench), objectives.of(truth))
        out.append(Paired(str(group), str(meth), mixtures, domains, w, p.loc[mixtures].to_numpy(float), seeds, names,
                          mix, anchors))  # fmt: skip
    return out


@dataclass
class FidelityRow:
    group: str
    method: str
    source: str
    n: int
    picks: int
    front: int
    precision: float
    precision_lo: float
    precision_hi: float
    recall: float
    recall_lo: float
    recall_hi: float
    hypervolume_ratio: float
    hypervolume_ratio_lo: float
    hypervolume_ratio_hi: float


@dataclass
class FidelityResult:
    table: pd.DataFrame  # one FidelityRow per (group, method, source)
    #: (group, method, source) -> (n_boot, 3) figures on each seed resample (what paired comparisons read)
    boot: dict[tuple[str, str, str], np.ndarray] = field(default_factory=dict)


#: A front's picker: trained scores (resamples, mixtures, objectives) -> predicted scores of the same shape, or None.
Picker = Callable[[np.ndarray], "np.ndarray | None"]


def _fixed(scores: np.ndarray) -> Picker:
    return lambda t: np.broadcast_to(scores, t.shape)


def _stack(t: np.ndarray) -> np.ndarray:
    """(R, n, O) -> (n, R * O): every resample's objectives as columns of one regression target."""
    return np.transpose(t, (1, 0, 2)).reshape(t.shape[1], -1)


def _unstack(y: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return np.transpose(y.reshape(shape[1], shape[0], shape[2]), (1, 0, 2))


def _regression(pair: Paired) -> Picker:
    """The regression baseline of ``dmo correlate`` per objective: leave-one-out ridge on the weights (no anchors)."""

    def pick(t: np.ndarray) -> np.ndarray | None:
        x = regression_features(pair.weights)
        if len(x) < 4 or not (np.ptp(x, axis=0) > 1e-12).any():
            return None
        return _unstack(ridge_loo_many(x, _stack(t)), t.shape)

    return pick


def _calibrated(pair: Paired, method: str) -> Picker:
    """A calibration of the proxy per objective, fitted on the experts at the vertices and the other trained
    mixtures (leave-one-out): vectorised over resamples for ``regression`` and ``residual``, else one by one."""
    aw, ap, at = pair.anchors

    def pick(t: np.ndarray) -> np.ndarray | None:
        if method in ("regression", "residual"):
            if len(t[0]) - 1 < min_trained(method):
                return None
            offset = pair.proxy if method == "residual" else np.zeros_like(pair.proxy)
            a_off = ap if method == "residual" else np.zeros_like(ap)
            y = _stack(t - offset[None])
            anchors_y = np.tile(at - a_off, (1, len(t)))
            fit = ridge_loo_many(regression_features(pair.weights), y, regression_features(aw), anchors_y)
            return _unstack(fit, t.shape) + offset[None]
        out = [loo_predict(method, pair.weights, pair.proxy, r, aw, ap, at) for r in t]
        return None if any(o is None for o in out) else np.array(out)

    return pick


def _figures(f: FrontFidelity) -> np.ndarray:
    return np.array([f.precision, f.recall, f.hypervolume_ratio])


def _ci(samples: np.ndarray) -> tuple[float, float]:
    ok = samples[np.isfinite(samples)]
    if len(ok) < 10:
        return math.nan, math.nan
    lo, hi = np.percentile(ok, [2.5, 97.5])
    return float(lo), float(hi)


def seed_resamples(seeds: list[np.ndarray], n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, mixtures, objectives): each mixture's mean over its seeds drawn with replacement."""
    rng = np.random.default_rng(seed)
    out = np.empty((n_boot, len(seeds), seeds[0].shape[1]))
    for i, s in enumerate(seeds):
        idx = rng.integers(0, len(s), size=(n_boot, len(s)))
        out[:, i, :] = s[idx].mean(axis=1)
    return out


def seed_ceiling(pair: Paired) -> tuple[FrontFidelity, int] | None:
    """The front of each training seed's scores judged by the mean of the other seeds, averaged over the picking
    seed; and the fewest mixtures any comparison had. None without two seeds on two mixtures."""
    labels = sorted({s for names in pair.seed_names for s in names}, key=str)
    found = []
    for label in labels:
        rows, picked, other = [], [], []
        for i, names in enumerate(pair.seed_names):
            if label in names and len(names) > 1:
                k = names.index(label)
                rows.append(i)
                picked.append(pair.seeds[i][k])
                other.append(np.delete(pair.seeds[i], k, axis=0).mean(axis=0))
        if len(rows) >= 2:
            found.append((front_fidelity(np.array(picked), np.array(other)), len(rows)))
    if not found:
        return None
    mean = np.nanmean([_figures(f) for f, _ in found], axis=0)
    picks = round(float(np.mean([f.picks for f, _ in found])))
    front = round(float(np.mean([f.front for f, _ in found])))
    return FrontFidelity(float(mean[0]), float(mean[1]), float(mean[2]), picks, front), min(n for _, n in found)


def front_fidelity_table(
    df: pd.DataFrame,
    objectives: Objectives,
    n_boot: int = 1000,
    seed: int = 0,
    calibration: str | None = None,
    method: str | None = None,
) -> FidelityResult:
    """The fidelity rows of every (group, method) with at least two paired mixtures; see the module docstring."""
    if len(objectives.names) < 2:
        raise DmoError(f"a front needs at least two objectives, got {list(objectives.names)}")
    rows: list[FidelityRow] = []
    boot: dict[tuple[str, str, str], np.ndarray] = {}
    for pair in paired_scores(df, objectives, method):
        truth = pair.truth
        n = len(pair.mixtures)
        pickers: list[tuple[str, Picker]] = [(PROXY, _fixed(pair.proxy))]
        if calibration is not None:
            pickers.append((f"calibrated ({calibration})", _calibrated(pair, calibration)))
        if pair.expert_mix is not None:
            pickers.append((EXPERT_MIX, _fixed(pair.expert_mix)))
        pickers.append((REGRESSION, _regression(pair)))
        resamples = seed_resamples(pair.seeds, n_boot, seed)
        for name, picker in pickers:
            point = picker(truth[None])
            if point is None:
                continue
            fid = front_fidelity(point[0], truth)
            picked = picker(resamples)
            assert picked is not None
            samples = np.array([_figures(front_fidelity(picked[b], resamples[b])) for b in range(n_boot)])
            boot[(pair.group, pair.method, name)] = samples
            cis = [_ci(samples[:, j]) for j in range(3)]
            rows.append(
                FidelityRow(pair.group, pair.method, name, n, fid.picks, fid.front, fid.precision, *cis[0],
                            fid.recall, *cis[1], fid.hypervolume_ratio, *cis[2])
            )  # fmt: skip
        ceiling = seed_ceiling(pair)
        if ceiling is not None:
            f, m = ceiling
            nan = math.nan
            rows.append(FidelityRow(pair.group, pair.method, CEILING, m, f.picks, f.front, f.precision, nan, nan,
                                    f.recall, nan, nan, f.hypervolume_ratio, nan, nan))  # fmt: skip
    return FidelityResult(pd.DataFrame([asdict(r) for r in rows], columns=list(FidelityRow.__dataclass_fields__)), boot)
