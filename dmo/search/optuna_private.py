"""The few Optuna internals dmo relies on, in one place, so that an Optuna upgrade breaks here and nowhere else.

``tests/test_optuna_private.py`` checks each of them against the installed Optuna:

- ``BaseHeartbeat``: Optuna's extension point for storages with heartbeats (public storages get heartbeats only
  for RDB); dmo's journal storage implements it so that ``optuna.storages.fail_stale_trials`` works on it.
- a frozen trial's storage id (``FrozenTrial._trial_id``) and a study's storage (``Study._storage``): needed to fail
  the trial of a worker whose process is gone without waiting for the grace period.
- ``ExperimentalWarning`` around heartbeats and the retry callback, which are what makes dead workers recoverable.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.trial import FrozenTrial

__all__ = ["BaseHeartbeat", "quiet_experimental", "study_storage", "trial_id"]


def trial_id(trial: FrozenTrial) -> int:
    """The storage's id of a trial (its ``number`` counts within one study only)."""
    return trial._trial_id


def study_storage(study: optuna.Study) -> optuna.storages.BaseStorage:
    return study._storage


@contextlib.contextmanager
def quiet_experimental() -> Iterator[None]:
    """Silence Optuna's ExperimentalWarning for heartbeat features, without touching the global filters."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        yield
