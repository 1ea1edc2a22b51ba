"""Build (or reuse) a tiny world: data -> processor -> base -> experts -> ground-truth mixture trainings.

Every step writes its output atomically and is skipped when that output exists, so an interrupted build
resumes where it stopped and a fully built world is reused in well under a second (torch is not even
imported then). Layout under the root (``<cache>/tinyworld/<config key>`` by default)::

    data/<domain>/{train,test,val}.jsonl, images/  the data (see data.py)
    processor/                                  Qwen2VLProcessor (tokenizer, image/video processors, template)
    base/                                       HF model folder: config, model.safetensors, processor files
    experts/<domain>/                           PEFT LoRA adapter trained on one domain
    trained/<mixture id>/seed-<s>/              PEFT LoRA adapter trained on a mixture (ground truth)
    evals/...json                               test accuracy of each of those models
    experts.yaml                                manifest for the rest of dmo (paths relative to it)
    world.json                                  config, key, step timings, accuracy tables, mixture effect
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from dmo.atomic import write_text
from dmo.errors import DmoError
from dmo.mixture import Mixture
from dmo.paths import cache_dir
from dmo.presets import paper_2d, paper_3d, paper_4d
from dmo.tinyworld.config import WorldConfig
from dmo.tinyworld.worker import TRAINING_RECORD

#: Ground-truth spaces: the DMO paper's published mixture sets.
SPACES: dict[str, Callable[[], list[Mixture]]] = {"2d": paper_2d, "3d": paper_3d, "4d": paper_4d}


@dataclass(frozen=True)
class World:
    """A built tiny world on disk."""

    root: Path
    config: WorldConfig

    @property
    def manifest_path(self) -> Path:
        return self.root / "experts.yaml"

    @property
    def info_path(self) -> Path:
        return self.root / "world.json"

    @property
    def base_dir(self) -> Path:
        return self.root / "base"

    @property
    def processor_dir(self) -> Path:
        return self.root / "processor"

    def data_dir(self, domain: str) -> Path:
        return self.root / "data" / domain

    def test_jsonl(self, domain: str) -> Path:
        return self.data_dir(domain) / "test.jsonl"

    def train_jsonl(self, domain: str) -> Path:
        return self.data_dir(domain) / "train.jsonl"

    def expert_dir(self, domain: str) -> Path:
        return self.root / "experts" / domain

    def trained_dir(self, mixture: Mixture | str, seed: int) -> Path:
        mid = mixture.id if isinstance(mixture, Mixture) else mixture
        return self.root / "trained" / mid / f"seed-{seed}"

    def mixtures(self, space: str) -> list[Mixture]:
        return space_mixtures(space)

    def info(self) -> dict:
        """The parsed ``world.json``."""
        return json.loads(self.info_path.read_text())


def space_mixtures(space: str) -> list[Mixture]:
    try:
        return SPACES[space]()
    except KeyError:
        raise DmoError(f"unknown ground-truth space {space!r}: choose from {sorted(SPACES)}") from None


def default_root(config: WorldConfig) -> Path:
    return cache_dir() / "tinyworld" / config.key()


# --------------------------------------------------------------------------------------------------------------
# Progress reporting: rich bars when asked, nothing otherwise.


class _Progress:
    def __init__(self, enabled: bool) -> None:
        self._bar = None
        if enabled:
            from dmo.progress import progress_bar

            self._bar = progress_bar(description="{task.description:<28}")

    def __enter__(self) -> _Progress:
        if self._bar:
            self._bar.__enter__()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._bar:
            self._bar.__exit__(kind, exc, tb)

    def task(self, description: str, total: int) -> Callable[[int], None]:
        """Add a bar; returns ``set_completed(n)``."""
        bar = self._bar
        if not bar:
            return lambda n: None
        tid = bar.add_task(description, total=total)
        return lambda n: bar.update(tid, completed=n)

    def log(self, text: str) -> None:
        if self._bar:
            self._bar.console.log(text)


class _Pool:
    """A lazily started pool of spawned processes (started only if some step has work to do)."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self._ex: ProcessPoolExecutor | None = None
        self._saved_env: dict[str, str | None] = {}

    def submit(self, fn: Callable, *args: Any) -> Future:
        if self._ex is None:
            from dmo.tinyworld.worker import WORKER_ENV, init_process

            # Children are spawned on demand and read OpenMP settings when torch loads, which may happen before
            # the initializer runs (if the parent's __main__ imports torch), so they inherit them from here.
            for key, value in WORKER_ENV.items():
                self._saved_env[key] = os.environ.get(key)
                os.environ.setdefault(key, value)
            self._ex = ProcessPoolExecutor(
                self.processes, mp_context=multiprocessing.get_context("spawn"), initializer=init_process
            )
        return self._ex.submit(fn, *args)

    def close(self) -> None:
        if self._ex is not None:
            self._ex.shutdown(wait=True, cancel_futures=True)
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _run_all(futures: Sequence[Future], bar: Callable[[int], None]) -> list[Any]:
    done = 0
    bar(0)
    for fut in as_completed(futures):
        fut.result()  # re-raise a worker's failure here
        done += 1
        bar(done)
    return [f.result() for f in futures]


# --------------------------------------------------------------------------------------------------------------
# Steps.


def _step_data(world: World, pool: _Pool, ui: _Progress) -> bool:
    from dmo.tinyworld.data import write_domain

    todo = [d for d in world.config.domains if not world.data_dir(d).exists()]
    if not todo:
        return False
    c = world.config
    sizes = {"train": c.train_size, "test": c.test_size}
    futures = [pool.submit(write_domain, world.root, d, c.seed, sizes, c.image_size) for d in todo]
    _run_all(futures, ui.task("data", len(futures)))
    return True


def _step_validation(world: World) -> bool:
    """Each domain's validation split (as many rows as its test split), for ``loss:<domain>`` scores. A step of its
    own, after the data: worlds built before it existed get it without a rebuild (their key is unchanged)."""
    from dmo.tinyworld.data import write_val_split

    c = world.config
    todo = [d for d in c.domains if not (world.data_dir(d) / "val.jsonl").exists()]
    for d in todo:
        write_val_split(world.root, d, c.seed, c.test_size, c.image_size)
    return bool(todo)


def _step_processor(world: World, pool: _Pool) -> bool:
    if world.processor_dir.exists():
        return False
    from dmo.tinyworld.worker import processor_job

    pool.submit(processor_job, str(world.root), world.config.model_dump_json()).result()
    return True


def _step_base(world: World, pool: _Pool, ui: _Progress) -> bool:
    """Pre-train in a pool process (not here): it gets OpenMP settings this process may not have."""
    if world.base_dir.exists():
        return False
    from dmo.tinyworld.worker import pretrain_job

    c = world.config
    progress_file = world.root / ".base-progress"
    fut = pool.submit(pretrain_job, str(world.root), c.model_dump_json(), str(progress_file))
    bar = ui.task("base pre-training", -(-c.pretrain_samples // c.pretrain_batch))
    while True:
        try:
            fut.result(timeout=0.5)
            break
        except FuturesTimeout:
            with contextlib.suppress(OSError, ValueError, IndexError):
                bar(int(progress_file.read_text().split()[0]))
    progress_file.unlink(missing_ok=True)
    bar(-(-c.pretrain_samples // c.pretrain_batch))
    return True


def _eval_path(world: World, *parts: str) -> Path:
    return world.root.joinpath("evals", *parts[:-1], parts[-1] + ".json")


def _lora_jobs(
    world: World, runs: Iterable[tuple[dict[str, int], int, Path, Path, dict]], evaluate: bool
) -> list[tuple]:
    """The (counts, seed, adapter dir, eval file or None, meta) runs whose adapter is missing, or their evaluation
    when ``evaluate``."""
    todo = [r for r in runs if not _has_adapter(r[2]) or (evaluate and not r[3].exists())]
    return [r if evaluate else (*r[:3], None, r[4]) for r in todo]


def _submit_lora(world: World, pool: _Pool, runs: list[tuple]) -> list[Future]:
    from dmo.tinyworld.worker import lora_job

    cj = world.config.model_dump_json()
    return [
        pool.submit(lora_job, str(world.root), cj, counts, seed, str(out), None if ev is None else str(ev), meta)
        for counts, seed, out, ev, meta in runs
    ]


def _expert_runs(world: World, domains: Sequence[str]) -> list[tuple]:
    c = world.config
    return [
        ({d: c.budget}, 0, world.expert_dir(d), _eval_path(world, "experts", d), {"kind": "expert", "domain": d})
        for d in c.domains
        if d in domains
    ]


def _trained_runs(world: World, space: str, seeds: int | None = None) -> list[tuple]:
    """Every training of ``space``'s ground truth, seeds ``0..seeds-1`` (default: all of the world's)."""
    c = world.config
    runs = []
    for m in space_mixtures(space):
        for s in range(c.n_seeds if seeds is None else seeds):
            meta = {"kind": "mixture", "space": space, "mixture": m.as_dict(), "id": m.id}
            runs.append(
                (m.counts(c.budget), s, world.trained_dir(m, s), _eval_path(world, "trained", m.id, f"seed-{s}"), meta)
            )
    return runs


def _step_trainings(
    world: World,
    spaces: Sequence[str],
    pool: _Pool,
    ui: _Progress,
    seeds: int | None,
    experts: Sequence[str],
    evaluate: bool,
) -> dict[str, float]:
    """The base's evaluation, the experts and every requested space's ground truth, submitted to the pool at once:
    a space's last runs then overlap the next one's first, instead of leaving a process idle at every boundary.

    Returns, per group that had work (``experts``, ``ground_truth_<space>``), the seconds from this step's start to
    its last run's end.
    """
    from dmo.tinyworld.worker import eval_job

    start = time.perf_counter()
    groups: dict[str, list[Future]] = {}
    base_eval = _eval_path(world, "base")
    jobs = []
    if evaluate and not base_eval.exists():
        jobs.append(pool.submit(eval_job, str(world.root), world.config.model_dump_json(), None, str(base_eval)))
    jobs += _submit_lora(world, pool, _lora_jobs(world, _expert_runs(world, experts), evaluate))
    if jobs:
        groups["experts"] = jobs
    for space in spaces:
        runs = _lora_jobs(world, _trained_runs(world, space, seeds), evaluate)
        if runs:
            groups[f"ground_truth_{space}"] = _submit_lora(world, pool, runs)
    names = {"experts": "experts (+ base eval)", **{f"ground_truth_{s}": f"ground truth {s}" for s in spaces}}
    bars = {g: ui.task(names[g], len(fs)) for g, fs in groups.items()}
    group_of = {f: g for g, fs in groups.items() for f in fs}
    left = {g: len(fs) for g, fs in groups.items()}
    ended: dict[str, float] = {}
    for g in groups:
        bars[g](0)
    for fut in as_completed(group_of):
        fut.result()  # re-raise a worker's failure here
        g = group_of[fut]
        left[g] -= 1
        bars[g](len(groups[g]) - left[g])
        if not left[g]:
            ended[g] = round(time.perf_counter() - start, 3)
    return ended


# --------------------------------------------------------------------------------------------------------------
# Manifest and report.


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _built_spaces(world: World) -> list[str]:
    """Spaces whose every mixture has at least its first seed's adapter on disk (built now or by an earlier call;
    ``dmo demo`` builds one seed)."""
    return [
        s
        for s in SPACES
        if _space_fits(world.config, s) and all(_has_adapter(r[2]) for r in _trained_runs(world, s, seeds=1))
    ]


def _has_adapter(path: Path) -> bool:
    return (path / "adapter_model.safetensors").exists()


def _space_fits(config: WorldConfig, space: str) -> bool:
    return all(d in config.domains for d in space_mixtures(space)[0].domains)


def manifest_text(world: World) -> str:
    """``experts.yaml``: base, the experts built so far and every trained mixture adapter of the spaces built so far,
    paths relative to the manifest."""
    c = world.config
    trained, seen = [], set()
    for space in _built_spaces(world):
        for _counts, seed, out, _, meta in _trained_runs(world, space):
            if (meta["id"], seed) in seen or not _has_adapter(out):
                continue
            seen.add((meta["id"], seed))
            trained.append({"mixture": meta["mixture"], "seed": seed, "path": out.relative_to(world.root).as_posix()})
    doc = {
        "name": "tinyworld",
        "base": {"path": "base"},
        "kind": "lora",
        "budget": c.budget,
        "experts": {d: {"path": f"experts/{d}"} for d in c.domains if _has_adapter(world.expert_dir(d))},
        "data": "data",  # each domain's validation split, for loss:<domain> benchmarks
        "trained": trained,
    }
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=200)


def _spread(values: Sequence[float]) -> float:
    return round(max(values) - min(values), 6) if values else 0.0


def report(world: World, timings: dict[str, float | None]) -> dict:
    """The ``world.json`` document: config, key, timings and accuracy tables with the mixture effect."""
    c = world.config
    base_rec = _read_json(world.base_dir / TRAINING_RECORD) or {}
    acc: dict[str, Any] = {"base": (_read_json(_eval_path(world, "base")) or {}).get("accuracy")}
    acc["experts"] = {d: (_read_json(_eval_path(world, "experts", d)) or {}).get("accuracy") for d in c.domains}
    trained: dict[str, list] = {}
    effect: dict[str, dict] = {}
    for space in _built_spaces(world):
        rows: list[dict[str, Any]] = []
        for m in space_mixtures(space):
            found = {
                s: (_read_json(_eval_path(world, "trained", m.id, f"seed-{s}")) or {}).get("accuracy")
                for s in range(c.n_seeds)
            }
            seeds: dict[int, dict[str, float]] = {s: v for s, v in found.items() if v is not None}
            if not seeds:
                continue
            mean = {d: round(sum(seeds[s][d] for s in seeds) / len(seeds), 6) for d in c.domains}
            rows.append(
                {
                    "id": m.id,
                    "mixture": m.as_dict(),
                    "counts": m.counts(c.budget),
                    "seeds": {str(s): v for s, v in seeds.items()},
                    "mean": mean,
                }
            )
        trained[space] = rows
        effect[space] = {}
        for d in space_mixtures(space)[0].domains:
            seed_gaps = [  # over the mixtures trained with more than one seed (dmo demo trains one)
                max(v[d] for v in r["seeds"].values()) - min(v[d] for v in r["seeds"].values())
                for r in rows
                if len(r["seeds"]) > 1
            ]
            effect[space][d] = {
                "across_mixtures": _spread([r["mean"][d] for r in rows]),
                "across_seeds_mean": round(sum(seed_gaps) / len(seed_gaps), 6) if seed_gaps else None,
                "across_seeds_max": round(max(seed_gaps), 6) if seed_gaps else None,
            }
    acc["trained"] = trained
    return {
        "name": "tinyworld",
        "key": c.key(),
        "config": json.loads(c.model_dump_json()),
        "parameters": base_rec.get("parameters"),
        "base_training": base_rec,
        "timings_seconds": timings,
        "accuracy": acc,
        "mixture_effect": effect,
        "notes": (
            "mixture_effect: per domain of each space, across_mixtures = max - min over mixtures of the "
            "seed-averaged accuracy; across_seeds = max - min over seeds of one mixture (mean, max)."
        ),
    }


def _write_if_changed(path: Path, text: str) -> None:
    # Rewriting identical content would still bump the mtime, which callers use to see that nothing changed.
    if not path.exists() or path.read_text() != text:
        write_text(path, text)


# --------------------------------------------------------------------------------------------------------------


def build_world(
    config: WorldConfig | None = None,
    root: Path | None = None,
    ground_truth: Sequence[str] = ("2d",),
    progress: bool = True,
    seeds: int | None = None,
    experts: Sequence[str] | None = None,
    evaluate: bool = True,
) -> World:
    """Build whatever of the world is missing and return it; a complete world is returned at once.

    ``seeds``: training seeds of each ``ground_truth`` mixture (default: the world's ``n_seeds``; fewer leave the
    seed ceiling out, and a later call with more adds the missing ones). ``experts``: the domains whose experts to
    train (default: all; a search space needs those of its domains only). ``evaluate``: also evaluate every model
    on every domain's test split, for ``world.json`` (``dmo demo`` leaves this to a later build: it scores the
    models it needs through lmms-eval anyway).

    Call it from under ``if __name__ == "__main__":`` in scripts: the pool uses the spawn start method.
    """
    config = config or WorldConfig()
    root = Path(root) if root is not None else default_root(config)
    world = World(root, config)
    for space in ground_truth:
        space_mixtures(space)
        if not _space_fits(config, space):
            raise DmoError(
                f"ground-truth space {space!r} needs domains {list(space_mixtures(space)[0].domains)}, "
                f"this world has {list(config.domains)}"
            )
    if seeds is not None and not 1 <= seeds <= config.n_seeds:
        raise DmoError(f"seeds must be between 1 and the world's {config.n_seeds}, not {seeds}")
    unknown = [d for d in experts or () if d not in config.domains]
    if unknown:
        raise DmoError(f"no domain {unknown[0]!r} in this world: its domains are {list(config.domains)}")
    needed = sorted({*(experts if experts is not None else config.domains), *(
        d for space in ground_truth for d in space_mixtures(space)[0].domains)})  # fmt: skip
    previous = (_read_json(world.info_path) or {}).get("timings_seconds", {})
    timings: dict[str, float | None] = {}

    def timed(name: str, step: Callable[[], bool]) -> None:
        start = time.perf_counter()
        built = step()
        timings[name] = round(time.perf_counter() - start, 3) if built else previous.get(name)

    pool = _Pool(config.threads)
    try:
        with _Progress(progress) as ui:
            timed("data", lambda: _step_data(world, pool, ui))
            timed("validation", lambda: _step_validation(world))
            timed("processor", lambda: _step_processor(world, pool))
            timed("base", lambda: _step_base(world, pool, ui))
            ended = _step_trainings(world, ground_truth, pool, ui, seeds, needed, evaluate)
            for group in ("experts", *(f"ground_truth_{s}" for s in ground_truth)):
                timings[group] = ended.get(group, previous.get(group))
    finally:
        pool.close()
    for key, value in previous.items():  # keep timings of spaces built by earlier calls
        timings.setdefault(key, value)
    _write_if_changed(world.manifest_path, manifest_text(world))
    _write_if_changed(world.info_path, json.dumps(report(world, timings), indent=2) + "\n")
    return world
