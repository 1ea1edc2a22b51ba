"""Item-level scores: every benchmark's items in one fixed order, scored on any prefix of it, never twice.

A stagewise study (``scoring: {stages: [...]}``) scores a proxy on the first 1/8, 1/4, ... of each benchmark's items
and may stop it early. For that to be cheap and honest:

* **One order per benchmark, for every model of a space.** :class:`ItemOrders` draws a seeded random permutation of
  a benchmark's items (its task's documents, ``limit`` applied) once and writes it to
  ``results/<space>/item_order.json``; every later run, worker and model (base, experts, proxies, trained
  mixtures) reads the same order. Sub-scores of one task (``pope_dmo/f1``) share the task's order.
* **Per-item scores are kept.** ``results/<space>/items.jsonl`` holds each scored item's score, keyed by the cache
  key of the model's score on the benchmark (:func:`dmo.results.cache_key`). :func:`score_items` scores only the
  items of the wanted prefix that are not there yet, so a proxy scored on the first 25% and later promoted continues
  from item 25%+1, across workers (a study holds the proxy's claim while it scores) and resumes.
* **A partial aggregate is never a full score.** The mean of a prefix is written to the results table with
  ``status: partial`` and ``items``/``items_total``; only the full prefix writes an ``ok`` row (the mean over every
  item, which is the benchmark's score for metrics that lmms-eval aggregates by a mean).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dmo.atomic import atomic_file, explain_os_error
from dmo.errors import DmoError
from dmo.paths import SpaceFolder
from dmo.results import ResultsTable, ScoreRow, cache_key
from dmo.scoring.base import Scorer, Target

__all__ = [
    "ORDER_SEED",
    "ItemOrders",
    "ItemScores",
    "ItemStore",
    "ItemTable",
    "item_order",
    "prefix_sizes",
    "score_items",
]

#: The seed of every benchmark's item order (with the task's name); fixed, so that two spaces agree on it too.
ORDER_SEED = 0
_FORMAT = 1


def _task(benchmark: str) -> str:
    return benchmark.split("/", 1)[0]  # a sub-score reads its task's items (dmo.scoring.metrics.SUBSCORE_SEP)


def item_order(task: str, n: int, seed: int = ORDER_SEED) -> list[int]:
    """The fixed random order of a task's ``n`` items (document ids 0..n-1)."""
    if n < 1:
        raise DmoError(f"benchmark {task!r} has no items to order")
    digest = hashlib.sha256(f"{seed}:{task}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "big"))
    return [int(i) for i in rng.permutation(n)]


def prefix_sizes(fraction: float, totals: Mapping[str, int]) -> dict[str, int]:
    """Items per benchmark in the first ``fraction`` of its order (at least one; all of them at 1)."""
    return {b: max(1, min(n, math.ceil(fraction * n - 1e-9))) for b, n in totals.items()}


class ItemOrders:
    """``results/<space>/item_order.json``: each task's item order, written once and read by everyone after."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        lock = self.path.with_name(self.path.name + ".lock")
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            fd = open(lock, "a")
        except OSError as exc:
            raise explain_os_error(exc, lock) from exc
        try:
            fcntl.flock(fd.fileno(), fcntl.LOCK_EX)
            yield
        finally:
            fd.close()

    def read(self) -> dict[str, dict[str, Any]]:
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DmoError(f"cannot read the item order {self.path}: {exc}; restore it from a backup") from None
        return dict(data.get("tasks", {}))

    def orders(self, benchmarks: Sequence[str], count: Callable[[str], int]) -> dict[str, list[int]]:
        """Each benchmark's order: read where written, else drawn (``count(benchmark)`` items) and written."""
        with self._locked():
            tasks = self.read()
            missing = {_task(b): b for b in benchmarks if _task(b) not in tasks}
            for task, b in missing.items():
                tasks[task] = {"items": count(b), "seed": ORDER_SEED}
                tasks[task]["order"] = item_order(task, tasks[task]["items"], ORDER_SEED)
            if missing:
                with atomic_file(self.path) as fh:
                    json.dump({"format": _FORMAT, "tasks": tasks}, fh)
        out = {}
        for b in benchmarks:
            entry = tasks[_task(b)]
            out[b] = [int(i) for i in entry["order"]]
            if len(out[b]) != int(entry["items"]):
                raise DmoError(f"item order of {_task(b)!r} in {self.path} is damaged: restore it from a backup")
        return out


class ItemTable:
    """``results/<space>/items.jsonl``: the score of every scored item, appended like the results table."""

    def __init__(self, path: Path) -> None:
        self.table = ResultsTable(path)

    @property
    def path(self) -> Path:
        return self.table.path

    def append(self, rows: Sequence[dict[str, Any]]) -> None:
        self.table.append_records(rows)

    def scores(self) -> dict[str, dict[int, float]]:
        """Item scores by cache key (of a model's score on a benchmark) and document id."""
        out: dict[str, dict[int, float]] = {}
        for rec in self.table.records():
            found = out.setdefault(str(rec.get("key", "")), {})
            found.update({int(d): float(v) for d, v in (rec.get("items") or {}).items()})
        return out

    def rows(self) -> list[dict[str, Any]]:
        return self.table.records()


@dataclass
class ItemStore:
    """A space's item orders and item scores (what :func:`score_items` reads and writes)."""

    orders: dict[str, list[int]]
    table: ItemTable

    @classmethod
    def open(cls, folder: Path | SpaceFolder, scorer: Scorer, benchmarks: Sequence[str]) -> ItemStore:
        space = folder if isinstance(folder, SpaceFolder) else SpaceFolder(Path(folder))
        orders = ItemOrders(space.item_order).orders(list(benchmarks), scorer.item_count)
        return cls(orders, ItemTable(space.items))

    @property
    def totals(self) -> dict[str, int]:
        return {b: len(o) for b, o in self.orders.items()}


@dataclass
class ItemScores:
    """One target's scores on a prefix of each benchmark's item order."""

    #: per benchmark, the item scores in order (position 0 first): the prefix asked for
    values: dict[str, list[float]]
    totals: dict[str, int]
    errors: dict[str, str] = field(default_factory=dict)
    #: benchmarks whose full score was in the results table without item scores (a run without stages)
    known: dict[str, float] = field(default_factory=dict)

    @property
    def means(self) -> dict[str, float]:
        out = {b: float(np.mean(v)) for b, v in self.values.items() if v and b not in self.errors}
        return {**out, **self.known}

    @property
    def complete(self) -> bool:
        """Every benchmark scored on all of its items (or known in full)."""
        return not self.errors and all(b in self.known or len(v) == self.totals[b] for b, v in self.values.items())

    def covered(self) -> dict[str, int]:
        return {b: self.totals[b] if b in self.known else len(v) for b, v in self.values.items()}


def score_items(
    scorer: Scorer,
    table: ResultsTable,
    store: ItemStore,
    targets: Sequence[Target],
    sizes: Mapping[str, int],
    group: str = "",
    on_evaluate: Callable[[Target], None] | None = None,
) -> list[ItemScores]:
    """Scores of each target on the first ``sizes[b]`` items of each benchmark's order.

    Items already in the store are read, never scored again; the rest are scored in one backend call per set of
    missing items (targets at the same stage share it: a backend with ``evaluate_items_many`` scores them together).
    New item scores are appended to the item table, and the prefix's mean to the results table: as ``partial`` while
    the prefix is not the whole benchmark, as the benchmark's full (``ok``) score once it is. A benchmark whose full
    score the results table already holds without item scores (scored without stages) is answered from it.
    """
    benchmarks = list(sizes)
    settings = scorer.settings()
    extra = {b: scorer.benchmark_settings(b) for b in benchmarks}
    full = table.cached_keys()
    stored = store.table.scores()
    plans = []
    for target in targets:
        fp = scorer.fingerprint(target)
        keys = {b: cache_key(model=fp, benchmark=b, **settings, **extra[b]) for b in benchmarks}
        have = {b: stored.get(keys[b], {}) for b in benchmarks}
        prefix = {b: store.orders[b][: sizes[b]] for b in benchmarks}
        missing = {b: [d for d in prefix[b] if d not in have[b]] for b in benchmarks}
        known = {b: float(full[keys[b]]["score"]) for b in benchmarks if missing[b] and keys[b] in full}
        missing = {b: ids for b, ids in missing.items() if ids and b not in known}
        plans.append((target, fp, keys, have, prefix, missing, known))
    errors: list[dict[str, str]] = [{} for _ in targets]
    pending: dict[tuple[tuple[str, tuple[int, ...]], ...], list[int]] = {}
    for i, plan in enumerate(plans):
        if plan[5]:
            pending.setdefault(tuple((b, tuple(ids)) for b, ids in sorted(plan[5].items())), []).append(i)

    for signature, indices in pending.items():
        todo = {b: list(ids) for b, ids in signature}
        for i in indices:
            if on_evaluate is not None:
                on_evaluate(plans[i][0])
        t0 = time.perf_counter()
        if scorer.max_batch > 1 and len(indices) > 1:
            results = scorer.evaluate_items_many([plans[i][0] for i in indices], todo)
        else:
            results = [scorer.evaluate_items(plans[i][0], todo) for i in indices]
        seconds = round((time.perf_counter() - t0) / len(indices), 4)
        for i, result in zip(indices, results):
            _record(scorer, table, store, plans[i], todo, result, seconds, group, errors[i])
    rebuilt = []  # full scores whose items were all stored but whose row was not (a writer died in between)
    for i, (target, fp, keys, have, prefix, missing, known) in enumerate(plans):
        for b in prefix:
            whole = len(prefix[b]) == store.totals[b] and b not in known and b not in missing and b not in errors[i]
            if whole and keys[b] not in full and all(d in have[b] for d in prefix[b]):
                score = float(np.mean([have[b][d] for d in prefix[b]]))
                rebuilt.append(
                    ScoreRow(target.kind, target.label, b, score, weights=target.weights, group=group,
                             method=target.method, seed=target.seed, source=scorer.name, fingerprint=fp, key=keys[b],
                             items=store.totals[b], items_total=store.totals[b])
                )  # fmt: skip
                full[keys[b]] = {"score": score}
    table.append(rebuilt)
    out = []
    for i, (_, _, _, have, prefix, _, known) in enumerate(plans):
        values = {b: [have[b][d] for d in prefix[b]] if b not in known and b not in errors[i] else [] for b in prefix}
        out.append(ItemScores(values, store.totals, errors[i], known))
    return out


def _record(
    scorer: Scorer,
    table: ResultsTable,
    store: ItemStore,
    plan: tuple[Any, ...],
    todo: Mapping[str, Sequence[int]],
    result: Any,
    seconds: float,
    group: str,
    errors: dict[str, str],
) -> None:
    target, fp, keys, have, prefix, _, _ = plan
    common: dict[str, Any] = dict(
        kind=target.kind, mixture=target.label, weights=target.weights, group=group, method=target.method,
        seed=target.seed, source=scorer.name, fingerprint=fp,
    )  # fmt: skip
    n_items = sum(len(ids) for ids in todo.values()) or 1
    item_rows, rows = [], []
    for b, ids in todo.items():
        got = result.scores.get(b, {})
        lost = [d for d in ids if d not in got]
        if b in result.errors or lost:
            errors[b] = result.errors.get(b) or f"no score returned for item {lost[0]}"
            rows.append(ScoreRow(benchmark=b, score=None, status="failed", error=errors[b], key=keys[b], **common))
            continue
        new = {int(d): float(got[d]) for d in ids}
        item_rows.append(
            {**common, "benchmark": b, "key": keys[b], "items": {str(d): v for d, v in new.items()},
             "seconds": round(seconds * len(ids) / n_items, 4), "metric": result.metrics.get(b, "")}
        )  # fmt: skip
        have[b] = {**have[b], **new}
        total = store.totals[b]
        covered = [have[b][d] for d in prefix[b]]
        if len(prefix[b]) == total:
            score, status = float(np.mean([have[b][d] for d in store.orders[b]])), "ok"
        else:
            score, status = float(np.mean(covered)), "partial"
        rows.append(
            ScoreRow(benchmark=b, score=score, status=status, metric=result.metrics.get(b, ""), key=keys[b],  # type: ignore[arg-type]
                     seconds=seconds, items=len(prefix[b]), items_total=total, **common)
        )  # fmt: skip
    # items first: a crash between the two leaves item scores without their aggregate, which the next call rebuilds
    store.table.append(item_rows)
    table.append(rows)
