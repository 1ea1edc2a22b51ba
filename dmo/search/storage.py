"""Optuna storages for studies run by many workers: SQLite, PostgreSQL (any RDB URL) or a journal file, all with
heartbeats, and storage failures turned into one actionable line.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import random
import threading
import time
from collections.abc import Callable, Container, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import JournalStorage, RetryHeartbeatStaleTrialCallback
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from dmo.atomic import explain_os_error
from dmo.errors import DmoError
from dmo.search.optuna_private import (
    BaseHeartbeat,
    FrozenStudy,
    HeartbeatStorage,
    cached,
    is_schema_race,
    quiet_experimental,
    rdb_engine,
    stale_trial_ids,
    trial_id,
)

__all__ = [
    "DEFAULT_GRACE_PERIOD",
    "DEFAULT_HEARTBEAT_INTERVAL",
    "MAX_RETRY",
    "Heartbeat",
    "HeartbeatJournalStorage",
    "OneCallAtATime",
    "StorageError",
    "make_storage",
    "redact",
    "storage_errors",
]

#: Journal storage: trial system attribute holding the last heartbeat (Unix time).
HEARTBEAT_KEY = "dmo:heartbeat"
#: A trial of a dead worker is queued again this many times (exactly once).
MAX_RETRY = 1
DEFAULT_HEARTBEAT_INTERVAL = 30.0
DEFAULT_GRACE_PERIOD = 120.0


@dataclass(frozen=True)
class Heartbeat:
    """How often a running trial proves its worker alive, and how long silence means it is dead."""

    interval: float = DEFAULT_HEARTBEAT_INTERVAL
    grace: float = DEFAULT_GRACE_PERIOD

    @classmethod
    def from_env(cls) -> Heartbeat:
        """``DMO_HEARTBEAT_INTERVAL`` (default 30 s) and ``DMO_HEARTBEAT_GRACE`` (default 4 x interval)."""
        interval = _env_seconds("DMO_HEARTBEAT_INTERVAL", DEFAULT_HEARTBEAT_INTERVAL)
        grace = _env_seconds("DMO_HEARTBEAT_GRACE", 4 * interval)
        if grace <= interval:
            raise DmoError(
                f"DMO_HEARTBEAT_GRACE ({grace:g} s) must be longer than DMO_HEARTBEAT_INTERVAL ({interval:g} s), "
                "or a live worker would be taken for dead"
            )
        return cls(interval, grace)

    @property
    def poll(self) -> float:
        """How often a waiting worker looks at the study again."""
        return min(max(self.interval / 10, 0.1), 1.0)


def _env_seconds(name: str, default: float) -> float:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value <= 0:
        raise DmoError(f"{name}={text!r} must be a positive number of seconds")
    return value


class StorageError(DmoError):
    """A study storage that cannot be opened, read or written (bad URL, database gone, disk full, read-only)."""


class HeartbeatJournalStorage(JournalStorage, HeartbeatStorage):
    """Optuna's journal storage with heartbeats (Optuna has them only for RDB storages).

    A heartbeat is the wall-clock time in a trial system attribute, so hosts sharing a journal file need
    roughly synchronised clocks (NTP); the grace period absorbs small skews.
    """

    def __init__(
        self,
        backend: Any,
        heartbeat_interval: float,
        grace_period: float,
        heartbeat_stale_trial_callback: Callable[[optuna.Study, FrozenTrial], None] | None = None,
    ) -> None:
        super().__init__(backend)
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period
        self.heartbeat_stale_trial_callback = heartbeat_stale_trial_callback

    def record_heartbeat(self, trial_id: int) -> None:
        # The trial may have been failed by another worker that thought this one dead: nothing left to prove.
        with contextlib.suppress(UpdateFinishedTrialError, KeyError):
            self.set_trial_system_attr(trial_id, HEARTBEAT_KEY, time.time())

    def stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        stale = []
        for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            beat = trial.system_attrs.get(HEARTBEAT_KEY)
            # As in RDBStorage, a trial that never beat was not started by a heartbeat-enabled worker.
            if isinstance(beat, (int, float)) and now - beat > self.grace_period:
                stale.append(trial_id(trial))
        return stale

    def get_heartbeat_interval(self) -> float:  # type: ignore[override]
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return self.heartbeat_stale_trial_callback


def redact(url: str) -> str:
    """A storage URL safe to print: the password replaced by ``***``."""
    if url.startswith("journal:"):
        return url
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL at all; nothing to hide
        return url


_STORAGE_HINT = "use sqlite:///PATH, postgresql://USER@HOST:PORT/DB or journal:PATH"


def make_storage(url: str, heartbeat: Heartbeat | None = None, threads: bool = False) -> optuna.storages.BaseStorage:
    """An Optuna storage from a URL: ``sqlite:///``, ``postgresql://``..., or ``journal:PATH`` for a journal file.

    Every storage gets heartbeats, so a trial whose worker died is marked failed and retried once.
    """
    with quiet_experimental():
        return _make_storage(url, heartbeat or Heartbeat.from_env(), threads)


def _make_storage(url: str, hb: Heartbeat, threads: bool = False) -> optuna.storages.BaseStorage:
    retry = RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)
    shown = redact(url)
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        text = url.removeprefix("journal:")
        if not text:
            raise StorageError(f"storage {url!r} names no file: {_STORAGE_HINT}")
        path = Path(text).expanduser()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return HeartbeatJournalStorage(JournalFileBackend(str(path)), hb.interval, hb.grace, retry)
        except OSError as exc:
            raise StorageError(str(explain_os_error(exc, path))) from None
        except Exception as exc:  # a garbled journal file
            raise StorageError(f"cannot open journal storage {path}: {_first_line(exc)}") from None
    url = _with_driver(url)
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite:"):
        # Many local workers: wait for the write lock, and let dmo open every transaction (see _serialise).
        engine_kwargs = {"connect_args": {"timeout": 60, "isolation_level": None}}
        if url.startswith("sqlite:///"):
            db = Path(url.removeprefix("sqlite:///"))
            try:
                db.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StorageError(str(explain_os_error(exc, db))) from None
    attempts = 5
    for attempt in range(attempts):
        try:
            # Optuna annotates both as int, but only waits on and compares with them as seconds: a float works
            # (sub-second beats keep tests and short studies fast)
            storage = optuna.storages.RDBStorage(
                url,
                heartbeat_interval=hb.interval,  # type: ignore[arg-type]
                grace_period=hb.grace,  # type: ignore[arg-type]
                heartbeat_stale_trial_callback=retry,
                engine_kwargs=engine_kwargs,
            )
            if url.startswith("sqlite:"):
                _serialise(storage)
            # Optuna puts its cache layer in front of an RDB storage it is given, but not in front of a wrapper
            return OneCallAtATime(cached(storage)) if threads else storage
        except Exception as exc:  # sqlalchemy raises many types; the user needs the URL and the reason
            # Workers starting together on a fresh database race to create Optuna's tables: try again.
            if attempt + 1 < attempts and is_schema_race(exc):
                time.sleep(random.uniform(0.2, 1.0))
                continue
            raise _storage_error(shown, exc) from None
    raise AssertionError("unreachable")


class OneCallAtATime(HeartbeatStorage):
    """A storage that lets one thread of this process in at a time (the trials of ``--batch`` run in threads).

    Optuna's cache layer holds a lock of its own while it calls the database; two threads, one waiting for that lock
    while holding SQLite's write lock and one holding it while waiting for SQLite's, stop each other for good. With
    every call of the process behind one lock taken before the cache's (calls are milliseconds; scoring happens
    outside them), SQLite's locks are only ever contended between processes, which its busy timeout resolves.
    Heartbeats pass through when the wrapped storage has them.
    """

    def __init__(self, inner: optuna.storages.BaseStorage) -> None:
        self.inner = inner
        self._lock = threading.RLock()

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return getattr(self.inner, method)(*args, **kwargs)

    # BaseStorage, every method (tests/test_optuna_private.py checks that none is left to the base class)
    def create_new_study(self, directions: Sequence[StudyDirection], study_name: str | None = None) -> int:
        return self._call("create_new_study", directions, study_name)

    def delete_study(self, study_id: int) -> None:
        self._call("delete_study", study_id)

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        self._call("set_study_user_attr", study_id, key, value)

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        self._call("set_study_system_attr", study_id, key, value)

    def get_study_id_from_name(self, study_name: str) -> int:
        return self._call("get_study_id_from_name", study_name)

    def get_study_name_from_id(self, study_id: int) -> str:
        return self._call("get_study_name_from_id", study_id)

    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        return self._call("get_study_directions", study_id)

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        return self._call("get_study_user_attrs", study_id)

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        return self._call("get_study_system_attrs", study_id)

    def get_all_studies(self) -> list[FrozenStudy]:
        return self._call("get_all_studies")

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        return self._call("create_new_trial", study_id, template_trial)

    def set_trial_param(
        self, trial_id: int, param_name: str, param_value_internal: float, distribution: BaseDistribution
    ) -> None:
        self._call("set_trial_param", trial_id, param_name, param_value_internal, distribution)

    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        return self._call("get_trial_id_from_study_id_trial_number", study_id, trial_number)

    def get_trial_number_from_id(self, trial_id: int) -> int:
        return self._call("get_trial_number_from_id", trial_id)

    def get_trial_param(self, trial_id: int, param_name: str) -> float:
        return self._call("get_trial_param", trial_id, param_name)

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Sequence[float] | None = None) -> bool:
        return self._call("set_trial_state_values", trial_id, state, values)

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        self._call("set_trial_intermediate_value", trial_id, step, intermediate_value)

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._call("set_trial_user_attr", trial_id, key, value)

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._call("set_trial_system_attr", trial_id, key, value)

    def get_trial(self, trial_id: int) -> FrozenTrial:
        return self._call("get_trial", trial_id)

    def get_all_trials(
        self, study_id: int, deepcopy: bool = True, states: Container[TrialState] | None = None
    ) -> list[FrozenTrial]:
        return self._call("get_all_trials", study_id, deepcopy, states)

    def get_n_trials(self, study_id: int, state: tuple[TrialState, ...] | TrialState | None = None) -> int:
        return self._call("get_n_trials", study_id, state)

    def get_best_trial(self, study_id: int) -> FrozenTrial:
        return self._call("get_best_trial", study_id)

    def get_trial_params(self, trial_id: int) -> dict[str, Any]:
        return self._call("get_trial_params", trial_id)

    def get_trial_user_attrs(self, trial_id: int) -> dict[str, Any]:
        return self._call("get_trial_user_attrs", trial_id)

    def get_trial_system_attrs(self, trial_id: int) -> dict[str, Any]:
        return self._call("get_trial_system_attrs", trial_id)

    def remove_session(self) -> None:
        self._call("remove_session")

    def check_trial_is_updatable(self, trial_id: int, trial_state: TrialState) -> None:
        self._call("check_trial_is_updatable", trial_id, trial_state)

    # BaseHeartbeat, passed through when the wrapped storage has heartbeats
    def record_heartbeat(self, trial_id: int) -> None:
        self._call("record_heartbeat", trial_id)

    def stale_trial_ids(self, study_id: int) -> list[int]:
        if not isinstance(self.inner, BaseHeartbeat):
            return []
        with self._lock:
            return stale_trial_ids(self.inner, study_id)

    def get_heartbeat_interval(self) -> int | None:
        return self._call("get_heartbeat_interval") if isinstance(self.inner, BaseHeartbeat) else None

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        if not isinstance(self.inner, BaseHeartbeat):
            return None
        return self._call("get_heartbeat_stale_trial_callback")


def _serialise(storage: optuna.storages.RDBStorage) -> None:
    """Make every SQLite transaction take the write lock when it begins (``BEGIN IMMEDIATE``).

    Optuna guards "is this trial still WAITING / RUNNING?" with ``SELECT ... FOR UPDATE``, which SQLite ignores,
    and the sqlite3 driver starts a transaction only at the first write: two workers could both pop one waiting
    trial, or both fail one stale trial and queue it again twice. Serialised transactions close those races.
    """
    from sqlalchemy import event

    def begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    event.listen(rdb_engine(storage), "begin", begin)


def _with_driver(url: str) -> str:
    """``postgresql://`` with the PostgreSQL driver that is installed (SQLAlchemy 2.1 assumes psycopg 3)."""
    if not url.startswith(("postgresql://", "postgres://")):
        return url
    import importlib.util

    rest = url.split("://", 1)[1]
    for module, driver in (("psycopg", "psycopg"), ("psycopg2", "psycopg2")):
        if importlib.util.find_spec(module) is not None:
            return f"postgresql+{driver}://{rest}"
    raise StorageError(f"storage {redact(url)} needs a PostgreSQL driver: pip install 'dmo[postgres]' (psycopg2)")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _storage_error(shown: str, exc: BaseException) -> StorageError:
    chain: list[BaseException] = []  # Optuna wraps the database's own error: the cause is further down
    cause: BaseException | None = exc
    while cause is not None and len(chain) < 10:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    reasons = " | ".join(_first_line(e) for e in chain)
    errnos = {e.errno for e in chain if isinstance(e, OSError)}
    if errno.ENOSPC in errnos or "disk is full" in reasons or "No space left" in reasons:
        return StorageError(f"no space left on device for study storage {shown}: free some disk space and re-run")
    if errnos & {errno.EACCES, errno.EPERM, errno.EROFS} or "readonly database" in reasons:
        return StorageError(f"cannot write study storage {shown}: it is read-only; choose another --storage or folder")
    # Optuna says only that a commit failed, with the database's own error as the cause
    reason = _first_line(chain[-1] if isinstance(exc, optuna.exceptions.StorageInternalError) else exc)
    hint = "" if "://" in shown or shown.startswith("journal:") else f" ({_STORAGE_HINT})"
    return StorageError(f"cannot use study storage {shown}: {reason}{hint}")


@contextlib.contextmanager
def storage_errors(url: str) -> Iterator[None]:
    """Storage failures (disk full, database gone) become one actionable line; errors of the objective do not."""
    try:
        yield
    except DmoError:
        raise
    except Exception as exc:
        if getattr(exc, "_dmo_objective", False) or not _is_storage_error(exc):
            raise
        raise _storage_error(redact(url), exc) from exc


def _is_storage_error(exc: BaseException) -> bool:
    if isinstance(exc, (OSError, optuna.exceptions.StorageInternalError)):
        return True
    try:
        import sqlalchemy.exc

        return isinstance(exc, sqlalchemy.exc.SQLAlchemyError)
    except ImportError:
        return False
