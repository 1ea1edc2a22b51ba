"""The vllm backend on the real CPU engine, against the hf backend, on the tiny world (issue 13's measurements).

Run from ``.venv-vllm`` (``bash scripts/install_vllm.sh``), in one process so that every ratio compares like with
like on the same machine::

    .venv-vllm/bin/python benchmarks/engine_reuse_vllm.py --json benchmarks/results/engine_reuse_vllm_cpu.json

What it prints, per backend:

* **engine start**: building the vLLM engine (processes, model load, warm-up); hf: loading the model;
* **per proxy, by route**: wall time of one proxy's scoring (3 benchmarks), split into *generation* (time inside
  the engine's ``generate`` / transformers' ``generate``) and everything else (switching the proxy in, lmms-eval's
  set-up and scoring);
* **throughput**: adapter-served linear proxies per second when K = 1, 2, 4 are scored in one call;
* **study**: a study's wall time per trial against the pure generation time of its proxies (the target is <= 1.2x).

The world is the default tiny world's base and experts (``dmo world build``; built here if missing).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dmo.config import parse_space
from dmo.manifest import load_manifest
from dmo.mixture import Mixture
from dmo.scoring.base import ScoringContext, Target, make_scorer, score_targets
from dmo.scoring.tasks import write_tiny_tasks
from dmo.scoring.vllm.backend import VLLMScorer

DOMAINS = ("counting", "general", "ocr")
BENCHMARKS = [f"dmo_tiny_{d}" for d in DOMAINS]
ROUTES: dict[str, tuple[str, dict[str, Any]]] = {
    "linear": ("linear", {}),
    "robustmerge": ("robustmerge", {}),
    "ties": ("ties", {"density": 0.5}),
    "dare": ("dare", {"drop_rate": 0.3}),
}


class Clock:
    """Seconds spent inside wrapped calls (the generation)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        return timed

    @contextmanager
    def span(self) -> Iterator[dict[str, float]]:
        out: dict[str, float] = {}
        g0, t0 = self.seconds, time.perf_counter()
        yield out
        out["wall"] = time.perf_counter() - t0
        out["generation"] = self.seconds - g0
        out["other"] = out["wall"] - out["generation"]


def mixtures(n: int, seed: int) -> list[Mixture]:
    """``n`` distinct mixtures drawn from the resolution-16 lattice (153 points), none a vertex."""
    import random

    from dmo.mixture import lattice

    inner = [m for m in lattice(list(DOMAINS), 16) if max(m.as_dict().values()) < 1]
    return random.Random(seed).sample(inner, n)


def proxy(m: Mixture, method: str = "linear", **params: Any) -> Target:
    return Target("proxy", mixture=m, method=method, params=tuple(sorted(params.items())))


def instrument(name: str, scorer: Any, clock: Clock) -> None:
    """Route the backend's generation calls through ``clock``."""
    if name == "vllm":
        llm = scorer.lmm.llm
        llm.generate = clock.wrap(llm.generate)
    else:
        model = scorer.lmm.model  # the hf backend's live transformers model
        model.generate = clock.wrap(model.generate)


#: the columns: backend, and its options
BACKENDS: dict[str, tuple[str, dict[str, Any]]] = {
    "vllm-writes": ("vllm", {"lora": False}),  # the CPU default: every proxy written into the weights
    "vllm-adapters": ("vllm", {"lora": True}),  # linear/RobustMerge proxies served as LoRA adapters
    "hf": ("hf", {}),
}


def make(column: str, manifest: Any, tasks: Path, limit: int, work: Path) -> Any:
    name, options = BACKENDS[column]
    if name == "vllm":  # adapters written under this run's folder, not the cache
        return VLLMScorer(manifest, tasks, limit, adapter_dir=work / "adapters", **options)
    return make_scorer(name, ScoringContext(manifest, include_path=tasks, limit=limit, device="cpu"), options)


def measure(column: str, manifest: Any, tasks: Path, limit: int, work: Path, seed: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    name = BACKENDS[column][0]
    t0 = time.perf_counter()
    scorer = make(column, manifest, tasks, limit, work)
    clock = Clock()
    # first proxy: engine/model start plus its first scoring, then the start alone
    warm = proxy(mixtures(1, seed + 99)[0])
    with clock.span():
        scorer.lmm  # noqa: B018 - builds the engine (vllm) or loads the model (hf)
    out["start_s"] = round(time.perf_counter() - t0, 2)
    instrument(name, scorer, clock)
    scorer.evaluate(warm, BENCHMARKS)  # lmms-eval's first task load, caches

    routes: dict[str, Any] = {}
    for label, (method, params) in ROUTES.items():
        spans = []
        for m in mixtures(3, seed + len(routes)):
            with clock.span() as s:
                scorer.evaluate(proxy(m, method, **params), BENCHMARKS)
            spans.append(s)
        routes[label] = {k: round(statistics.median(s[k] for s in spans), 3) for k in ("wall", "generation", "other")}
    with clock.span() as s:
        scorer.evaluate(Target("base"), BENCHMARKS)
    routes["base"] = {k: round(v, 3) for k, v in s.items()}
    out["per_proxy_s"] = routes

    through: dict[str, float] = {}
    for k in (1, 2, 4):
        ms = mixtures(8, seed + 10 * k)
        t = time.perf_counter()
        for i in range(0, len(ms), k):
            score_targets(scorer, _NullTable(), [proxy(m) for m in ms[i : i + k]], BENCHMARKS)
        through[f"K={k}"] = round(len(ms) / (time.perf_counter() - t), 3)
    out["linear_proxies_per_s"] = through
    if name == "vllm":
        scorer.close()
    return out


class _NullTable:
    """A results table that remembers nothing, so every call scores (the throughput runs)."""

    def cached_keys(self) -> dict:
        return {}

    def append(self, rows: list) -> None:
        return None


def study_ratio(column: str, world: Path, tasks: Path, limit: int, root: Path, n: int, batch: int) -> dict[str, Any]:
    """A real study (random sampler, n trials) and the generation time inside it."""
    from dmo.search.study import study_paths
    from dmo.search.trials import run_study

    name = BACKENDS[column][0]
    manifest = load_manifest(world / "experts.yaml")
    space = parse_space({
        "name": f"ratio-{column}-{batch}", "domains": list(DOMAINS), "experts": str(world / "experts.yaml"),
        "mixtures": {"lattice": {"resolution": 8}}, "benchmarks": BENCHMARKS,
        "sampler": {"name": "random", "n_trials": n, "seed": batch},
        "scoring": {"backend": name, "limit": limit},
    })  # fmt: skip
    scorer = make(column, manifest, tasks, limit, root)
    clock = Clock()
    instrument(name, scorer, clock)
    scorer.evaluate(proxy(mixtures(1, 1234)[0]), BENCHMARKS)  # start and warm up outside the timed study
    clock.seconds = 0.0
    t0 = time.perf_counter()
    run_study(space, scorer, study_paths(space, root=root), progress=False, batch=batch)
    wall = time.perf_counter() - t0
    if name == "vllm":
        scorer.close()
    return {
        "trials": n, "batch": batch, "wall_per_trial_s": round(wall / n, 3),
        "generation_per_trial_s": round(clock.seconds / n, 3), "ratio": round(wall / max(clock.seconds, 1e-9), 2),
    }  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=200, help="items per benchmark (the tiny world's test split: 200)")
    ap.add_argument("--trials", type=int, default=12, help="trials of each timed study")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--work", type=Path, default=Path("/tmp/dmo-engine-reuse-vllm"))
    args = ap.parse_args()

    from dmo.tinyworld.build import build_world
    from dmo.tinyworld.config import WorldConfig

    config = WorldConfig()
    world = build_world(config, ground_truth=())
    tasks = args.work / "tasks"
    write_tiny_tasks(world.root / "data", tasks, list(config.domains), max_new_tokens=config.max_new_tokens)
    manifest = load_manifest(world.manifest_path)
    result: dict[str, Any] = {"world": world.root.name, "limit": args.limit, "benchmarks": BENCHMARKS}
    for column in BACKENDS:
        result[column] = measure(column, manifest, tasks, args.limit, args.work, args.seed)
        batches = (1, 4) if column == "vllm-adapters" else (1,)
        result[column]["studies"] = [
            study_ratio(column, world.root, tasks, args.limit, args.work / f"study-{column}-{k}", args.trials, k)
            for k in batches
        ]

    cols = list(BACKENDS)
    print(f"\ntiny world {world.root.name}, {len(BENCHMARKS)} benchmarks x {args.limit} items, greedy; seconds")
    print(f"{'':24}" + "".join(f"{c:>26}" for c in cols))
    print(f"{'engine/model start':24}" + "".join(f"{result[c]['start_s']:>26}" for c in cols))
    for label in [*ROUTES, "base"]:
        cells = [result[c]["per_proxy_s"][label] for c in cols]
        print(f"{label + ' per proxy':24}" + "".join(f"{r['wall']:>14.2f} (gen {r['generation']:.2f})" for r in cells))
    for k in ("K=1", "K=2", "K=4"):
        print(f"{'linear proxies/s ' + k:24}" + "".join(f"{result[c]['linear_proxies_per_s'][k]:>26}" for c in cols))
    for c in cols:
        for st in result[c]["studies"]:
            print(f"study {c} --batch {st['batch']}: {st['wall_per_trial_s']} s/trial, generation "
                  f"{st['generation_per_trial_s']} s/trial, ratio {st['ratio']}x")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
