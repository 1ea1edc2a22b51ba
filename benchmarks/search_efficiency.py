"""How many proxy evaluations each sampler needs to find a near-best mixture (issue 9, deliverable 5).

1. **Record a surface once.** Every mixture of the tiny world's 3-domain space on the lattice of resolution 1/16
   (C(18, 2) = 153 mixtures, corners included) is merged and scored through the normal cached path, so the
   scores land in ``results/<space>/scores.jsonl`` and a second run scores nothing.
2. **Replay the samplers against it.** For each sampler (random, TPE, GP, CMA-ES, and the DMO paper's fixed
   preset grid) and each of ``--seeds`` seeds, a real ``dmo`` study (stick-breaking box, dmo's sampler
   defaults, SQLite storage, the results-table cache) runs ``--budget`` trials; a proposed mixture is answered
   with the recorded scores of its nearest lattice mixture. The paper's grid is its 21 mixtures in a seeded
   random order (it has nothing else to propose).
3. **Print a table:** evaluations until a mixture within 1% of the lattice optimum is found (median and worst
   over seeds; ">B" = not within the budget B), and the regret (lattice optimum minus the best objective found)
   after 10, 20 and 40 evaluations, median over seeds. The target: the default sampler reaches 1% of the
   optimum in at most 30% of the lattice's evaluations (45 of 153).

Run: ``python benchmarks/search_efficiency.py`` (needs the tiny world and the ``hf`` backend for step 1, a few
minutes the first time); ``--synthetic`` replays against an analytic accuracy-like surface instead, and
``--from-table PATH`` against lattice proxies already in a results table. ``--synthetic --surfaces N`` pools
the runs over N synthetic surfaces (optima in different places). ``--jobs`` replays in parallel.

Answering from the recorded surface: dmo's ``replay`` scoring backend (``dmo/scoring/replay_backend.py``, with
``nearest=True``) reads a table of just the lattice proxies; where that backend is missing, the small
:class:`ReplayScorer` below does the same (nearest lattice mixture by largest-remainder rounding).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dmo.config import SearchSpace, load_space, parse_space
from dmo.mixture import Mixture, lattice
from dmo.presets import preset
from dmo.scoring.base import Evaluation, Target

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SPACE = ROOT / "search_spaces" / "tiny-3d.yaml"
SAMPLERS = ("random", "tpe", "gp", "cmaes", "grid")
CHECKPOINTS = (10, 20, 40)


# --- the recorded surface -----------------------------------------------------------------------------------


@dataclass
class Surface:
    """Scores of every lattice mixture: {mixture id: {benchmark: score}} and the objective of each."""

    domains: tuple[str, ...]
    resolution: int
    scores: dict[str, dict[str, float]]
    objective: dict[str, float]
    source: str = ""

    @property
    def best_id(self) -> str:
        return max(self.objective, key=lambda m: (self.objective[m], m))

    @property
    def optimum(self) -> float:
        return self.objective[self.best_id]

    @property
    def digest(self) -> str:
        blob = json.dumps([self.domains, self.resolution, sorted(self.scores.items())], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def snap(self, mixture: Mixture) -> str:
        """The id of the nearest lattice mixture (largest-remainder rounding of w * resolution)."""
        w = np.array([mixture[d] for d in self.domains]) * self.resolution
        counts = np.floor(w + 1e-9).astype(int)
        left = self.resolution - counts.sum()
        order = sorted(range(len(w)), key=lambda i: (-(w[i] - counts[i]), i))
        for i in order[:left]:
            counts[i] += 1
        return Mixture(self.domains, tuple(c / self.resolution for c in counts)).id


class ReplayScorer:
    """A scoring backend that answers from a recorded surface: the scores of the nearest lattice mixture."""

    name = "replay"

    def __init__(self, surface: Surface) -> None:
        self.surface = surface

    def fingerprint(self, target: Target) -> str:
        return f"replay:{target.kind}:{target.label}"

    def settings(self) -> dict[str, Any]:
        return {"surface": self.surface.digest}

    def evaluate(self, target: Target, benchmarks: Sequence[str]) -> Evaluation:
        assert target.mixture is not None
        scores = self.surface.scores[self.surface.snap(target.mixture)]
        return Evaluation(
            {b: scores[b] for b in benchmarks if b in scores},
            errors={b: "not recorded" for b in benchmarks if b not in scores},
        )


def write_surface_table(surface: Surface, path: Path, method: str = "linear") -> Path:
    """The surface as a results table of lattice proxies (what the ``replay`` backend reads)."""
    from dmo.results import ResultsTable, ScoreRow

    rows = [
        ScoreRow("proxy", m, b, v, weights=Mixture.parse(m, surface.domains).as_dict(), method=method)
        for m, scores in surface.scores.items()
        for b, v in scores.items()
    ]
    ResultsTable(path).append(rows)
    return path


def make_replay_scorer(surface: Surface, folder: Path, method: str = "linear"):
    """dmo's ``replay`` backend over the lattice only, nearest recorded mixture answering; else ours."""
    try:
        from dmo.scoring.replay_backend import ReplayScorer as Registered
    except ImportError:
        return ReplayScorer(surface)
    return Registered(write_surface_table(surface, folder / "surface.jsonl", method), nearest=True)


def record_surface(space: SearchSpace, resolution: int, progress: bool = True) -> Surface:
    """Score every lattice mixture's proxy through the results-table cache (the real, slow path)."""
    from rich.progress import Progress

    from dmo.scoring.base import score_target
    from dmo.session import Session

    # The lattice as the space's candidates: the experts are all it needs, not the paper grid's trained models.
    data = space.model_dump(mode="json")
    data["mixtures"] = {"lattice": {"resolution": resolution}}
    space = parse_space(data, source=space.name or "<space>")
    session = Session.open("", space=space)
    params = tuple(sorted(space.merge.params.items()))
    mixtures = lattice(space.domains, resolution)
    scores: dict[str, dict[str, float]] = {}
    failed: dict[str, dict[str, str]] = {}
    with Progress(disable=not progress) as bar:
        task = bar.add_task(f"lattice 1/{resolution} of {space.name}", total=len(mixtures))
        for m in mixtures:
            target = Target("proxy", mixture=m, method=space.merge.method, params=params)
            got, errors = score_target(session.scorer, session.table, target, space.benchmarks, group=space.name or "")
            scores[m.id] = got
            if errors:
                failed[m.id] = errors
            bar.advance(task)
    if failed:
        first = next(iter(failed.items()))
        raise SystemExit(f"{len(failed)} lattice mixtures failed to score, e.g. {first[0]}: {first[1]}")
    return Surface(
        tuple(space.domains),
        resolution,
        scores,
        {m: space.objective(s) for m, s in scores.items()},
        source=str(session.table.path),
    )


def surface_from_table(path: Path, space: SearchSpace, resolution: int) -> Surface:
    """The lattice proxies of ``space`` already recorded in a results table (mean over repeated rows)."""
    from dmo.results import ResultsTable

    df = ResultsTable(path).frame()
    ok = df[(df["status"] == "ok") & (df["kind"] == "proxy") & (df["method"] == space.merge.method)]
    piv = ok.pivot_table(index="mixture", columns="benchmark", values="score", aggfunc="mean")
    # A vertex's linear proxy is its expert, fingerprinted as the expert: the cache holds it as the expert's row.
    experts = df[(df["status"] == "ok") & (df["kind"] == "expert")]
    by_expert = experts.pivot_table(index="mixture", columns="benchmark", values="score", aggfunc="mean")
    mixtures = lattice(space.domains, resolution)
    for m in mixtures:
        vertex = [d for d in space.domains if m[d] == 1]
        if vertex and m.id not in piv.index and vertex[0] in by_expert.index:
            piv.loc[m.id] = by_expert.loc[vertex[0]]
    ids = [m.id for m in mixtures]
    missing = [i for i in ids if i not in piv.index or piv.loc[i, space.benchmarks].isna().any()]
    if missing:
        raise SystemExit(
            f"{path} lacks {len(missing)} of the {len(ids)} lattice mixtures (e.g. {missing[0]}): "
            "run without --from-table to score them"
        )
    scores = {i: {b: float(piv.at[i, b]) for b in space.benchmarks} for i in ids}
    return Surface(
        tuple(space.domains), resolution, scores, {i: space.objective(s) for i, s in scores.items()}, source=str(path)
    )


def synthetic_surface(
    space: SearchSpace, resolution: int, seed: int = 0, items: int = 500, noise: float = 0.003
) -> Surface:
    """An accuracy-like surface: each benchmark gains concavely from its own domain and a little from the
    others, plus evaluation noise, rounded to 1/items as an accuracy on ``items`` questions is. The optimum
    moves around the simplex with the seed (interior, near an edge)."""
    rng = np.random.default_rng(seed)
    k = len(space.domains)
    benches = list(space.benchmarks) or [f"b_{d}" for d in space.domains]
    base = rng.uniform(0.1, 0.4, len(benches))
    gain = rng.uniform(0.15, 0.8, len(benches))
    scale = rng.uniform(0.05, 0.5, len(benches))
    transfer = rng.uniform(0.0, 0.2, (len(benches), k))
    scores, objective = {}, {}
    for m in lattice(space.domains, resolution):
        w = np.array(m.weights)
        s = {}
        for j, b in enumerate(benches):
            own = w[j % k]
            acc = base[j] + gain[j] * (1 - math.exp(-own / scale[j])) + float(transfer[j] @ w) + rng.normal(0, noise)
            s[b] = round(min(max(acc, 0.0), 1.0) * items) / items
        scores[m.id] = s
        objective[m.id] = float(np.mean(list(s.values())))
    return Surface(tuple(space.domains), resolution, scores, objective, source=f"synthetic(seed={seed})")


# --- replaying a sampler --------------------------------------------------------------------------------------


def replay_space(space: SearchSpace, sampler: str, seed: int, budget: int, grid_preset: str) -> SearchSpace:
    data = space.model_dump(mode="json", exclude={"name", "sampler", "experts", "scoring", "mixtures"})
    if sampler == "grid":
        cands = preset(grid_preset)
        order = np.random.default_rng(seed).permutation(len(cands))
        data["mixtures"] = [cands[i].as_dict() for i in order]
    else:
        data["mixtures"] = {"lattice": {"resolution": 2}}  # unused: only the grid enqueues candidates
    data["name"] = f"replay-{sampler}-{seed}"
    data["sampler"] = {"name": sampler, "n_trials": budget, "seed": seed}
    data["scoring"] = {"backend": "replay"}
    return parse_space(data, source="<replay>")


def replay(
    surface: Surface, space: SearchSpace, sampler: str, seed: int, budget: int, grid_preset: str = "paper-3d"
) -> list[float]:
    """The objective of each trial, in trial order, of one study replayed against the surface."""
    import optuna

    from dmo.search.study import study_paths
    from dmo.search.trials import run_study

    sp = replay_space(space, sampler, seed, budget, grid_preset)
    # Study and results table are throw-away: on a RAM disk where there is one (SQLite commits are fsynced).
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="dmo-replay-", dir=shm) as tmp:
        paths = study_paths(sp, root=Path(tmp))
        scorer = make_replay_scorer(surface, Path(tmp), sp.merge.method)
        result = run_study(sp, scorer, paths, n_trials=budget, progress=False)
        trials = result.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        return [float(t.value) for t in sorted(trials, key=lambda t: t.number)][:budget]


def evals_to_reach(values: Sequence[float], target: float) -> int | None:
    """1-based number of evaluations until a value >= target, or None if never."""
    for i, v in enumerate(values):
        if v >= target:
            return i + 1
    return None


def regret_after(values: Sequence[float], optimum: float, n: int) -> float:
    """Optimum minus the best value among the first n evaluations (all of them if there are fewer)."""
    return optimum - max(values[:n]) if values else math.nan


@dataclass
class SamplerSummary:
    sampler: str
    runs: int
    reached: int
    evals_median: float  # inf when fewer than half the runs got there
    evals_worst: float  # inf when a run never got there
    regret: dict[int, float]
    regret_mean: dict[int, float]
    evaluations: int  # the most evaluations a run of this sampler can make


def summarize(sampler: str, runs: Sequence[tuple[Surface, list[float]]], threshold: float) -> SamplerSummary:
    """Pool the runs of one sampler (each against its own surface: optimum and 1% target are per surface)."""
    hits = [evals_to_reach(v, sf.optimum - threshold * abs(sf.optimum)) for sf, v in runs]
    n = [math.inf if h is None else float(h) for h in hits]
    regrets = {c: [regret_after(v, sf.optimum, c) for sf, v in runs] for c in CHECKPOINTS}
    return SamplerSummary(
        sampler,
        len(runs),
        sum(h is not None for h in hits),
        float(statistics.median(n)),
        max(n),
        {c: float(statistics.median(r)) for c, r in regrets.items()},
        {c: float(np.mean(r)) for c, r in regrets.items()},
        max(len(v) for _, v in runs),
    )


def winner(summaries: Sequence[SamplerSummary]) -> SamplerSummary:
    """Fewest evaluations to 1% (median, then worst), then lowest regret after 20 and 10 evaluations.

    The fixed grid cannot be a default sampler (it never looks beyond its 21 mixtures), so it only competes
    when nothing else was run.
    """
    pool = [s for s in summaries if s.sampler != "grid"] or list(summaries)
    return min(pool, key=lambda s: (s.evals_median, s.evals_worst, s.regret[20], s.regret[10]))


def _job(args: tuple[int, Surface, SearchSpace, str, int, int, str]) -> tuple[int, str, int, list[float], float]:
    index, surface, space, sampler, seed, budget, grid_preset = args
    t0 = time.perf_counter()
    values = replay(surface, space, sampler, seed, budget, grid_preset)
    return index, sampler, seed, values, time.perf_counter() - t0


def run_benchmark(
    surfaces: Surface | Sequence[Surface],
    space: SearchSpace,
    samplers: Sequence[str],
    seeds: int,
    budget: int,
    jobs: int = 1,
    threshold: float = 0.01,
    grid_preset: str = "paper-3d",
    progress: bool = False,
) -> tuple[list[SamplerSummary], dict[str, float]]:
    """Replay every (surface, sampler, seed) and summarise per sampler; also the seconds spent per sampler."""
    surfaces = [surfaces] if isinstance(surfaces, Surface) else list(surfaces)
    tasks = [
        (i, sf, space, s, seed, budget, grid_preset)
        for s in samplers
        for i, sf in enumerate(surfaces)
        for seed in range(seeds)
    ]
    runs: dict[str, list[tuple[Surface, list[float]]]] = {s: [] for s in samplers}
    seconds = dict.fromkeys(samplers, 0.0)
    # spawn, not fork: the parent has run torch's OpenMP pool (recording the surface), and a forked child that
    # touches it again (the GP sampler does) crashes in libgomp.
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=spawn) if jobs > 1 else _Serial() as pool:
        for done, (i, s, seed, values, dt) in enumerate(pool.map(_job, tasks), 1):
            runs[s].append((surfaces[i], values))
            seconds[s] += dt
            if progress:
                print(
                    f"  {done}/{len(tasks)} {s} surface {i} seed {seed}: best {max(values):.4f} "
                    f"(optimum {surfaces[i].optimum:.4f})",
                    file=sys.stderr,
                )
    return [summarize(s, runs[s], threshold) for s in samplers], seconds


class _Serial:
    """``map`` in this process, with the executor's context-manager shape."""

    def __enter__(self) -> _Serial:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def map(self, fn, items):
        return map(fn, items)


def render(
    summaries: Sequence[SamplerSummary],
    surfaces: Surface | Sequence[Surface],
    budget: int,
    threshold: float,
    seconds: dict[str, float] | None = None,
) -> str:
    surfaces = [surfaces] if isinstance(surfaces, Surface) else list(surfaces)
    n_lattice = len(surfaces[0].objective)
    goal = math.floor(0.3 * n_lattice)
    head = [
        "sampler",
        f"reached {threshold:.0%}",
        "evals median",
        "evals worst",
        *(f"regret@{c} median (mean)" for c in CHECKPOINTS),
        "seconds",
    ]

    def ev(x: float, cap: int) -> str:
        return f">{cap}" if math.isinf(x) else f"{x:g}"

    rows = []
    for s in summaries:
        rows.append(
            [
                s.sampler,
                f"{s.reached}/{s.runs}",
                ev(s.evals_median, s.evaluations),
                ev(s.evals_worst, s.evaluations),
                *(f"{s.regret[c]:.4f} ({s.regret_mean[c]:.4f})" for c in CHECKPOINTS),
                f"{(seconds or {}).get(s.sampler, math.nan):.0f}",
            ]
        )
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    lines = []
    for sf in surfaces:
        cut = sf.optimum - threshold * abs(sf.optimum)
        near = sum(v >= cut for v in sf.objective.values())
        lines.append(
            f"surface {sf.source}: {len(sf.objective)} lattice mixtures at resolution 1/{sf.resolution}; "
            f"optimum {sf.optimum:.4f} at {sf.best_id}; {near} mixtures within {threshold:.0%} (>= {cut:.4f})"
        )
    lines += [
        f"budget {budget} evaluations per run; target: the default sampler within {threshold:.0%} of the optimum in "
        f"<= {goal} evaluations (30% of the lattice)",
        "",
        "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths))),
    ]
    for r in rows:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    best = winner(summaries)
    verdict = "meets" if best.evals_median <= goal else "misses"
    lines += [
        "",
        f"winner: {best.sampler} (median {ev(best.evals_median, best.evaluations)} evaluations to "
        f"{threshold:.0%}, worst {ev(best.evals_worst, best.evaluations)}); it {verdict} the target of "
        f"<= {goal} evaluations",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--space", type=Path, default=DEFAULT_SPACE, help="3-domain search space (default: tiny-3d)")
    ap.add_argument("--resolution", type=int, default=16, help="lattice resolution (16: 153 mixtures for 3 domains)")
    ap.add_argument("--samplers", default=",".join(SAMPLERS), help="comma-separated, from " + ", ".join(SAMPLERS))
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--budget", type=int, default=60, help="evaluations per replayed study")
    ap.add_argument("--threshold", type=float, default=0.01, help="relative distance to the optimum that counts")
    ap.add_argument("--grid-preset", default="paper-3d", help="the fixed grid the 'grid' sampler replays")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--synthetic", action="store_true", help="replay against an analytic surface")
    src.add_argument("--from-table", type=Path, help="read the lattice proxies from this scores.jsonl")
    ap.add_argument("--surface-seed", type=int, default=0, help="seed of the (first) --synthetic surface")
    ap.add_argument("--surfaces", type=int, default=1, help="--synthetic: pool the runs over this many surfaces")
    ap.add_argument("--json", type=Path, help="also write the summaries here")
    args = ap.parse_args(argv)

    space = load_space(args.space)
    samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
    bad = [s for s in samplers if s not in SAMPLERS]
    if bad:
        ap.error(f"unknown sampler {bad[0]!r}: choose from {', '.join(SAMPLERS)}")
    t0 = time.perf_counter()
    if args.synthetic:
        surfaces = [synthetic_surface(space, args.resolution, seed=args.surface_seed + i) for i in range(args.surfaces)]
        space = space.model_copy(update={"benchmarks": sorted(next(iter(surfaces[0].scores.values())))})
    elif args.from_table:
        surfaces = [surface_from_table(args.from_table, space, args.resolution)]
    else:
        surfaces = [record_surface(space, args.resolution)]
    print(f"surface ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    summaries, seconds = run_benchmark(
        surfaces,
        space,
        samplers,
        args.seeds,
        args.budget,
        jobs=args.jobs,
        threshold=args.threshold,
        grid_preset=args.grid_preset,
        progress=True,
    )
    print(render(summaries, surfaces, args.budget, args.threshold, seconds))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "surfaces": [
                        {
                            "source": sf.source,
                            "optimum": sf.optimum,
                            "best": sf.best_id,
                            "mixtures": len(sf.objective),
                            "resolution": sf.resolution,
                        }
                        for sf in surfaces
                    ],
                    "budget": args.budget,
                    "seeds": args.seeds,
                    "threshold": args.threshold,
                    "samplers": [
                        {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in s.__dict__.items()}
                        for s in summaries
                    ],
                    "winner": winner(summaries).sampler,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    from dmo.errors import DmoError

    try:
        sys.exit(main())
    except DmoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
