"""The Optuna internals dmo relies on, in one place, so that an Optuna upgrade breaks here and nowhere else.

``tests/test_optuna_private.py`` checks each of them against the installed Optuna:

- ``BaseHeartbeat``: Optuna's extension point for storages with heartbeats (public storages get heartbeats only
  for RDB). Its abstract ``_get_stale_trial_ids`` is private: :class:`HeartbeatStorage` maps it to
  ``stale_trial_ids``, so dmo's storages implement a public name and call :func:`stale_trial_ids` on others.
- ``FrozenStudy``, the type ``BaseStorage.get_all_studies`` returns (not exported by Optuna).
- a frozen trial's storage id (``FrozenTrial._trial_id``) and a study's storage (``Study._storage``): needed to fail
  the trial of a worker whose process is gone without waiting for the grace period.
- the cache layer Optuna puts in front of an RDB storage (``optuna.storages.get_storage``, "for internal usage"),
  and an RDB storage's SQLAlchemy engine (``RDBStorage.engine``, an attribute "not supposed to be accessed").
- the message of the ``ValueError`` Optuna raises when it tells a trial that is already finished
  (:func:`told_a_finished_trial`): what a worker sees when another worker failed its trial as stale.
- which database errors mean that workers raced to create Optuna's tables on a fresh database
  (:func:`is_schema_race`: SQLAlchemy's error types, and SQLite's message for a table that already exists).
- ``ExperimentalWarning`` around heartbeats and the retry callback, which are what makes dead workers recoverable.
"""

from __future__ import annotations

import abc
import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.study._frozen import FrozenStudy
from optuna.trial import FrozenTrial

__all__ = [
    "BaseHeartbeat",
    "FrozenStudy",
    "HeartbeatStorage",
    "cached",
    "is_schema_race",
    "quiet_experimental",
    "rdb_engine",
    "stale_trial_ids",
    "study_storage",
    "told_a_finished_trial",
    "trial_id",
]


def trial_id(trial: FrozenTrial) -> int:
    """The storage's id of a trial (its ``number`` counts within one study only)."""
    return trial._trial_id


def study_storage(study: optuna.Study) -> optuna.storages.BaseStorage:
    return study._storage


class HeartbeatStorage(optuna.storages.BaseStorage, BaseHeartbeat):
    """A storage with heartbeats, whose subclasses name the stale trials by a public method."""

    @abc.abstractmethod
    def stale_trial_ids(self, study_id: int) -> list[int]:
        """Ids of the study's running trials whose heartbeat is older than the grace period."""

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        return self.stale_trial_ids(study_id)


def stale_trial_ids(storage: BaseHeartbeat, study_id: int) -> list[int]:
    return storage._get_stale_trial_ids(study_id)


def cached(storage: optuna.storages.RDBStorage) -> optuna.storages.BaseStorage:
    """``storage`` behind the cache layer that ``optuna.create_study``/``load_study`` put in front of it."""
    return optuna.storages.get_storage(storage)


def rdb_engine(storage: optuna.storages.RDBStorage) -> Any:
    """The SQLAlchemy engine an RDB storage talks through."""
    return storage.engine


def told_a_finished_trial(exc: BaseException) -> bool:
    """Whether ``exc`` is Optuna refusing to tell (record the result of) a trial that is already finished."""
    return isinstance(exc, ValueError) and str(exc).startswith("Cannot tell a ")


def is_schema_race(exc: BaseException) -> bool:
    """Whether opening an RDB storage failed because another process was creating Optuna's tables at that moment
    (a duplicate table, type or version row); opening it again then succeeds."""
    try:
        import sqlalchemy.exc
    except ImportError:
        return False
    chain: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and len(chain) < 10:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    for e in chain:
        if isinstance(e, (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError)):
            return True  # PostgreSQL: a duplicate table or type, or a second alembic version row
        if isinstance(e, sqlalchemy.exc.OperationalError) and "already exists" in str(e):
            return True  # SQLite: "table studies already exists"
    return False


@contextlib.contextmanager
def quiet_experimental() -> Iterator[None]:
    """Silence Optuna's ExperimentalWarning for heartbeat features, without touching the global filters."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        yield
