"""Where a study stands: which trial lineages hold a slot of the shared budget (see :mod:`dmo.search.study`)."""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass

from optuna.trial import FrozenTrial, TrialState

from dmo.search.study import ABORTED_ATTR, SURPLUS_ATTR

__all__ = ["Ledger", "is_retry", "lineage"]


def lineage(t: FrozenTrial) -> int:
    return int(t.system_attrs.get("failed_trial", t.number))


def is_retry(t: FrozenTrial) -> bool:
    return "failed_trial" in t.system_attrs


@dataclass
class Ledger:
    """Where a study stands, from one read of its trials."""

    latest: dict[int, FrozenTrial]  # lineage -> its newest trial
    live: set[int]  # lineages still holding a budget slot
    finished: int
    waiting: int
    running: int
    pending: int  # live lineages whose newest trial failed stale and waits for its retry

    @classmethod
    def read(cls, trials: list[FrozenTrial], grace: float) -> Ledger:
        latest: dict[int, FrozenTrial] = {}
        for t in trials:
            if t.user_attrs.get(SURPLUS_ATTR):
                continue  # never ran: it stands for no lineage
            lin = lineage(t)
            if lin not in latest or t.number > latest[lin].number:
                latest[lin] = t
        now = _dt.datetime.now()
        live = {lin for lin, t in latest.items() if holds_slot(t, now, grace)}
        count = {s: 0 for s in TrialState}
        for t in trials:
            count[t.state] += 1
        pending = sum(1 for lin in live if latest[lin].state == TrialState.FAIL)
        return cls(
            latest,
            live,
            count[TrialState.COMPLETE] + count[TrialState.PRUNED],
            count[TrialState.WAITING],
            count[TrialState.RUNNING],
            pending,
        )


def holds_slot(t: FrozenTrial, now: _dt.datetime, grace: float) -> bool:
    """Whether the newest trial of a lineage still holds its budget slot."""
    if t.user_attrs.get(SURPLUS_ATTR) or t.user_attrs.get(ABORTED_ATTR):
        return False
    if t.state == TrialState.FAIL:
        if is_retry(t):
            return False  # failed again after its one retry
        # Failed as stale; its retry is being queued. A failure that no retry follows (a worker that died between
        # the two steps, or a study from older code) gives its slot back after the grace period.
        done = t.datetime_complete
        return done is None or abs((now - done).total_seconds()) < grace
    return True
