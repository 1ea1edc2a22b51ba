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

#: How long a trial's target waits for the others of its batch before it is scored with whatever has arrived.
GATHER_SECONDS = 2.0


@dataclass
class _Request:
    target: Target
    result: tuple[dict[str, float], dict[str, str]] | None = None
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
    ) -> None:
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
        request = _Request(target)
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
        try:
            results: list[Any] = score_targets(
                self.scorer, self.table, [r.target for r in batch], self.benchmarks, self.group, self.on_evaluate
            )
            for r, res in zip(batch, results):
                r.result = res
        except BaseException as exc:
            for r in batch:
                r.error = exc
        finally:
            self._cond.acquire()
            for r in batch:
                r.done = True
            self.batches.append(len(batch))
            self._scoring = False
            self._cond.notify_all()
