"""Which sampler finds most of the front of a multi-objective study in a fixed budget (issue 25, item 1).

The default sampler of a space with ``objective: {pareto: [...]}`` that names none
(``dmo.search.samplers.DEFAULT_MULTI_OBJECTIVE``) is chosen by the rule below, replayed as
``benchmarks/search_efficiency.py`` replays single-objective samplers: real dmo studies (stick-breaking box, dmo's
sampler defaults, SQLite storage, the results-table cache) whose proposals are answered with the recorded scores of
the nearest lattice mixture.

Rules, fixed before the runs:

- **Surfaces**: the tiny world's linear proxies on its 3-domain lattice at resolution 1/16 (153 mixtures) and its
  4-domain lattice at resolution 1/8 (165 mixtures), scored once through the normal cached path
  (``search_efficiency.record_surface``; ``--tables`` reads the same proxies' full scores from the recording of
  ``benchmarks/adaptive_scoring.py`` instead, which scores every item of every benchmark). The objectives are the
  space's benchmarks, one each (3 and 4).
- **Samplers**: the multi-objective samplers of the registry that model what they have seen (TPE, NSGA-II) and the
  two that do not (random, QMC), with dmo's defaults. **GP is left out for its cost**: one 30-trial GP study with 3
  or 4 objectives took 540 s and 870 s on the synthetic surfaces of ``--synthetic`` (one seed, this 2-core machine
  under a load average of 13), 15-30x the others; 40 of them would take about 8 hours. It stays available by name.
  ``--samplers ...,grid`` also replays the paper's fixed grid (its mixtures in a seeded random order), which cannot
  be the default.
- **Budget**: ``BUDGET`` = 30 trials per study, ``SEEDS`` = 20 seeds per sampler and surface.
- **Figure**: the hypervolume of the objective vectors of a study's first 30 trials relative to the hypervolume of the
  lattice's own front, one reference point per surface (``dmo.pareto.reference_point`` of all lattice scores).
- **Rule**: the default is the sampler with the highest median over seeds of the mean over the two surfaces of that
  ratio; samplers within ``TIE`` = 0.005 of the best are tied, and the tie goes to the higher 10th percentile over
  seeds, then to the fewer seconds per study.

Run ``python benchmarks/pareto_samplers.py`` (scores the lattices first: about 20 minutes on 2 CPU cores the first
time); ``--synthetic`` replays against search_efficiency's analytic surfaces instead; ``--json`` writes the results
(default ``benchmarks/results/pareto_samplers.json`` for a run on the real surfaces).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from dmo.config import SearchSpace, load_space, parse_space
from dmo.pareto import hypervolume, non_dominated, reference_point

ROOT = Path(__file__).resolve().parent.parent
# --------------------------------------------------------------------------------------------- fixed before the runs
SURFACES = (("tiny-3d", 16), ("tiny-4d", 8))
SAMPLERS = ("random", "qmc", "tpe", "nsga2")
REFERENCE = ("grid",)
BUDGET = 30
SEEDS = 20
TIE = 0.005
# ----------------------------------------------------------------------------------------------------------------


def _search_efficiency() -> Any:
    spec = importlib.util.spec_from_file_location("search_efficiency", ROOT / "benchmarks" / "search_efficiency.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["search_efficiency"] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


def pareto_space(space: SearchSpace) -> SearchSpace:
    """The space with one objective per benchmark."""
    data = space.model_dump(mode="json")
    data["objective"] = {"pareto": list(space.benchmarks)}
    data["sampler"] = {"name": "random", "n_trials": BUDGET}
    return parse_space(data, source=f"{space.name} (pareto)")


def surface_points(surface: Any, benchmarks: Sequence[str]) -> np.ndarray:
    return np.array([[s[b] for b in benchmarks] for s in surface.scores.values()], float)


def replay_values(
    surface: Any, space: SearchSpace, sampler: str, seed: int, budget: int, grid: str
) -> list[list[float]]:
    """The objective vectors of one multi-objective study replayed against the surface, in trial order."""
    import optuna

    from dmo.search.study import study_paths
    from dmo.search.trials import run_study

    se = sys.modules.get("search_efficiency") or _search_efficiency()
    sp = se.replay_space(space, sampler, seed, budget, grid)
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="dmo-pareto-replay-", dir=shm) as tmp:
        paths = study_paths(sp, root=Path(tmp))
        scorer = se.make_replay_scorer(surface, Path(tmp), sp.merge.method)
        result = run_study(sp, scorer, paths, n_trials=budget, progress=False)
        trials = result.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        return [list(t.values) for t in sorted(trials, key=lambda t: t.number)][:budget]


def relative_hypervolume(values: Sequence[Sequence[float]], lattice: np.ndarray) -> float:
    """Hypervolume of the found vectors / the lattice front's, against the surface's reference point."""
    ref = reference_point(lattice)
    whole = hypervolume(lattice[non_dominated(lattice)], ref)
    return hypervolume(np.asarray(values, float), ref) / whole if len(values) else 0.0


def _job(args: tuple[int, Any, SearchSpace, str, int, int, str]) -> tuple[int, str, int, list[list[float]], float]:
    index, surface, space, sampler, seed, budget, grid = args
    _search_efficiency()
    t0 = time.perf_counter()
    values = replay_values(surface, space, sampler, seed, budget, grid)
    return index, sampler, seed, values, time.perf_counter() - t0


def run(
    surfaces: Sequence[tuple[Any, SearchSpace, str]], samplers: Sequence[str], seeds: int, budget: int, jobs: int = 1
) -> dict[str, Any]:
    """Replay every (surface, sampler, seed); per sampler the relative hypervolume per seed and surface."""
    tasks = [(i, sf, sp, s, seed, budget, grid) for s in samplers for i, (sf, sp, grid) in enumerate(surfaces)
             for seed in range(seeds)]  # fmt: skip
    ratio: dict[str, np.ndarray] = {s: np.full((seeds, len(surfaces)), np.nan) for s in samplers}
    seconds: dict[str, float] = dict.fromkeys(samplers, 0.0)
    lattices = [surface_points(sf, sp.benchmarks) for sf, sp, _ in surfaces]
    spawn = multiprocessing.get_context("spawn")  # see search_efficiency: torch's OpenMP pool and fork do not mix
    with ProcessPoolExecutor(max_workers=jobs, mp_context=spawn) as pool:
        for done, (i, s, seed, values, dt) in enumerate(pool.map(_job, tasks), 1):
            ratio[s][seed, i] = relative_hypervolume(values, lattices[i])
            seconds[s] += dt
            print(f"  {done}/{len(tasks)} {s} surface {i} seed {seed}: {ratio[s][seed, i]:.4f} ({dt:.1f} s)",
                  file=sys.stderr)  # fmt: skip
    n_runs = seeds * len(surfaces)
    return {
        s: {
            "per_seed": ratio[s].tolist(),
            "median_mean": float(np.median(ratio[s].mean(axis=1))),
            "p10_mean": float(np.percentile(ratio[s].mean(axis=1), 10)),
            "median_per_surface": [float(np.median(ratio[s][:, i])) for i in range(len(surfaces))],
            "seconds_per_study": seconds[s] / n_runs,
        }
        for s in samplers
    }


def winner(summary: dict[str, Any]) -> str:
    """The rule: highest median of the mean ratio; within TIE, the higher 10th percentile, then the faster."""
    pool = {s: v for s, v in summary.items() if s not in REFERENCE}
    best = max(v["median_mean"] for v in pool.values())
    tied = [s for s, v in pool.items() if v["median_mean"] >= best - TIE]
    return min(tied, key=lambda s: (-pool[s]["p10_mean"], pool[s]["seconds_per_study"], s))


def render(summary: dict[str, Any], surfaces: Sequence[str]) -> str:
    head = ["sampler", "median (mean over surfaces)", "10th pct", *(f"median {s}" for s in surfaces), "s/study"]
    rows = [
        [s, f"{v['median_mean']:.4f}", f"{v['p10_mean']:.4f}", *(f"{x:.4f}" for x in v["median_per_surface"]),
         f"{v['seconds_per_study']:.1f}"]
        for s, v in summary.items()
    ]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + f"\n\nwinner by the rule: {winner(summary)}"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=SEEDS)
    ap.add_argument("--budget", type=int, default=BUDGET)
    ap.add_argument("--samplers", default=",".join(SAMPLERS), help="comma-separated (grid, gp: also possible)")
    ap.add_argument("--synthetic", action="store_true", help="search_efficiency's analytic surfaces instead")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument(
        "--tables",
        type=Path,
        help="a results folder holding one results folder per surface, adaptive-<space>/ as "
        "benchmarks/adaptive_scoring.py records them: the same linear proxies, every item, read instead of re-scored",
    )
    args = ap.parse_args(argv)
    se = _search_efficiency()
    surfaces = []
    t0 = time.perf_counter()
    for name, resolution in SURFACES:
        space = load_space(ROOT / "search_spaces" / f"{name}.yaml")
        if args.synthetic:
            sf = se.synthetic_surface(space, resolution, seed=len(space.domains))
        elif args.tables:
            sf = se.surface_from_table(args.tables / f"adaptive-{name}" / "scores.jsonl", space, resolution)
        else:
            sf = se.record_surface(space, resolution)
        grid = "paper-" + name.removeprefix("tiny-")
        surfaces.append((sf, pareto_space(space), grid))
    print(f"surfaces ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
    t1 = time.perf_counter()
    summary = run(surfaces, samplers, args.seeds, args.budget, jobs=args.jobs)
    names = [n for n, _ in SURFACES]
    print(render(summary, names))
    doc = {
        "issue": 25,
        "rule": "highest median over seeds of the mean over surfaces of the relative hypervolume after the budget; "
        f"ties within {TIE} to the higher 10th percentile, then the fewer seconds per study; grid excluded",
        "surfaces": [
            {
                "space": n,
                "resolution": r,
                "source": sf.source,
                "mixtures": len(sf.scores),
                "front": int(non_dominated(surface_points(sf, sp.benchmarks)).sum()),
            }
            for (n, r), (sf, sp, _) in zip(SURFACES, surfaces)
        ],
        "budget": args.budget,
        "seeds": args.seeds,
        "synthetic": args.synthetic,
        "samplers": summary,
        "winner": winner(summary),
        "replay_seconds": time.perf_counter() - t1,
        "machine": {"cpus": os.cpu_count(), "jobs": args.jobs},
    }
    out = args.json or (None if args.synthetic else ROOT / "benchmarks" / "results" / "pareto_samplers.json")
    if out is not None:
        out.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
