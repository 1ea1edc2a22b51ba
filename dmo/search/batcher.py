"""Trials that run together, scored together: one backend call for the targets of K concurrent trials.

``dmo study --batch K`` runs K trials of one worker at once (Optuna's ``n_jobs``: each trial still asks, runs its
objective and is told on its own, with its own heartbeat and budget slot). Their objectives meet here: each hands
its target to :meth:`Batcher.score` and waits; once every trial in flight is waiting (or a short gathering time has
passed, e.g. while a trial waits for another process's claim on the same target), one of them scores all of them
in one :func:`~dmo.scoring.base.score_targets` call, which a backend with ``evaluate_many`` (vllm) generates for in one
engine pass. The results table is consulted and written exactly as for one trial at a time.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from dmo.results import ResultsTable
from dmo.scoring.base import Scorer, Target, score_targets
from dmo.scoring.items import ItemScores, ItemStore, score_items

#: How long a trial's target waits for the others of its batch before it is scored with whatever has arrived.
GATHER_SECONDS = 2.0


@dataclass
class _Request:
    target: Target
    #: a stage of a staged trial: items per benchmark (None: the whole benchmarks, the plain path)
    sizes: dict[str, int] | None = None
    result: Any = None
    error: BaseException | None = None
    done: bool = field(default=False)


class Batcher:
    """Collects the targets of the trials in flight in this process and scores them in one call."""

    def __init__(
        self,
        scorer: Scorer,
        table: ResultsTable,
        benchmarks: Sequence[str],
        group: str = "",
        on_evaluate: Callable[[Target], None] | None = None,
        gather_seconds: float = GATHER_SECONDS,
        store: ItemStore | None = None,
    ) -> None:
        self.store = store
        self.scorer, self.table, self.benchmarks = scorer, table, list(benchmarks)
        self.group, self.on_evaluate, self.gather_seconds = group, on_evaluate, gather_seconds
        self._cond = threading.Condition()
        self._expected = 0  # trials of the current round that have not finished their objective
        self._pending: list[_Request] = []
        self._scoring = False
        #: how many targets each backend call held, in order (for reports and tests)
        self.batches: list[int] = []

    def round(self, n: int) -> None:
        """``n`` trials are about to start together: a batch waits for all of them (or the gathering time)."""
        with self._cond:
            self._expected = n

    @contextlib.contextmanager
    def trial(self) -> Iterator[None]:
        """Wraps one trial's objective: when it ends (scored, surplus or failed), the batch waits for one fewer."""
        try:
            yield
        finally:
            with self._cond:
                self._expected -= 1
                self._cond.notify_all()

    def score(self, target: Target) -> tuple[dict[str, float], dict[str, str]]:
        """(scores, errors) of ``target``, scored together with the targets of the other trials in flight."""
        result: tuple[dict[str, float], dict[str, str]] = self._wait(_Request(target))
        return result

    def score_items(self, target: Target, sizes: dict[str, int]) -> ItemScores:
        """A stage of ``target`` (``sizes`` items per benchmark), scored with the other trials in flight at the same
        stage (:func:`dmo.scoring.items.score_items`)."""
        result: ItemScores = self._wait(_Request(target, dict(sizes)))
        return result

    def _wait(self, request: _Request) -> Any:
        with self._cond:
            self._pending.append(request)
            self._cond.notify_all()
            deadline = time.monotonic() + self.gather_seconds
            while not request.done:
                ready = len(self._pending) >= self._expected or time.monotonic() >= deadline
                if self._pending and ready and not self._scoring:
                    self._run_batch()
                else:
                    self._cond.wait(timeout=0.05)
        if request.error is not None:
            raise request.error
        assert request.result is not None
        return request.result

    def _run_batch(self) -> None:
        """Score every pending request; called with the lock held, releases it while the backend works."""
        batch, self._pending = self._pending, []
        self._scoring = True
        self._cond.release()
        # requests of one stage go to the backend together: the plain ones, and those of each stage size apart
        stages: dict[tuple[tuple[str, int], ...] | None, list[_Request]] = {}
        for r in batch:
            stages.setdefault(None if r.sizes is None else tuple(sorted(r.sizes.items())), []).append(r)
        try:
            for sizes, requests in stages.items():
                targets = [r.target for r in requests]
                results: list[Any]
                if sizes is None:
                    results = score_targets(
                        self.scorer, self.table, targets, self.benchmarks, self.group, self.on_evaluate
                    )
                else:
                    assert self.store is not None, "a staged trial needs the batcher's item store"
                    results = score_items(
                        self.scorer, self.table, self.store, targets, dict(sizes), self.group, self.on_evaluate
                    )
                for r, res in zip(requests, results):
                    r.result = res
        except BaseException as exc:
            for r in batch:
                if r.result is None:
                    r.error = exc
        finally:
            self._cond.acquire()
            for r in batch:
                r.done = True
            self.batches.append(len(batch))
            self._scoring = False
            self._cond.notify_all()
