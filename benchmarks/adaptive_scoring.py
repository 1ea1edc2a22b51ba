"""Cheaper studies: how many item evaluations stagewise scoring with a pruner saves, and what it costs (issue 24).

1. **Record each lattice on every item, once.** Every mixture of the tiny world's 3-domain space on the lattice of
   resolution 1/16 (153 mixtures) and of its 4-domain space at 1/8 (165 mixtures), the base and the experts are scored
   on every item of every benchmark through dmo's item-level path (:func:`dmo.scoring.items.score_items`, the ``hf``
   backend), into ``$DMO_RESULTS/adaptive-<space>/``: its ``item_order.json`` and ``items.jsonl`` are the recording,
   and a rerun scores nothing. The per-call overhead and the per-item cost are measured there too.
2. **Replay studies.** For each option below, sampler and seed, a study runs dmo's stage loop
   (:class:`dmo.search.stages.StagedScoring`, the pruner from :func:`dmo.search.stages.make_pruner`, the sampler from
   :func:`dmo.search.samplers.make_sampler`, the stick-breaking box of ``trial_mixture``) against the recording: a
   proposed mixture is answered by its nearest lattice mixture's item scores, and an item of a mixture counts once
   (as the item table makes it). The study is in memory (ask and tell), not the multi-worker loop of ``dmo study``:
   the storage does not change which items are scored.
3. **Report per option**: item evaluations (and seconds, from the measured costs) until the study holds a *fully
   scored* mixture within 1% of the lattice optimum (median and worst seed), the regret at fixed item budgets, and the
   Spearman rho (bootstrap 95% CI) of the stage-1 estimates against the full scores over the lattice, for the plain
   partial mean and for one estimator from the fully scored models (item 3 of the issue).

Run: ``python benchmarks/adaptive_scoring.py`` (``--quick``: the small world, a few seeds, to check the script);
writes ``benchmarks/results/adaptive_scoring.json`` (``--json`` elsewhere) and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

# ----------------------------------------------------------------------------------------------------------------
# Rules and grids, fixed before any run (issue 24, item 4).
#
# LATTICES: the 3d lattice of the default world at 1/16 (153 mixtures) and the 4d one at 1/8 (165 mixtures).
LATTICES = {"3d": ("tiny-3d.yaml", 16), "4d": ("tiny-4d.yaml", 8)}
# SAMPLERS: CMA-ES (dmo's default sampler when this was written; TPE since format 6) and TPE (Optuna's default
# sampler), dmo's settings of each.
SAMPLERS = ("cmaes", "tpe")
SEEDS = 20
# OPTIONS: name -> (pruner, its parameters, stage schedule). "full" scores every proxy on every item in one go.
SCHEDULE = (0.125, 0.25, 0.5, 1.0)
OPTIONS: dict[str, tuple[str, dict[str, Any], tuple[float, ...]]] = {
    "full": ("none", {}, (1.0,)),
    "wilcoxon": ("wilcoxon", {"p_threshold": 0.1}, SCHEDULE),
    "wilcoxon (1/4, 1)": ("wilcoxon", {"p_threshold": 0.1}, (0.25, 1.0)),
    "successive_halving": ("successive_halving", {}, SCHEDULE),
    "hyperband": ("hyperband", {}, SCHEDULE),
    "median": ("median", {}, SCHEDULE),
}
# THRESHOLD: a study has found the optimum once a fully scored (completed) trial is within 1% of the lattice optimum.
THRESHOLD = 0.01
# REFERENCE: full scoring's budget, in full-proxy evaluations (every item of every benchmark of one proxy); the
# regret of an option is read at a quarter of it (TARGET_SHARE), in items.
REFERENCE = 40
TARGET_SHARE = 0.25
# CAP: a replayed study stops after this many full-proxy equivalents of items, or MAX_TRIALS trials.
CAP = 60
MAX_TRIALS = 300
# The estimator (item 3): a stratified mean. Items are put in STRATA strata of difficulty (their mean score over the
# reference models: the base, the experts and the first N_REFERENCE lattice proxies in a seeded order), and a
# partial run's items are weighted so that each stratum counts by its share of all the benchmark's items. Its
# stage-1 rho is compared with the plain partial mean's on the other lattice mixtures (paired bootstrap, 1000).
STRATA = 4
N_REFERENCE = 10
N_BOOT = 1000
#
# THE RULE (the default):
#   An option meets the target on a lattice and sampler when its median regret at TARGET_SHARE x REFERENCE full
#   proxies' items is <= full scoring's median regret at REFERENCE full proxies' items (the same median regret with
#   at most a quarter of the item evaluations).
#   - If options meet it on both lattices with both samplers, the default pruner is the one of those with the fewest
#     median item evaluations to 1% (CMA-ES, 3d; then 4d; then the worst seed), with its schedule.
#   - Otherwise the default stays `none` (full scoring), and the report names the option closest to the target:
#     the smallest worst-case ratio of its median regret at the quarter budget to full scoring's, over the four cells.
#   The estimator is kept only if its stage-1 rho beats the plain partial mean's by more than the CI: the lower end of
#   the paired bootstrap 95% CI of (rho_estimator - rho_mean) > 0 on both lattices.
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Recording:
    """One lattice scored on every item: per mixture and benchmark, its item scores in the item order."""

    space: str
    domains: tuple[str, ...]
    resolution: int
    benchmarks: list[str]
    ids: list[str]
    weights: np.ndarray  # (mixtures, K)
    items: dict[str, np.ndarray]  # benchmark -> (mixtures, items) in order positions
    refs: dict[str, np.ndarray]  # benchmark -> (base + experts, items)
    seconds_per_item: float
    seconds_per_call: float
    objective: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (mixtures,) full objective

    @property
    def totals(self) -> dict[str, int]:
        return {b: int(a.shape[1]) for b, a in self.items.items()}

    @property
    def per_proxy(self) -> int:
        return sum(self.totals.values())

    def snap(self, weights: Sequence[float]) -> int:
        """The index of the nearest lattice mixture (largest-remainder rounding of w * resolution)."""
        w = np.asarray(weights) * self.resolution
        counts = np.floor(w + 1e-9).astype(int)
        left = self.resolution - int(counts.sum())
        for i in sorted(range(len(w)), key=lambda i: (-(w[i] - counts[i]), i))[:left]:
            counts[i] += 1
        target = counts / self.resolution
        return int(np.argmin(np.abs(self.weights - target).sum(axis=1)))


def record(base: Any, resolution: int, name: str, progress: bool = True) -> Recording:
    """Score the lattice, the base and the experts on every item (cached in the results folder)."""
    from dmo.config import parse_space
    from dmo.mixture import lattice
    from dmo.paths import SpaceFolder
    from dmo.scoring.base import Target
    from dmo.scoring.items import ItemStore, score_items
    from dmo.session import Session

    data = base.model_dump(mode="json")
    data.update(name=name, mixtures={"lattice": {"resolution": resolution}})
    space = parse_space(data, source=name)
    session = Session.open("", space=space)
    folder = SpaceFolder.for_space(name)
    store = ItemStore.open(folder, session.scorer, space.benchmarks)
    totals = store.totals
    mixtures = lattice(space.domains, resolution)
    refs = [Target("base"), *(Target("expert", domain=d) for d in space.domains)]
    proxies = [Target("proxy", mixture=m, method=space.merge.method) for m in mixtures]
    t0, done = time.perf_counter(), 0
    out: list[Any] = []
    for k, target in enumerate(refs + proxies):
        (res,) = score_items(session.scorer, session.table, store, [target], totals, group=name)
        if res.errors:
            raise SystemExit(f"{target.label} failed: {res.errors}")
        out.append(res)
        done += 1
        if progress and (k % 10 == 0 or k == len(refs) + len(proxies) - 1):
            print(
                f"  {name}: {k + 1}/{len(refs) + len(proxies)} scored ({time.perf_counter() - t0:.0f} s)",
                file=sys.stderr,
            )
    per_item, per_call = _costs(session, store, name, totals)
    arrays = {b: np.array([r.values[b] for r in out], dtype=float) for b in space.benchmarks}
    rec = Recording(
        name, tuple(space.domains), resolution, list(space.benchmarks), [m.id for m in mixtures],
        np.array([m.weights for m in mixtures]), {b: a[len(refs):] for b, a in arrays.items()},
        {b: a[: len(refs)] for b, a in arrays.items()}, per_item, per_call,
    )  # fmt: skip
    rec.objective = objective_of(rec, {b: rec.items[b].mean(axis=1) for b in rec.benchmarks}, space)
    return rec


def _costs(session: Any, store: Any, name: str, totals: dict[str, int]) -> tuple[float, float]:
    """Seconds per item and per scoring call: the recorded full calls' seconds against three calls of one item per
    benchmark (the base, in a scratch item store, so the recording is untouched)."""
    import tempfile

    from dmo.paths import SpaceFolder
    from dmo.results import ResultsTable
    from dmo.scoring.base import Target
    from dmo.scoring.items import ItemStore, ItemTable, score_items

    rows = [r for r in ItemTable(SpaceFolder.for_space(name).items).rows() if r.get("kind") == "proxy"]
    full = [float(r["seconds"]) for r in rows if len(r.get("items") or {}) == totals[r["benchmark"]]]
    per_proxy = float(np.median(full)) * len(totals) if full else math.nan  # a row's seconds are its share of a call
    small = []
    for i in range(3):
        with tempfile.TemporaryDirectory() as tmp:
            scratch = ItemStore(store.orders, ItemTable(Path(tmp) / "items.jsonl"))
            t0 = time.perf_counter()
            score_items(session.scorer, ResultsTable(Path(tmp) / "scores.jsonl"), scratch, [Target("base")],
                        dict.fromkeys(totals, 1 + i))  # fmt: skip
            small.append(time.perf_counter() - t0)
    per_call = float(np.median(small))
    per_item = max(0.0, (per_proxy - per_call) / sum(totals.values()))
    return per_item, per_call


def objective_of(rec: Recording, means: dict[str, np.ndarray], space: Any) -> np.ndarray:
    return np.array([space.objective({b: float(means[b][i]) for b in rec.benchmarks}) for i in range(len(rec.ids))])


# --- replay -------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One replayed study: after each trial, the items and calls spent so far and the trial's full value (None:
    pruned)."""

    used: list[int]
    calls: list[int]
    values: list[float | None]


def replay(rec: Recording, space: Any, option: str, sampler: str, seed: int) -> Run:
    import optuna

    from dmo.scoring.base import Target
    from dmo.scoring.items import ItemScores
    from dmo.search.samplers import make_sampler
    from dmo.search.stages import StagedScoring, StagePruned, make_pruner
    from dmo.search.study import trial_mixture

    pruner, params, stages = OPTIONS[option]
    sp = space.model_copy(
        update={
            "pruner": space.pruner.model_copy(update={"name": pruner, "params": params}),
            "scoring": space.scoring.model_copy(update={"stages": list(stages)}),
        }
    )
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(
        direction="maximize", sampler=make_sampler(sampler, seed), pruner=make_pruner(sp, rec.totals)
    )
    orders = {b: list(range(n)) for b, n in rec.totals.items()}  # positions: the recording is in item order
    staged = StagedScoring.for_space(sp, orders, sp.objective)
    seen: dict[int, dict[str, int]] = {}
    used = calls = 0
    run = Run([], [], [])
    cap = CAP * rec.per_proxy
    while used < cap and len(run.values) < MAX_TRIALS:
        trial = study.ask()
        mixture = trial_mixture(trial, list(rec.domains))
        lid = rec.snap(mixture.weights)

        def score(_: Target, sizes: dict[str, int], lid: int = lid) -> ItemScores:
            nonlocal used, calls
            have = seen.setdefault(lid, dict.fromkeys(rec.totals, 0))
            new = sum(max(0, n - have[b]) for b, n in sizes.items())
            if new:
                used += new
                calls += 1
            for b, n in sizes.items():
                have[b] = max(have[b], n)
            return ItemScores({b: rec.items[b][lid, :n].tolist() for b, n in sizes.items()}, rec.totals)

        try:
            result = staged.run(trial, Target("proxy", mixture=mixture), score)
            value = float(sp.objective(result.means))
            study.tell(trial, value)
            run.values.append(value)
        except StagePruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            run.values.append(None)
        run.used.append(used)
        run.calls.append(calls)
    return run


def items_to_reach(run: Run, target: float) -> int | None:
    for used, value in zip(run.used, run.values):
        if value is not None and value >= target:
            return used
    return None


def calls_to_reach(run: Run, target: float) -> int | None:
    for calls, value in zip(run.calls, run.values):
        if value is not None and value >= target:
            return calls
    return None


def regret_at(run: Run, optimum: float, budget: float, floor: float) -> float:
    """Optimum minus the best full value found within ``budget`` items (the lattice's worst if none was)."""
    best = [v for u, v in zip(run.used, run.values) if v is not None and u <= budget]
    return optimum - (max(best) if best else floor)


def _job(args: tuple[Recording, Any, str, str, int]) -> tuple[str, str, int, Run, float]:
    rec, space, option, sampler, seed = args
    t0 = time.perf_counter()
    run = replay(rec, space, option, sampler, seed)
    return option, sampler, seed, run, time.perf_counter() - t0


def summarise(rec: Recording, runs: dict[tuple[str, str], list[Run]]) -> dict[str, Any]:
    optimum = float(rec.objective.max())
    target = optimum - THRESHOLD * abs(optimum)
    floor = float(rec.objective.min())
    m = rec.per_proxy
    out: dict[str, Any] = {}
    for (option, sampler), rs in runs.items():
        hits = [items_to_reach(r, target) for r in rs]
        calls = [calls_to_reach(r, target) for r in rs]
        n = [math.inf if h is None else float(h) for h in hits]
        secs = [
            math.inf if h is None or c is None else h * rec.seconds_per_item + c * rec.seconds_per_call
            for h, c in zip(hits, calls)
        ]
        out[f"{option}|{sampler}"] = {
            "option": option,
            "sampler": sampler,
            "runs": len(rs),
            "reached": sum(h is not None for h in hits),
            "items_median": statistics.median(n),
            "items_worst": max(n),
            "full_proxies_median": statistics.median(n) / m,
            "seconds_median": statistics.median(secs),
            "seconds_worst": max(secs),
            "regret_quarter": statistics.median(regret_at(r, optimum, TARGET_SHARE * REFERENCE * m, floor) for r in rs),
            "regret_reference": statistics.median(regret_at(r, optimum, REFERENCE * m, floor) for r in rs),
            "trials_median": statistics.median(len(r.values) for r in rs),
            "pruned_share": float(np.mean([sum(v is None for v in r.values) / len(r.values) for r in rs])),
        }
    return out


# --- stage-1 estimates --------------------------------------------------------------------------------------------


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


def stratified_estimate(values: np.ndarray, strata: np.ndarray, n: int) -> np.ndarray:
    """Per model, the mean of its first ``n`` items weighted so each difficulty stratum counts by its share of all
    items (strata without a scored item fall back to the plain mean's weight)."""
    total = len(strata)
    seen = strata[:n]
    weights = np.zeros(n)
    for s in np.unique(strata):
        inside = seen == s
        if inside.any():
            weights[inside] = (np.sum(strata == s) / total) / inside.sum()
    weights /= weights.sum()
    return values[:, :n] @ weights


def estimates(rec: Recording, space: Any) -> dict[str, Any]:
    """Stage-1 rho of the plain partial mean and of the stratified estimator against the full objective."""
    rng = np.random.default_rng(0)
    order = rng.permutation(len(rec.ids))
    ref_idx, test_idx = order[:N_REFERENCE], order[N_REFERENCE:]
    first = OPTIONS["wilcoxon"][2][0]
    plain, strat = {}, {}
    for b in rec.benchmarks:
        n = max(1, math.ceil(first * rec.totals[b] - 1e-9))
        ref = np.vstack([rec.refs[b], rec.items[b][ref_idx]])
        difficulty = ref.mean(axis=0)
        edges = np.quantile(difficulty, np.linspace(0, 1, STRATA + 1)[1:-1])
        strata = np.digitize(difficulty, edges)
        plain[b] = rec.items[b][test_idx, :n].mean(axis=1)
        strat[b] = stratified_estimate(rec.items[b][test_idx], strata, n)
    full = rec.objective[test_idx]

    def obj(means: dict[str, np.ndarray]) -> np.ndarray:
        return np.array(
            [space.objective({b: float(means[b][i]) for b in rec.benchmarks}) for i in range(len(test_idx))]
        )

    p, s = obj(plain), obj(strat)
    boot = np.random.default_rng(1)
    rp, rs, diff = [], [], []
    for _ in range(N_BOOT):
        i = boot.integers(0, len(full), len(full))
        a, c = spearman(p[i], full[i]), spearman(s[i], full[i])
        rp.append(a)
        rs.append(c)
        diff.append(c - a)

    def ci(v: list[float]) -> list[float]:
        return [float(np.nanpercentile(v, 2.5)), float(np.nanpercentile(v, 97.5))]

    return {
        "stage": first,
        "mixtures": len(test_idx),
        "rho_partial_mean": spearman(p, full),
        "rho_partial_mean_ci": ci(rp),
        "rho_stratified": spearman(s, full),
        "rho_stratified_ci": ci(rs),
        "difference_ci": ci(diff),
    }


# --- the rule -----------------------------------------------------------------------------------------------------


def decide(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    cells = [(lat, smp) for lat in results for smp in SAMPLERS]
    ratios: dict[str, list[float]] = {}
    meets: dict[str, bool] = {}
    for option in OPTIONS:
        if option == "full":
            continue
        ok, rs = True, []
        for lat, smp in cells:
            table = results[lat]["options"]
            reference = table[f"full|{smp}"]["regret_reference"]
            mine = table[f"{option}|{smp}"]["regret_quarter"]
            ok &= mine <= reference
            rs.append(mine / reference if reference > 0 else (0.0 if mine <= 0 else math.inf))
        meets[option] = ok
        ratios[option] = rs
    winners = [o for o, ok in meets.items() if ok]
    lats = list(results)

    def key(o: str) -> tuple[float, ...]:
        medians = [results[lat]["options"][f"{o}|cmaes"]["items_median"] for lat in lats]
        return (*medians, results[lats[0]]["options"][f"{o}|cmaes"]["items_worst"])

    # Added after the first run, where full scoring's reference regret was 0 on every cell and so every ratio was
    # infinite: ties are broken by the worst median regret at the quarter budget, then the median items to 1%.
    def worst_regret(o: str) -> float:
        return max(results[lat]["options"][f"{o}|{smp}"]["regret_quarter"] for lat, smp in cells)

    def items(o: str) -> float:
        return max(results[lat]["options"][f"{o}|{smp}"]["items_median"] for lat, smp in cells)

    closest = min(ratios, key=lambda o: (max(ratios[o]), worst_regret(o), items(o)))
    estimator = all(results[lat]["estimates"]["difference_ci"][0] > 0 for lat in results)
    return {
        "meets": meets,
        "worst_ratio": {o: max(r) for o, r in ratios.items()},
        "default": min(winners, key=key) if winners else "full",
        "closest": closest,
        "keep_estimator": estimator,
    }


def render(results: dict[str, dict[str, Any]], decision: dict[str, Any]) -> str:
    lines = []

    def num(x: float, fmt: str = "{:.0f}") -> str:
        return "never" if isinstance(x, float) and math.isinf(x) else fmt.format(x)

    for lat, res in results.items():
        rec = res["recording"]
        lines += [
            f"### {lat}: {rec['mixtures']} lattice mixtures (1/{rec['resolution']}), {rec['items_per_proxy']} items a "
            f"proxy; optimum {rec['optimum']:.4f} at {rec['best']}; {rec['near']} mixtures within 1%; "
            f"{rec['seconds_per_item'] * 1000:.2f} ms an item + {rec['seconds_per_call']:.2f} s a call",
            "",
            "| option | sampler | reached | items to 1% median (full proxies) | worst | seconds median | "
            f"regret @{TARGET_SHARE * REFERENCE:g} proxies' items | regret @{REFERENCE} | trials | pruned |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in res["options"].values():
            lines.append(
                f"| {row['option']} | {row['sampler']} | {row['reached']}/{row['runs']} | "
                f"{num(row['items_median'])} ({num(row['full_proxies_median'], '{:.1f}')}) | "
                f"{num(row['items_worst'])} | "
                f"{num(row['seconds_median'])} | {row['regret_quarter']:.4f} | {row['regret_reference']:.4f} | "
                f"{row['trials_median']:g} | {row['pruned_share']:.0%} |"
            )
        e = res["estimates"]
        lines += [
            "",
            f"Stage-1 ({e['stage']:g} of the items) Spearman rho against the full objective over {e['mixtures']} "
            f"lattice mixtures: partial mean {e['rho_partial_mean']:+.3f} [{e['rho_partial_mean_ci'][0]:+.3f}, "
            f"{e['rho_partial_mean_ci'][1]:+.3f}]; stratified estimator {e['rho_stratified']:+.3f} "
            f"[{e['rho_stratified_ci'][0]:+.3f}, {e['rho_stratified_ci'][1]:+.3f}]; difference CI "
            f"[{e['difference_ci'][0]:+.3f}, {e['difference_ci'][1]:+.3f}]",
            "",
        ]
    meets = ", ".join(o for o, ok in decision["meets"].items() if ok) or "none"
    lines += [
        f"meets the target on every lattice and sampler: {meets}",
        f"worst ratio of regret @{TARGET_SHARE * REFERENCE:g} to full's @{REFERENCE}: "
        + ", ".join(f"{o} {r:.2f}" for o, r in decision["worst_ratio"].items()),
        f"default by the rule: {decision['default']}; closest to the target: {decision['closest']}; "
        f"estimator kept: {decision['keep_estimator']}",
    ]
    return "\n".join(lines)


def _finite(value: Any) -> Any:
    """JSON without Infinity: a study that never got there is null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def main(argv: Sequence[str] | None = None) -> int:
    from dmo.config import load_space, parse_space

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lattices", default=",".join(LATTICES), help="which lattices: 3d, 4d")
    ap.add_argument("--seeds", type=int, default=SEEDS)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--quick", action="store_true", help="the small world, 3 seeds, coarse lattices: checks the script")
    ap.add_argument("--small", action="store_true", help="the small world (40 items a benchmark), the same lattices")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "adaptive_scoring.json")
    ap.add_argument("--decide", type=Path, help="only re-apply the rule to the results of this JSON and print them")
    args = ap.parse_args(argv)
    if args.decide:
        payload = json.loads(args.decide.read_text())
        for res in payload["results"].values():
            for row in res["options"].values():
                for k, v in row.items():
                    row[k] = math.inf if v is None else v
        payload["decision"] = decide(payload["results"])
        print(render(payload["results"], payload["decision"]))
        args.decide.write_text(json.dumps(_finite(payload), indent=2, default=str))
        return 0
    seeds = 3 if args.quick else args.seeds
    results: dict[str, dict[str, Any]] = {}
    t_all = time.perf_counter()
    for lat in [x.strip() for x in args.lattices.split(",") if x.strip()]:
        file, resolution = LATTICES[lat]
        space = load_space(ROOT / "search_spaces" / file)
        small = args.quick or args.small
        if small:
            data = space.model_dump(mode="json")
            data["experts"] = "tinyworld-small"
            space = parse_space(data, source=file)
        if args.quick:
            resolution = 4 if lat == "3d" else 2
        name = f"adaptive-{'small-' if small else ''}{space.name or lat}"
        t0 = time.perf_counter()
        rec = record(space, resolution, name)
        record_seconds = time.perf_counter() - t0
        print(f"{lat}: recorded in {record_seconds:.0f} s", file=sys.stderr)
        tasks = [(rec, space, o, s, seed) for o in OPTIONS for s in SAMPLERS for seed in range(seeds)]
        runs: dict[tuple[str, str], list[Run]] = {(o, s): [] for o in OPTIONS for s in SAMPLERS}
        spawn = multiprocessing.get_context("spawn")
        t1 = time.perf_counter()
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=spawn) as pool:
            for o, s, _, run, _ in pool.map(_job, tasks):
                runs[(o, s)].append(run)
        optimum = float(rec.objective.max())
        results[lat] = {
            "recording": {
                "space": name, "mixtures": len(rec.ids), "resolution": rec.resolution,
                "items_per_proxy": rec.per_proxy, "items": rec.totals, "optimum": optimum,
                "best": rec.ids[int(rec.objective.argmax())],
                "near": int(np.sum(rec.objective >= optimum - THRESHOLD * abs(optimum))),
                "seconds_per_item": rec.seconds_per_item, "seconds_per_call": rec.seconds_per_call,
                "record_seconds": record_seconds, "replay_seconds": time.perf_counter() - t1,
            },
            "options": summarise(rec, runs),
            "estimates": estimates(rec, space),
        }  # fmt: skip
    decision = decide(results)
    text = render(results, decision)
    print(text)
    payload = {
        "rules": {
            "lattices": LATTICES, "samplers": SAMPLERS, "seeds": seeds, "options": OPTIONS, "threshold": THRESHOLD,
            "reference_full_proxies": REFERENCE, "target_share": TARGET_SHARE, "cap_full_proxies": CAP,
            "max_trials": MAX_TRIALS, "strata": STRATA, "n_reference": N_REFERENCE, "quick": args.quick,
            "world": "small" if args.quick or args.small else "default",
        },
        "results": results,
        "decision": decision,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "seconds": time.perf_counter() - t_all},
    }  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(_finite(payload), indent=2, default=str))
    return 0


if __name__ == "__main__":
    from dmo.errors import DmoError

    try:
        sys.exit(main())
    except DmoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
