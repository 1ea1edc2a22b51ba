"""The report's figures, drawn with matplotlib's object API (no pyplot: no global state, no display needed).

Every function takes plain arrays and returns PNG bytes, so the figures can be embedded, written or tested
without knowing where the numbers came from.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure
from matplotlib.tri import Triangulation

DPI = 100
SQRT3_2 = math.sqrt(3) / 2


def png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _grid(n: int, cols: int, width: float, height: float) -> tuple[Figure, list]:
    cols = max(1, min(cols, n))
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


@dataclass
class ScatterPanel:
    """One benchmark: proxy score (x) against the trained score (y, mean over seeds; error bar = seed range)."""

    title: str
    proxy: np.ndarray
    trained: np.ndarray
    trained_lo: np.ndarray | None = None
    trained_hi: np.ndarray | None = None
    labels: Sequence[str] = ()


def scatter_png(panels: Sequence[ScatterPanel], suptitle: str = "") -> bytes:
    fig, axes = _grid(len(panels), 3, 4.2, 3.8)
    for ax, p in zip(axes, panels):
        x, y = np.asarray(p.proxy, float), np.asarray(p.trained, float)
        if p.trained_lo is not None and p.trained_hi is not None:
            err = np.vstack([y - np.asarray(p.trained_lo, float), np.asarray(p.trained_hi, float) - y])
            ax.errorbar(x, y, yerr=np.clip(err, 0, None), fmt="none", ecolor="0.7", elinewidth=1, zorder=1)
        ax.scatter(x, y, s=28, color="tab:blue", edgecolor="white", linewidth=0.5, zorder=2)
        if len(x):
            best = int(np.argmax(y))
            pick = np.flatnonzero(x == np.max(x))
            ax.scatter(
                x[pick],
                y[pick],
                s=90,
                facecolor="none",
                edgecolor="tab:orange",
                linewidth=1.5,
                zorder=3,
                label="proxy's pick",
            )
            ax.scatter([x[best]], [y[best]], s=120, marker="*", color="tab:red", zorder=4, label="best trained")
        ax.set_title(p.title, fontsize=10)
        ax.set_xlabel("proxy score")
        ax.set_ylabel("trained score")
        ax.grid(alpha=0.3)
    if axes:
        axes[0].legend(fontsize=8, loc="best")
    if suptitle:
        fig.suptitle(suptitle)
    return png(fig)


def ternary_xy(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Barycentric (w0, w1, w2) to the plane: domain 0 at bottom left, 1 at bottom right, 2 at the top."""
    w = np.asarray(weights, float)
    return w[:, 1] + w[:, 2] / 2, w[:, 2] * SQRT3_2


def _ternary_axes(ax, domains: Sequence[str]) -> None:
    ax.plot([0, 1, 0.5, 0], [0, 0, SQRT3_2, 0], color="black", linewidth=1)
    for t in (0.25, 0.5, 0.75):  # iso-weight lines of each domain
        for a, b in (
            ((t / 2, t * SQRT3_2), (1 - t / 2, t * SQRT3_2)),  # w2 = t
            ((t, 0), ((1 + t) / 2, (1 - t) * SQRT3_2)),  # w1 = t
            ((1 - t, 0), ((1 - t) / 2, (1 - t) * SQRT3_2)),  # w0 = t
        ):
            ax.plot([a[0], b[0]], [a[1], b[1]], color="0.85", linewidth=0.6, zorder=0)
    ax.text(0.0, -0.04, domains[0], ha="center", va="top", fontsize=9)
    ax.text(1.0, -0.04, domains[1], ha="center", va="top", fontsize=9)
    ax.text(0.5, SQRT3_2 + 0.03, domains[2], ha="center", va="bottom", fontsize=9)
    ax.set_xlim(-0.15, 1.15)
    ax.set_ylim(-0.12, SQRT3_2 + 0.1)
    ax.set_aspect("equal")
    ax.axis("off")


@dataclass
class TernaryPanel:
    title: str
    weights: np.ndarray  # (n, 3), in the order of the figure's domains
    values: np.ndarray
    interpolate: bool = True  # colour the simplex between the dots (a heat map), not only the dots
    #: mixtures to ring (a front's), in the order of ``weights``; None: none
    marked: np.ndarray | None = None


def ternary_png(domains: Sequence[str], panels: Sequence[TernaryPanel], cols: int = 2, suptitle: str = "") -> bytes:
    """Heat maps on the 3-domain simplex: interpolated colour where there are enough points, dots on top."""
    if len(domains) != 3:
        raise ValueError(f"a ternary plot needs 3 domains, got {list(domains)}")
    fig, axes = _grid(len(panels), cols, 4.4, 3.7)
    for ax, p in zip(axes, panels):
        _ternary_axes(ax, domains)
        v = np.asarray(p.values, float)
        if not len(v):
            ax.set_title(f"{p.title}\n(no scores)", fontsize=10)
            continue
        x, y = ternary_xy(p.weights)
        vmin, vmax = float(np.min(v)), float(np.max(v))
        if vmax <= vmin:
            vmax = vmin + 1e-9
        mappable = None
        if p.interpolate and len(v) >= 6:
            try:
                tri = Triangulation(x, y)
                mappable = ax.tricontourf(tri, v, levels=12, cmap="viridis", vmin=vmin, vmax=vmax, alpha=0.85)
            except (ValueError, RuntimeError):  # collinear or duplicate points: dots only
                mappable = None
        dots = ax.scatter(x, y, c=v, cmap="viridis", vmin=vmin, vmax=vmax, s=22, edgecolor="black", linewidth=0.4)
        if p.marked is not None and np.any(p.marked):
            m = np.asarray(p.marked, bool)
            ax.scatter(x[m], y[m], s=70, facecolor="none", edgecolor="black", linewidth=1.1, zorder=3)
        best = int(np.argmax(v))
        ax.scatter([x[best]], [y[best]], marker="*", s=180, color="tab:red", edgecolor="white", linewidth=0.8)
        fig.colorbar(mappable or dots, ax=ax, shrink=0.7)
        ax.set_title(p.title, fontsize=10)
    if suptitle:
        fig.suptitle(suptitle)
    return png(fig)


def history_png(numbers: Sequence[int], values: Sequence[float], title: str) -> bytes:
    """Objective of every finished trial and the best so far."""
    fig = Figure(figsize=(7, 3.8), layout="constrained")
    ax = fig.subplots()
    n = np.asarray(numbers, float)
    v = np.asarray(values, float)
    ax.scatter(n, v, s=18, color="tab:blue", label="trial")
    if len(v):
        order = np.argsort(n)
        ax.step(n[order], np.maximum.accumulate(v[order]), where="post", color="tab:red", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("objective")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return png(fig)


def weights_png(domains: Sequence[str], labels: Sequence[str], weights: np.ndarray, title: str) -> bytes:
    """Horizontal stacked bars: the mixture weights of the best trials, best on top."""
    w = np.asarray(weights, float).reshape(len(labels), len(domains))
    fig = Figure(figsize=(7, 0.9 + 0.38 * max(1, len(labels))), layout="constrained")
    ax = fig.subplots()
    left = np.zeros(len(labels))
    ypos = np.arange(len(labels))[::-1]
    colors = [f"C{i % 10}" for i in range(len(domains))]
    for i, d in enumerate(domains):
        ax.barh(ypos, w[:, i], left=left, color=colors[i], label=d, edgecolor="white", linewidth=0.5)
        for yy, ll, ww in zip(ypos, left, w[:, i]):
            if ww >= 0.08:
                ax.text(ll + ww / 2, yy, f"{ww:.2f}", ha="center", va="center", fontsize=7, color="white")
        left += w[:, i]
    ax.set_yticks(ypos, labels, fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("weight")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, ncols=min(len(domains), 4), loc="upper center", bbox_to_anchor=(0.5, -0.18))
    return png(fig)


@dataclass
class EdgePanel:
    """One benchmark along one edge of the simplex (two domains): proxy and trained score against the weight of the
    edge's second domain (0 = the first domain's expert, 1 = the second's)."""

    title: str
    proxy_x: np.ndarray
    proxy: np.ndarray
    trained_x: np.ndarray
    trained: np.ndarray  # mean over seeds
    trained_lo: np.ndarray  # seed range
    trained_hi: np.ndarray
    xlabel: str = "weight"
    #: which trained points are experts (the vertices), drawn apart: they are trained on one domain only
    expert: np.ndarray | None = None


def edges_png(panels: Sequence[EdgePanel], cols: int, suptitle: str = "") -> bytes:
    """Proxy and trained curves along simplex edges: one panel per (edge, benchmark), a row per edge."""
    fig, axes = _grid(len(panels), cols, 4.0, 3.2)
    for ax, p in zip(axes, panels):
        px, py = np.asarray(p.proxy_x, float), np.asarray(p.proxy, float)
        tx, ty = np.asarray(p.trained_x, float), np.asarray(p.trained, float)
        lo, hi = np.asarray(p.trained_lo, float), np.asarray(p.trained_hi, float)
        o = np.argsort(px, kind="stable")
        ax.plot(px[o], py[o], marker="o", markersize=4, color="tab:orange", label="proxy")
        o = np.argsort(tx, kind="stable")
        ax.fill_between(tx[o], lo[o], hi[o], color="tab:blue", alpha=0.18, linewidth=0, label="seed range")
        ax.plot(tx[o], ty[o], marker="s", markersize=4, color="tab:blue", label="trained (mean over seeds)")
        if p.expert is not None and np.any(p.expert):
            e = np.asarray(p.expert, bool)
            ax.scatter(tx[e], ty[e], marker="D", s=46, facecolor="none", edgecolor="black", zorder=4, label="expert")
        ax.set_xlim(-0.03, 1.03)
        ax.set_xlabel(p.xlabel)
        ax.set_ylabel("score")
        ax.set_title(p.title, fontsize=10)
        ax.grid(alpha=0.3)
    if axes:
        axes[0].legend(fontsize=7, loc="best")
    if suptitle:
        fig.suptitle(suptitle)
    return png(fig)


def _staircase(ax, points: np.ndarray, color: str, label: str) -> None:
    """A 2-objective front (maximised) as the boundary of the region it dominates."""
    p = points[np.argsort(-points[:, 0], kind="stable")]
    xs, ys = [p[0, 0]], [p[0, 1]]
    for x, y in p[1:]:
        xs += [x, x]
        ys += [ys[-1], y]
    ax.plot(xs, ys, color=color, linewidth=1.4, label=label, zorder=2)
    ax.scatter(p[:, 0], p[:, 1], s=10, color=color, zorder=2)  # a front of one point is a point


@dataclass
class FrontPanel:
    """Two objectives of one set of mixtures: proxy scores and, where trained, trained scores (NaN rows: not trained),
    and which mixtures are on the proxies' front and on the trained front."""

    title: str
    names: tuple[str, str]
    proxy: np.ndarray  # (n, 2)
    trained: np.ndarray  # (n, 2), NaN where a mixture has no trained score
    proxy_front: np.ndarray  # (n,) bool
    trained_front: np.ndarray  # (n,) bool, among the trained ones


def front_png(panels: Sequence[FrontPanel], suptitle: str = "") -> bytes:
    """Per panel, proxy and trained scores of every mixture in the plane of two objectives, with both fronts; a grey
    line joins a mixture's proxy and trained point; the trained scores of the proxy's front are ringed."""
    fig, axes = _grid(len(panels), 2, 5.2, 4.4)
    for ax, p in zip(axes, panels):
        prox, tr = np.asarray(p.proxy, float), np.asarray(p.trained, float)
        pf, tf = np.asarray(p.proxy_front, bool), np.asarray(p.trained_front, bool)
        has = np.isfinite(tr).all(axis=1)
        for a, b in zip(prox[has], tr[has]):
            ax.plot([a[0], b[0]], [a[1], b[1]], color="0.8", linewidth=0.6, zorder=0)
        ax.scatter(prox[:, 0], prox[:, 1], s=18, color="tab:orange", alpha=0.6, label="proxy", zorder=1)
        if has.any():
            ax.scatter(tr[has, 0], tr[has, 1], s=22, color="tab:blue", alpha=0.7, label="trained", zorder=1)
        if pf.any():
            _staircase(ax, prox[pf], "tab:orange", "proxy front")
        if (tf & has).any():
            _staircase(ax, tr[tf & has], "tab:blue", "trained front")
        ring = pf & has
        if ring.any():
            ax.scatter(tr[ring, 0], tr[ring, 1], s=80, facecolor="none", edgecolor="tab:orange", linewidth=1.3,
                       label="trained score of a proxy-front mixture", zorder=3)  # fmt: skip
        ax.set_xlabel(p.names[0])
        ax.set_ylabel(p.names[1])
        ax.set_title(p.title, fontsize=10)
        ax.grid(alpha=0.3)
    if axes:
        axes[0].legend(fontsize=7, loc="best")
    if suptitle:
        fig.suptitle(suptitle)
    return png(fig)


def parallel_png(
    names: Sequence[str],
    proxy: np.ndarray,
    labels: Sequence[str],
    title: str,
    trained: np.ndarray | None = None,
) -> bytes:
    """Parallel coordinates of a front of three or more objectives: one line per mixture across the objectives
    (each axis scaled to the range of the values drawn on it, its ends labelled), the proxy's scores solid and, where
    given and finite, the same mixture's trained scores dashed in the same colour."""
    p = np.asarray(proxy, float).reshape(len(labels), len(names))
    t = None if trained is None else np.asarray(trained, float).reshape(p.shape)
    both = p if t is None else np.vstack([p, t[np.isfinite(t).all(axis=1)]])
    lo, hi = both.min(axis=0), both.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    fig = Figure(figsize=(max(6.0, 1.9 * len(names)), 4.6), layout="constrained")
    ax = fig.subplots()
    xs = np.arange(len(names))
    for i, label in enumerate(labels):
        color = f"C{i % 10}"
        ax.plot(xs, (p[i] - lo) / span, color=color, marker="o", markersize=3, linewidth=1.3, label=label)
        if t is not None and np.isfinite(t[i]).all():
            ax.plot(xs, (t[i] - lo) / span, color=color, linestyle="--", linewidth=1.0, alpha=0.8)
    for j, x in enumerate(map(float, xs)):
        ax.axvline(x, color="0.6", linewidth=0.8, zorder=0)
        ax.text(x, -0.06, f"{lo[j]:.3f}", ha="center", va="top", fontsize=7)
        ax.text(x, 1.04, f"{hi[j]:.3f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(xs, list(names), fontsize=8)
    ax.set_ylim(-0.15, 1.12)
    ax.set_yticks([])
    ax.set_title(title + ("  (solid: proxy, dashed: trained)" if t is not None else ""), fontsize=10)
    if len(labels) <= 12:
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return png(fig)
