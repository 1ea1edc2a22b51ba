"""Pareto fronts of score vectors: which mixtures are non-dominated, and how much of the objective space they cover.

Pure functions over arrays, every objective maximised (dmo's scores are higher-is-better). Shared by a study's
summary (:mod:`dmo.search`) and the front's fidelity (:mod:`dmo.analysis.pareto`).

- :func:`non_dominated`: ``p`` dominates ``q`` when ``p >= q`` on every objective and ``p > q`` on one; equal vectors
  do not dominate each other, so duplicates on the front are all kept.
- :func:`hypervolume`: the volume of the region dominated by the points and bounded below by a reference point
  (exact, by slicing along the last objective and recursing; fine for the tens to hundreds of points and two to
  five objectives of a mixture study).
- :func:`reference_point`: the reference every fidelity figure uses, fixed before any run: per objective, the worst
  value minus a tenth of the range (so the extreme points of a front still count).
- :func:`front_fidelity`: how well a front picked by one set of scores (a proxy's) recovers the front of another (the
  trained models'): precision and recall of the picks among the true front, and the hypervolume of the picks' true
  scores relative to the true front's own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["FrontFidelity", "front_fidelity", "hypervolume", "non_dominated", "reference_point"]

#: The reference point lies this share of each objective's range below its worst value.
REFERENCE_MARGIN = 0.1
#: Margin of an objective whose values are all equal (scores live in [0, 1]).
FLAT_MARGIN = 0.01


def _matrix(points: np.ndarray) -> np.ndarray:
    p = np.asarray(points, float)
    if p.ndim == 1:
        p = p[:, None]
    if p.ndim != 2:
        raise ValueError(f"points must be a (n, objectives) array, got shape {p.shape}")
    if not np.isfinite(p).all():
        raise ValueError("points must be finite (a NaN or infinite score has no place on a front)")
    return p


def non_dominated(points: np.ndarray) -> np.ndarray:
    """Boolean mask of the rows of ``points`` (n, d) that no other row dominates (maximising every column)."""
    p = _matrix(points)
    if len(p) == 0:
        return np.zeros(0, bool)
    ge = (p[:, None, :] >= p[None, :, :]).all(axis=2)  # ge[i, j]: row i is at least row j everywhere
    gt = (p[:, None, :] > p[None, :, :]).any(axis=2)
    return np.asarray(~(ge & gt).any(axis=0), bool)


def hypervolume(points: np.ndarray, reference: np.ndarray) -> float:
    """Volume of the set ``{x : reference <= x <= p for some row p}`` (maximising); rows not above the reference on
    every objective add nothing."""
    p = _matrix(points)
    ref = np.asarray(reference, float).ravel()
    if p.shape[1] != len(ref) and len(p):
        raise ValueError(f"the reference has {len(ref)} objectives, the points {p.shape[1]}")
    p = p[(p > ref).all(axis=1)] - ref
    if len(p) == 0:
        return 0.0
    p = np.unique(p[non_dominated(p)], axis=0)
    return float(_volume(p))


def _volume(p: np.ndarray) -> float:
    """Hypervolume of positive points against the origin."""
    n, d = p.shape
    if d == 1:
        return float(p.max())
    if d == 2:
        order = np.argsort(-p[:, 0], kind="stable")
        area, top = 0.0, 0.0
        for x, y in p[order]:
            if y > top:
                area += x * (y - top)
                top = y
        return area
    # slices between consecutive values of the last objective, each the (d-1)-volume of the points above it
    order = np.argsort(-p[:, -1], kind="stable")
    p = p[order]
    total = 0.0
    for i in range(n):
        below = p[i + 1, -1] if i + 1 < n else 0.0
        height = p[i, -1] - below
        if height > 0:
            upper = p[: i + 1, :-1]
            total += _volume(upper[non_dominated(upper)]) * height
    return total


def reference_point(truth: np.ndarray) -> np.ndarray:
    """Per objective, the worst value minus :data:`REFERENCE_MARGIN` of the range (:data:`FLAT_MARGIN` if flat)."""
    t = _matrix(truth)
    lo, hi = t.min(axis=0), t.max(axis=0)
    margin = np.where(hi > lo, REFERENCE_MARGIN * (hi - lo), FLAT_MARGIN)
    return lo - margin


@dataclass(frozen=True)
class FrontFidelity:
    """How a front picked by predicted scores fares on the true scores of the same mixtures."""

    precision: float  # share of the picks that lie on the true front
    recall: float  # share of the true front among the picks
    hypervolume_ratio: float  # hypervolume of the picks' true scores / the true front's, one reference point
    picks: int
    front: int


def front_fidelity(predicted: np.ndarray, truth: np.ndarray, reference: np.ndarray | None = None) -> FrontFidelity:
    """Precision, recall and hypervolume ratio of the non-dominated rows of ``predicted`` against those of
    ``truth`` (same rows: mixtures; same columns: objectives). ``reference``: default :func:`reference_point` of
    ``truth``."""
    pred, true = _matrix(predicted), _matrix(truth)
    if pred.shape != true.shape:
        raise ValueError(f"predicted {pred.shape} and true scores {true.shape} must have one shape")
    if len(true) == 0:
        return FrontFidelity(math.nan, math.nan, math.nan, 0, 0)
    picks, front = non_dominated(pred), non_dominated(true)
    hit = int((picks & front).sum())
    ref = reference_point(true) if reference is None else np.asarray(reference, float)
    whole = hypervolume(true[front], ref)
    ratio = hypervolume(true[picks], ref) / whole if whole > 0 else math.nan
    return FrontFidelity(hit / int(picks.sum()), hit / int(front.sum()), ratio, int(picks.sum()), int(front.sum()))
