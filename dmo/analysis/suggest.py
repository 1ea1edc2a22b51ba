"""Which mixtures to train next (``dmo suggest``): spend training runs where they decide the best mixture.

A results table knows the proxy's score at many mixtures and the trained score at a few (plus the experts, which
*are* models trained on the pure domains: exact points at the simplex's vertices). From these, a model of the
trained objective at every untrained candidate, with an uncertainty, and an acquisition rule picking the N
candidates whose training is most informative about the best mixture.

The model, fitted on the known trained points (vertices + trained mixtures) with ``dmo.calibration``:

- two predictors of the trained objective: **regression** (ridge on the weights and their pairwise products, no
  proxy) and the **calibrated proxy** (``residual``: the proxy plus a ridge correction on the same features);
- prediction ``mu`` = their mean;
- uncertainty ``sigma = sqrt(s_boot^2 + d^2)``: ``s_boot`` the standard deviation of ``mu`` over ``n_boot``
  bootstrap resamples of the trained mixtures (the vertices stay in every resample: they are not a sample), and
  ``d`` = half the gap between the two predictors (where proxy and calibration disagree, neither is trusted).

The acquisition rule (fixed before the evaluation in ``benchmarks/suggest_eval.py`` was run):

- **expected improvement** over the incumbent ``best`` (the highest trained objective among trained mixtures,
  or among the experts while no mixture is trained): ``EI = (mu - best) Phi(z) + sigma phi(z)``,
  ``z = (mu - best) / sigma``; with ``sigma = 0``, ``max(mu - best, 0)``. Ties (e.g. every EI 0) go to the higher
  ``mu``, then to the earlier candidate;
- a batch of N is picked greedily. After each pick the incumbent becomes ``max(best, mu_pick)`` (the pick is
  believed to come out at its prediction) and every candidate within total-variation distance
  :data:`DIVERSITY_RADIUS` of a pick has its sigma shrunk by ``distance / radius`` (training one of two near
  mixtures tells most of what training the other would), so a batch spreads over the plausible optima.

Everything here is a pure function of arrays or of a results table (``dmo.analysis`` reads tables only).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import stats

from dmo import calibration as cal
from dmo.errors import DmoError
from dmo.mixture import Mixture

if TYPE_CHECKING:
    from rich.console import Console

#: bootstrap resamples of the trained mixtures behind sigma
N_BOOT = 100
#: total-variation distance within which a pick shrinks the uncertainty of other candidates in the same batch
DIVERSITY_RADIUS = 0.25
#: a weight counts as zero below this (mixture ids round weights to 4 digits)
ZERO = 1e-9


@dataclass(frozen=True)
class Posterior:
    """The model's view of the trained objective at the candidates."""

    mu: np.ndarray  # (n,) prediction: mean of the two predictors
    sigma: np.ndarray  # (n,) uncertainty
    regression: np.ndarray  # (n,) ridge on weight features alone
    calibrated: np.ndarray  # (n,) the proxy plus a ridge correction


def predictors(
    known_w: np.ndarray, known_y: np.ndarray, known_p: np.ndarray, new_w: np.ndarray, new_p: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(regression, calibrated proxy) predictions of the trained objective at ``new_w`` from the known points."""
    known_y, known_p, new_p = (np.asarray(a, float).reshape(-1) for a in (known_y, known_p, new_p))
    reg = cal.regression_predict(known_w, known_y, new_w)[:, 0]
    res = cal.residual_predict(known_w, known_p, known_y, new_w, new_p)[:, 0]
    return reg, res


def posterior(
    known_w: np.ndarray,
    known_y: np.ndarray,
    known_p: np.ndarray,
    cand_w: np.ndarray,
    cand_p: np.ndarray,
    n_fixed: int,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> Posterior:
    """Prediction and uncertainty at the candidates (see the module docstring).

    The first ``n_fixed`` known points (the vertices) are kept in every bootstrap resample; the others (the
    trained mixtures) are resampled with replacement.
    """
    known_w, cand_w = np.atleast_2d(np.asarray(known_w, float)), np.atleast_2d(np.asarray(cand_w, float))
    known_y, known_p = np.asarray(known_y, float), np.asarray(known_p, float)
    if len(known_w) == 0:
        raise DmoError("nothing trained is known: score the experts or at least one trained mixture first")
    reg, res = predictors(known_w, known_y, known_p, cand_w, cand_p)
    mu = (reg + res) / 2
    free = np.arange(n_fixed, len(known_w))
    s_boot = np.zeros(len(cand_w))
    if len(free) >= 2 and n_boot > 0:  # one trained mixture resampled is itself: no spread to measure
        rng = np.random.default_rng(seed)
        boot = np.empty((n_boot, len(cand_w)))
        for i in range(n_boot):
            idx = np.concatenate([np.arange(n_fixed), rng.choice(free, size=len(free), replace=True)])
            r, c = predictors(known_w[idx], known_y[idx], known_p[idx], cand_w, cand_p)
            boot[i] = (r + c) / 2
        s_boot = boot.std(axis=0)
    sigma = np.sqrt(s_boot**2 + ((reg - res) / 2) ** 2)
    return Posterior(mu, sigma, reg, res)


def expected_improvement(mu: np.ndarray, sigma: np.ndarray, best: float) -> np.ndarray:
    """E[max(Y - best, 0)] for Y ~ N(mu, sigma^2); ``max(mu - best, 0)`` where sigma is 0."""
    mu, sigma = np.asarray(mu, float), np.asarray(sigma, float)
    gain = mu - best
    out = np.maximum(gain, 0.0)
    pos = sigma > 0
    z = gain[pos] / sigma[pos]
    out[pos] = gain[pos] * stats.norm.cdf(z) + sigma[pos] * stats.norm.pdf(z)
    return out


def tv_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Total-variation distance between mixtures (rows of ``a``) and one mixture ``b``: in [0, 1]."""
    return 0.5 * np.abs(np.asarray(a, float) - np.asarray(b, float)).sum(axis=-1)


def pick(
    post: Posterior, cand_w: np.ndarray, best: float, k: int, radius: float = DIVERSITY_RADIUS
) -> tuple[list[int], np.ndarray]:
    """Greedy batch of ``k`` candidate indices by expected improvement with the diversity rule; also the EI of
    each pick at the moment it was picked."""
    cand_w = np.asarray(cand_w, float)
    sigma = post.sigma.astype(float).copy()
    chosen: list[int] = []
    acq: list[float] = []
    for _ in range(min(k, len(cand_w))):
        ei = expected_improvement(post.mu, sigma, best)
        ei[chosen] = -np.inf
        # lexsort: last key first; ties in EI go to the higher mu, then the earlier candidate
        order = np.lexsort((np.arange(len(ei)), -post.mu, -ei))
        i = int(order[0])
        chosen.append(i)
        acq.append(float(ei[i]))
        best = max(best, float(post.mu[i]))
        if radius > 0:
            sigma *= np.minimum(1.0, tv_distance(cand_w, cand_w[i]) / radius)
    return chosen, np.array(acq)


def incumbent(known_y: np.ndarray, n_fixed: int) -> float:
    """The best trained objective among trained mixtures; among the experts while none is trained."""
    y = np.asarray(known_y, float)
    return float(np.max(y[n_fixed:] if len(y) > n_fixed else y))


# ------------------------------------------------------------------------------------------- on a results table


@dataclass
class Suggestion:
    table: pd.DataFrame  # one row per suggested mixture, best first
    method: str  # the proxy method whose scores were used
    benchmarks: list[str]
    n_trained: int  # trained mixtures known (besides the experts)
    n_experts: int
    n_candidates: int
    best_known: str  # the incumbent mixture (or expert)
    best_value: float
    notes: list[str] = field(default_factory=list)  # what the calibration points left out (dmo.calibration)


def _objective_of(
    frame: pd.DataFrame, benchmarks: Sequence[str], objective: Callable[[dict[str, float]], float]
) -> pd.Series:
    """Objective per mixture of a (mixture x benchmark) table; mixtures missing a benchmark are dropped."""
    frame = frame.reindex(columns=list(benchmarks)).dropna()
    return pd.Series({m: objective(dict(row.items())) for m, row in frame.iterrows()}, dtype=float)


def _mean(scores: dict[str, float]) -> float:
    return sum(scores.values()) / len(scores)


def suggest(
    df: pd.DataFrame,
    k: int,
    domains: Sequence[str] | None = None,
    candidates: Sequence[Mixture] | None = None,
    benchmarks: Sequence[str] | None = None,
    objective: Callable[[dict[str, float]], float] | None = None,
    method: str | None = None,
    n_boot: int = N_BOOT,
    seed: int = 0,
    radius: float = DIVERSITY_RADIUS,
) -> Suggestion:
    """The ``k`` mixtures to train next, from a results table (``ResultsTable.frame()``).

    ``candidates``: the mixtures to choose from (a space's candidates); default every mixture with a proxy score.
    Either way only candidates with a proxy score on every benchmark and no trained score count. ``benchmarks``:
    default those with both proxy and trained/expert scores; ``objective``: default their mean; ``method``: the proxy
    method (default ``linear`` if scored, else the only one).
    """
    if k < 1:
        raise DmoError(f"--k must be at least 1, got {k}")
    ok = df[(df["status"] == "ok") & df["score"].notna()].copy()
    ok["score"] = ok["score"].astype(float)
    proxy = ok[ok["kind"] == "proxy"]
    if proxy.empty:
        raise DmoError("the results table has no proxy scores: run 'dmo study' (or the grid sampler) first")
    methods = sorted(proxy["method"].fillna("").astype(str).unique())
    if method is None:
        if "linear" in methods or len(methods) == 1:
            method = "linear" if "linear" in methods else methods[0]
        else:
            raise DmoError(
                f"the results table has proxies of several methods ({', '.join(methods)}): pick one with --method"
            )
    elif method not in methods:
        raise DmoError(f"no proxy scores of method {method!r} in the results table (it has: {', '.join(methods)})")
    proxy = proxy[proxy["method"] == method]
    wcols = [c for c in proxy.columns if c.startswith("w_") and proxy[c].notna().any()]
    doms = list(domains) if domains is not None else [c.removeprefix("w_") for c in wcols]
    if len(doms) < 2:
        raise DmoError(f"a suggestion needs at least 2 domains, the proxies have {doms}")
    if benchmarks is None:
        have = set(ok.loc[ok["kind"] == "trained", "benchmark"])
        have |= set(ok.loc[(ok["kind"] == "expert") & ok["mixture"].isin(doms), "benchmark"])
        benchmarks = sorted(set(proxy["benchmark"]) & have)
    benchmarks = list(benchmarks)
    if not benchmarks:
        raise DmoError("no benchmark has both proxy scores and trained or expert scores: score the experts first")
    objective = objective or _mean

    def weights_of(part: pd.DataFrame) -> dict[str, np.ndarray]:
        first = part.drop_duplicates("mixture").set_index("mixture")
        cols = [f"w_{d}" for d in doms]
        for c in cols:
            if c not in first:
                first[c] = 0.0
        return {m: first.loc[m, cols].fillna(0.0).to_numpy(float) for m in first.index}

    def pivot(part: pd.DataFrame) -> pd.DataFrame:
        return part.pivot_table(index="mixture", columns="benchmark", values="score", aggfunc="mean")

    p_obj = _objective_of(pivot(proxy), benchmarks, objective)
    p_w = weights_of(proxy)
    # the known points: the one rule of dmo.calibration (experts at the vertices, trained mixtures with a proxy)
    points = cal.calibration_points(df, doms, benchmarks, method)
    bench_scores = lambda a: np.array([objective(dict(zip(benchmarks, row))) for row in a], float)  # noqa: E731
    known_w, known_y, known_p = points.weights, bench_scores(points.truth), bench_scores(points.proxy)
    n_vert = points.n_vertices
    vert_names, tr_names = list(points.names[:n_vert]), list(points.names[n_vert:])
    if len(known_w) == 0:
        raise DmoError("no expert and no trained mixture has scores on these benchmarks: score the experts first")

    trained_ids = set(points.trained)
    if candidates is not None:
        by_w = {tuple(np.round(w, 4)): m for m, w in p_w.items() if m in p_obj.index}
        asked = [np.array([m.as_dict().get(d, 0.0) for d in doms]) for m in candidates]
        pool = [(by_w[key], w) for w in asked if (key := tuple(np.round(w, 4))) in by_w]
    else:
        pool = [(m, p_w[m]) for m in p_obj.index]
    trained_w = list(points.trained.values())
    pool = [
        (m, w)
        for m, w in pool
        if m not in trained_ids and np.count_nonzero(w > ZERO) > 1 and not any(np.allclose(w, t) for t in trained_w)
    ]
    if not pool:
        raise DmoError(
            "no candidate mixture to suggest: every candidate with a proxy score is trained already or is a vertex"
            + (" (or the space's candidates have no proxy scores: run 'dmo study' on the space)" if candidates else "")
        )
    cand_w = np.array([w for _, w in pool])
    cand_p = np.array([p_obj[m] for m, _ in pool])
    post = posterior(known_w, known_y, known_p, cand_w, cand_p, n_fixed=n_vert, n_boot=n_boot, seed=seed)
    best = incumbent(known_y, n_vert)
    names = vert_names + tr_names
    best_name = names[int(np.argmax(known_y[n_vert:])) + n_vert] if tr_names else names[int(np.argmax(known_y))]
    chosen, acq = pick(post, cand_w, best, k, radius)
    rows = []
    for r, (i, a) in enumerate(zip(chosen, acq)):
        rows.append(
            {
                "rank": r + 1,
                "mixture": pool[i][0],
                **{f"w_{d}": float(cand_w[i, j]) for j, d in enumerate(doms)},
                "predicted": float(post.mu[i]),
                "uncertainty": float(post.sigma[i]),
                "expected_improvement": a,
                "proxy": float(cand_p[i]),
                "regression": float(post.regression[i]),
                "calibrated": float(post.calibrated[i]),
            }
        )
    return Suggestion(
        table=pd.DataFrame(rows),
        method=method,
        benchmarks=benchmarks,
        n_trained=len(tr_names),
        n_experts=n_vert,
        n_candidates=len(pool),
        best_known=best_name,
        best_value=best if math.isfinite(best) else math.nan,
        notes=list(points.notes),
    )


SUGGEST_FORMATS = ("table", "json")


def suggestion_json(s: Suggestion) -> str:
    """The suggestion as one JSON document: what it was based on, and the mixtures in order."""
    import json

    doc = {
        "method": s.method,
        "benchmarks": s.benchmarks,
        "n_trained": s.n_trained,
        "n_experts": s.n_experts,
        "n_candidates": s.n_candidates,
        "best_known": s.best_known,
        "best_value": None if math.isnan(s.best_value) else s.best_value,
        "rule": "expected improvement over the best trained mixture; mu = mean of regression and calibrated proxy, "
        f"sigma from {N_BOOT} bootstraps of the trained mixtures and their disagreement; batch diversity radius "
        f"{DIVERSITY_RADIUS} (total variation)",
        "suggestions": json.loads(s.table.to_json(orient="records")),
        "notes": s.notes,
    }
    return json.dumps(doc, indent=2)


def render_suggestion(console: Console, s: Suggestion, fmt: str = "table") -> None:
    """Print a suggestion on a rich console: a table with a one-line summary, or JSON."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    if fmt not in SUGGEST_FORMATS:
        raise DmoError(f"unknown format {fmt!r}: choose one of {', '.join(SUGGEST_FORMATS)}")
    if fmt == "json":
        console.print(suggestion_json(s), highlight=False, soft_wrap=True)
        return
    title = (
        f"train next ({s.method} proxy, {s.n_trained} trained mixtures + {s.n_experts} experts known, "
        f"{s.n_candidates} candidates; best so far {s.best_known} = {s.best_value:.4f})"
    )
    t = Table(title=escape(title), title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    # short headers: the table must fit an 80-column terminal
    for h in ("rank", "mixture", "predicted", "±", "EI", "proxy", "regr.", "calib."):
        t.add_column(h, overflow="fold", min_width=16) if h == "mixture" else t.add_column(h, justify="right")
    for r in s.table.itertuples():
        t.add_row(
            str(r.rank), escape(str(r.mixture)), f"{r.predicted:.4f}", f"{r.uncertainty:.4f}",
            f"{r.expected_improvement:.4f}", f"{r.proxy:.4f}", f"{r.regression:.4f}", f"{r.calibrated:.4f}",
        )  # fmt: skip
    console.print(t)
    console.print(
        "objective over " + ", ".join(s.benchmarks) + "; predicted = mean of the regression on the weights and "
        "the calibrated proxy (regr., calib.); ± = their bootstrap spread and disagreement; EI = expected "
        "improvement over the best so far",
        highlight=False,
        soft_wrap=True,
    )
    for note in s.notes:
        console.print(f"note: {note}", highlight=False, soft_wrap=True, markup=False)
