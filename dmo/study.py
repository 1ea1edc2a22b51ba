"""Optuna studies over mixture weights, run by one process or by many workers sharing one storage.

One trial = one mixture = one proxy scored on the space's benchmarks. The simplex is searched through the
stick-breaking box of :mod:`dmo.simplex`; a ``grid`` study instead enqueues the space's candidate list once.
Storage defaults to SQLite at ``results/<space>/study.db``; running the same command again resumes the
study (``n_trials`` is the total wanted, not an increment), and every score goes through the results table,
so a mixture already scored, by this study or another one on the same space, is never scored again.

Any number of workers (``dmo study --workers N``, SLURM array tasks, processes on several hosts) can run one
study on one storage: SQLite (one machine), an RDB URL such as ``postgresql://user@host/db`` (many machines),
or ``journal:PATH`` (Optuna's journal file, for a shared filesystem without a database). They coordinate only
through Optuna's storage and the results folder, and nothing is lost or done twice:

* **Heartbeats.** A running trial records a heartbeat every ``DMO_HEARTBEAT_INTERVAL`` seconds (Optuna's RDB
  heartbeats; for the journal the same protocol through a trial system attribute). A trial whose worker fell
  silent for ``DMO_HEARTBEAT_GRACE`` seconds is failed by the next worker that looks
  (:func:`optuna.storages.fail_stale_trials`) and queued again once, with its mixture
  (:class:`optuna.storages.RetryHeartbeatStaleTrialCallback`, ``max_retry=1``). A dead worker on the same host
  (its process is gone) is noticed at once, without waiting for the grace period.
* **One budget for all workers.** ``n_trials`` counts finished trials over all workers. A trial's *lineage* is
  its own number, or for a retry the number of the trial it replaces. A new trial runs only if fewer than
  ``n_trials`` live lineages have smaller numbers; one that loses this race is marked ``dmo_surplus`` and failed
  unscored. Workers whose budget is used up wait while other workers' trials still run, so that a trial whose
  worker dies is still retried.
* **Candidates enqueued once.** Creating a study is atomic in every storage: only its creator enqueues a grid,
  then marks the study ready; the others wait for the mark (and take over if the creator died half-way). A
  grid trial whose mixture an earlier live trial already holds is not run.
* **One evaluation per proxy.** Before scoring, a worker takes a claim on the proxy (an exclusive ``flock`` on
  ``results/<space>/.claims/<key>.lock``); a second worker that drew the same point waits for it and then reads
  the first one's score from the results table. The kernel drops the lock of a killed process, so the claim of a
  dead worker is taken over at once.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import random
import secrets
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import DuplicatedStudyError, ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import JournalStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat  # Optuna's extension point for storages with heartbeats
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dmo.atomic import _explain
from dmo.batcher import Batcher
from dmo.config import SearchSpace
from dmo.errors import DmoError
from dmo.mixture import Mixture
from dmo.paths import results_dir, safe_name
from dmo.results import ResultsTable, cache_key
from dmo.samplers import make_sampler
from dmo.scorer import Scorer, Target, score_target
from dmo.simplex import from_box, param_names, to_box

MIXTURE_ATTR = "mixture"
#: Trial user attribute: which worker ran the trial (``DMO_WORKER_NAME``, else ``local:HOST:PIDNS:PID``).
WORKER_ATTR = "worker"
#: Trial user attribute: the trial lost the race for a budget slot or a grid candidate; failed, never scored.
SURPLUS_ATTR = "dmo_surplus"
#: Trial user attribute: the objective raised (a bad input, Ctrl-C); its slot is given back, it is not retried.
ABORTED_ATTR = "dmo_aborted"
#: Trial user attribute: the trial waited for another worker that was scoring the same proxy.
CLAIM_WAIT_ATTR = "dmo_waited_for_claim"
#: Study user attributes: the creator sets ``dmo_init`` first and ``dmo_ready`` once the grid is enqueued.
INIT_ATTR = "dmo_init"
READY_ATTR = "dmo_ready"
#: Journal storage: trial system attribute holding the last heartbeat (Unix time).
HEARTBEAT_KEY = "dmo:heartbeat"
#: A trial of a dead worker is queued again this many times (exactly once).
MAX_RETRY = 1
DEFAULT_HEARTBEAT_INTERVAL = 30.0
DEFAULT_GRACE_PERIOD = 120.0

# Heartbeats and the retry callback are "experimental" in Optuna; they are what makes dead workers recoverable.
warnings.filterwarnings("ignore", category=ExperimentalWarning)
log = logging.getLogger("dmo.study")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence Optuna's ExperimentalWarning also where the filter above was reset (pytest resets it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        yield


def space_hash(space: SearchSpace) -> str:
    """What a study's results depend on; the sampler and the trial count may change between runs."""
    relevant = space.model_dump(mode="json", exclude={"sampler", "name"})
    relevant["candidates"] = [m.id for m in space.candidates()]
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class StudyPaths:
    folder: Path
    storage: str
    study_name: str
    table: ResultsTable


def study_paths(
    space: SearchSpace, storage: str | None = None, study_name: str | None = None, root: Path | None = None
) -> StudyPaths:
    assert space.name is not None
    folder = (root or results_dir()) / safe_name(space.name, "space name")
    name = safe_name(study_name or f"{space.name}.{space.sampler.name}", "study name")
    url = storage or f"sqlite:///{(folder / 'study.db').resolve()}"
    return StudyPaths(folder, url, name, ResultsTable(folder / "scores.jsonl"))


# ------------------------------------------------------------------------------------------------------ storages


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


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
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

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        stale = []
        for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            beat = trial.system_attrs.get(HEARTBEAT_KEY)
            # As in RDBStorage, a trial that never beat was not started by a heartbeat-enabled worker.
            if isinstance(beat, (int, float)) and now - beat > self.grace_period:
                stale.append(trial._trial_id)
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
    with _quiet():
        return _make_storage(url, heartbeat or Heartbeat.from_env(), threads)


def _make_storage(url: str, hb: Heartbeat, threads: bool = False) -> optuna.storages.BaseStorage:
    retry = RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)
    shown = redact(url)
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        text = url.removeprefix("journal:")
        if not text:
            raise DmoError(f"storage {url!r} names no file: {_STORAGE_HINT}")
        path = Path(text).expanduser()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return HeartbeatJournalStorage(JournalFileBackend(str(path)), hb.interval, hb.grace, retry)
        except OSError as exc:
            raise _explain(exc, path) from None
        except Exception as exc:  # a garbled journal file
            raise DmoError(f"cannot open journal storage {path}: {_first_line(exc)}") from None
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
                raise _explain(exc, db) from None
    attempts = 5
    for attempt in range(attempts):
        try:
            storage = optuna.storages.RDBStorage(
                url,
                heartbeat_interval=hb.interval,
                grace_period=hb.grace,  # type: ignore[arg-type]
                heartbeat_stale_trial_callback=retry,
                engine_kwargs=engine_kwargs,
            )
            if url.startswith("sqlite:"):
                _serialise(storage)
            return _one_call_at_a_time(storage) if threads else storage
        except Exception as exc:  # sqlalchemy raises many types; the user needs the URL and the reason
            # Workers starting together on a fresh database race to create Optuna's tables: try again.
            racy = type(exc).__name__ in ("IntegrityError", "ProgrammingError") or "already exists" in str(exc)
            if attempt + 1 < attempts and racy:
                time.sleep(random.uniform(0.2, 1.0))
                continue
            raise _storage_error(shown, exc) from None
    raise AssertionError("unreachable")


def _one_call_at_a_time(storage: optuna.storages.RDBStorage) -> optuna.storages.RDBStorage:
    """Let one thread of this process into the database at a time (the trials of ``--batch`` run in threads).

    Optuna's cache layer holds a lock of its own while it calls the database; two threads, one waiting for that lock
    while holding SQLite's write lock and one holding it while waiting for SQLite's, stop each other for good. With
    every database call of the process behind one lock (calls are milliseconds; scoring happens outside them),
    SQLite's locks are only ever contended between processes, which its busy timeout resolves.
    """
    lock = threading.RLock()

    def locked(fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            with lock:
                return fn(*args, **kwargs)

        return call

    for name in dir(type(storage)):  # the cache layer calls private methods (_set_trial_param) too
        if not name.startswith("__") and callable(getattr(type(storage), name, None)):
            setattr(storage, name, locked(getattr(storage, name)))
    return storage


def _serialise(storage: optuna.storages.RDBStorage) -> None:
    """Make every SQLite transaction take the write lock when it begins (``BEGIN IMMEDIATE``).

    Optuna guards "is this trial still WAITING / RUNNING?" with ``SELECT ... FOR UPDATE``, which SQLite ignores,
    and the sqlite3 driver starts a transaction only at the first write: two workers could both pop one waiting
    trial, or both fail one stale trial and queue it again twice. Serialised transactions close those races.
    """
    from sqlalchemy import event

    def begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    event.listen(storage.engine, "begin", begin)


def _with_driver(url: str) -> str:
    """``postgresql://`` with the PostgreSQL driver that is installed (SQLAlchemy 2.1 assumes psycopg 3)."""
    if not url.startswith(("postgresql://", "postgres://")):
        return url
    import importlib.util

    rest = url.split("://", 1)[1]
    for module, driver in (("psycopg", "psycopg"), ("psycopg2", "psycopg2")):
        if importlib.util.find_spec(module) is not None:
            return f"postgresql+{driver}://{rest}"
    raise DmoError(f"storage {redact(url)} needs a PostgreSQL driver: pip install 'dmo[postgres]' (psycopg2)")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _storage_error(shown: str, exc: BaseException) -> DmoError:
    chain = []  # Optuna wraps the database's own error: the cause is further down
    cause: BaseException | None = exc
    while cause is not None and len(chain) < 10:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    reasons = " | ".join(_first_line(e) for e in chain)
    errnos = {e.errno for e in chain if isinstance(e, OSError)}
    if errno.ENOSPC in errnos or "disk is full" in reasons or "No space left" in reasons:
        return DmoError(f"no space left on device for study storage {shown}: free some disk space and re-run")
    if errnos & {errno.EACCES, errno.EPERM, errno.EROFS} or "readonly database" in reasons:
        return DmoError(f"cannot write study storage {shown}: it is read-only; choose another --storage or folder")
    reason = _first_line(chain[-1]) if "exception is raised during the commit" in _first_line(exc) else None
    reason = reason or _first_line(exc)
    hint = "" if "://" in shown or shown.startswith("journal:") else f" ({_STORAGE_HINT})"
    return DmoError(f"cannot use study storage {shown}: {reason}{hint}")


@contextlib.contextmanager
def _storage_errors(url: str) -> Iterator[None]:
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


# --------------------------------------------------------------------------------------------- opening a study


def open_study(
    space: SearchSpace,
    paths: StudyPaths,
    worker_index: int | None = None,
    heartbeat: Heartbeat | None = None,
    threads: bool = False,
) -> optuna.Study:
    """Create the study, or join it once its creator has set it up, if it was made for the same space.

    Exactly one process creates a study (creation is atomic in every storage); it records the space and, for a
    grid, enqueues the candidates, then marks the study ready. Everyone else waits for that mark.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    hb = heartbeat or Heartbeat.from_env()
    storage = make_storage(paths.storage, hb, threads)
    with _storage_errors(paths.storage):
        try:
            storage.create_new_study([StudyDirection.MAXIMIZE], paths.study_name)
            created = True
        except DuplicatedStudyError:
            created = False
        seed = worker_seed(space.sampler.seed, worker_index, created)
        sampler = make_sampler(space.sampler.name, seed, space.sampler.params)
        study = optuna.load_study(study_name=paths.study_name, storage=storage, sampler=sampler)
        if created:
            study.set_user_attr(INIT_ATTR, "started")
            _initialise(study, space)
        else:
            _wait_until_ready(study, space, paths, hb)
    if study.user_attrs.get("space_hash") != space_hash(space):
        raise DmoError(
            f"study {paths.study_name!r} in {redact(paths.storage)} was made for a different search space "
            "(domains, candidates, merge, benchmarks, objective or scoring changed): "
            "pass a new --study-name, or restore the space file"
        )
    return study


def worker_seed(seed: int, worker_index: int | None, created: bool) -> int:
    """The sampler seed of one worker: workers with one seed would all propose the same points.

    ``worker_index`` (or ``DMO_WORKER_INDEX``) k gives ``seed + k``; without one, the study's creator keeps the
    space's seed and a process joining an existing study draws a fresh offset.
    """
    if worker_index is None:
        text = os.environ.get("DMO_WORKER_INDEX", "").strip()
        if text:
            try:
                worker_index = int(text)
            except ValueError:
                raise DmoError(f"DMO_WORKER_INDEX={text!r} must be a whole number") from None
    if worker_index is not None:
        return (seed + worker_index) % 2**31
    return seed if created else (seed + 1 + secrets.randbelow(2**30)) % 2**31


def _initialise(study: optuna.Study, space: SearchSpace) -> None:
    want = space_hash(space)
    attrs = study.user_attrs
    if attrs.get("space_hash") is None:
        study.set_user_attr("space_hash", want)
        study.set_user_attr("domains", list(space.domains))
        study.set_user_attr("benchmarks", list(space.benchmarks))
    elif attrs["space_hash"] != want:
        return  # refused by the caller, without touching the study
    if space.sampler.name == "grid":
        enqueue_candidates(study, space)
    study.set_user_attr(READY_ATTR, want)


def _wait_until_ready(study: optuna.Study, space: SearchSpace, paths: StudyPaths, hb: Heartbeat) -> None:
    """Wait for the creator to mark the study ready; take over if it made no progress for the grace period."""
    last: tuple[Any, ...] | None = None
    since = time.monotonic()
    while True:
        attrs = study.user_attrs
        if READY_ATTR in attrs:
            return
        if "space_hash" in attrs and INIT_ATTR not in attrs:
            _initialise(study, space)  # a study made before dmo marked studies ready
            return
        now = time.monotonic()
        progress = (tuple(sorted(attrs)), len(study.get_trials(deepcopy=False)))
        if progress != last:
            last, since = progress, now
        elif now - since > hb.grace:
            log.warning("the process that created study %s stopped while setting it up; finishing it", paths.study_name)
            _initialise(study, space)
            return
        time.sleep(hb.poll)


def trial_mixture(trial: optuna.Trial, domains: list[str]) -> Mixture:
    u = [trial.suggest_float(n, 0.0, 1.0) for n in param_names(domains)]
    fixed = trial.user_attrs.get(MIXTURE_ATTR)
    # An enqueued candidate is taken verbatim, not through the box round-trip and its float rounding.
    return Mixture.parse(fixed, domains) if fixed else from_box(domains, u).canonical()


def enqueue_candidates(study: optuna.Study, space: SearchSpace) -> int:
    """Enqueue each candidate not yet in the study (in any state); returns how many are still to run."""
    seen = {t.user_attrs.get(MIXTURE_ATTR) for t in study.get_trials(deepcopy=False)}
    names = param_names(space.domains)
    for m in space.candidates():
        if m.id not in seen:
            study.enqueue_trial(dict(zip(names, to_box(m))), user_attrs={MIXTURE_ATTR: m.id})
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    return len(waiting)


# ------------------------------------------------------------------------------------------- claims on proxies


def claim_key(scorer: Scorer, target: Target) -> str:
    """Names one scoring of one proxy: the model's fingerprint and the scorer's settings."""
    return cache_key(model=scorer.fingerprint(target), claim="score", **scorer.settings())


@contextlib.contextmanager
def scoring_claim(folder: Path, key: str, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold the exclusive claim on scoring proxy ``key``; wait (calling ``on_wait`` once) while another holds it.

    An ``flock`` on ``folder/.claims/<key>.lock``: the kernel releases it when its holder exits or is killed,
    so a dead holder's claim passes to the next waiter at once. Lock files are left in place (deleting one
    while another process waits on it would let a third take a second lock).
    """
    path = folder / ".claims" / f"{key}.lock"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise _explain(exc, path) from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------------- the ledger


def _lineage(t: FrozenTrial) -> int:
    return int(t.system_attrs.get("failed_trial", t.number))


def _is_retry(t: FrozenTrial) -> bool:
    return "failed_trial" in t.system_attrs


@dataclass
class _Ledger:
    """Where a study stands, from one read of its trials."""

    latest: dict[int, FrozenTrial]  # lineage -> its newest trial
    live: set[int]  # lineages still holding a budget slot
    finished: int
    waiting: int
    running: int
    pending: int  # live lineages whose newest trial failed stale and waits for its retry

    @classmethod
    def read(cls, trials: list[FrozenTrial], grace: float) -> _Ledger:
        latest: dict[int, FrozenTrial] = {}
        for t in trials:
            if t.user_attrs.get(SURPLUS_ATTR):
                continue  # never ran: it stands for no lineage
            lin = _lineage(t)
            if lin not in latest or t.number > latest[lin].number:
                latest[lin] = t
        now = _dt.datetime.now()
        live = {lin for lin, t in latest.items() if _holds_slot(t, now, grace)}
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


def _holds_slot(t: FrozenTrial, now: _dt.datetime, grace: float) -> bool:
    """Whether the newest trial of a lineage still holds its budget slot."""
    if t.user_attrs.get(SURPLUS_ATTR) or t.user_attrs.get(ABORTED_ATTR):
        return False
    if t.state == TrialState.FAIL:
        if _is_retry(t):
            return False  # failed again after its one retry
        # Failed as stale; its retry is being queued. A failure that no retry follows (a worker that died between
        # the two steps, or a study from older code) gives its slot back after the grace period.
        done = t.datetime_complete
        return done is None or abs((now - done).total_seconds()) < grace
    return True


class _Surplus(Exception):
    """Raised by the objective for a trial that must not run; Optuna marks it failed."""


#: Trials this process failed as surplus or for a DmoError (shown to the user as one line anyway): Optuna's two
#: "Trial N failed" warnings about them are noise.
_QUIET_TRIALS: set[int] = set()


class _QuietSurplus(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not any(text.startswith(f"Trial {n} failed ") for n in _QUIET_TRIALS)


logging.getLogger("optuna.study._optimize").addFilter(_QuietSurplus())


# ------------------------------------------------------------------------------------------------- the worker


def worker_name() -> str:
    """``DMO_WORKER_NAME`` (e.g. a SLURM job id), else ``local:HOST:PIDNS:PID``, recorded on each trial it runs."""
    return os.environ.get("DMO_WORKER_NAME") or f"local:{socket.gethostname()}:{_pid_namespace()}:{os.getpid()}"


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "?"


def _dead_local_pid(name: Any) -> int | None:
    """The pid of a worker named ``local:...`` on this host and pid namespace whose process is gone."""
    parts = name.split(":") if isinstance(name, str) else []
    if len(parts) != 4 or parts[0] != "local" or not parts[3].isdigit():
        return None
    _, host, ns, pid_text = parts
    if host != socket.gethostname() or ns == "?" or ns != _pid_namespace():
        return None
    pid = int(pid_text)
    if pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return pid
    except PermissionError:
        return None  # alive, under another user
    try:  # a killed child its parent has not reaped yet is dead too
        stat = Path(f"/proc/{pid}/stat").read_text()
        return pid if stat.rsplit(")", 1)[1].split()[0] == "Z" else None
    except (OSError, IndexError):
        return None


@dataclass
class StudyResult:
    study: optuna.Study
    best: Mixture | None
    best_value: float | None
    best_scores: dict[str, float]
    evaluated: int


def preflight(space: SearchSpace, scorer: Scorer, make_target: Callable[[Mixture], Target]) -> None:
    """Fail on broken inputs before the study is touched: fingerprinting a proxy reads every expert.

    A scorer may also offer ``check(benchmarks)`` to refuse benchmarks it cannot score.
    """
    if not space.benchmarks:
        raise DmoError(f"search space {space.name!r} lists no benchmarks: add 'benchmarks: [...]' to it")
    scorer.fingerprint(make_target(space.uniform()))
    check = getattr(scorer, "check", None)
    if callable(check):
        check(list(space.benchmarks))


def run_study(
    space: SearchSpace,
    scorer: Scorer,
    paths: StudyPaths,
    n_trials: int | None = None,
    progress: bool = True,
    proxy_target: Callable[[Mixture], Target] | None = None,
    worker_index: int | None = None,
    heartbeat: Heartbeat | None = None,
    batch: int = 1,
) -> StudyResult:
    """Run (or resume, or join) the space's study until it holds ``n_trials`` finished trials.

    For a grid, until every candidate has run. Safe to run in any number of processes at once on one storage.
    ``batch``: trials this process runs at once, their targets scored in one backend call (:mod:`dmo.batcher`).
    """
    if batch < 1:
        raise DmoError(f"--batch must be at least 1, got {batch}")
    hb = heartbeat or Heartbeat.from_env()
    params = tuple(sorted(space.merge.params.items()))
    make_target = proxy_target or (lambda m: Target("proxy", mixture=m, method=space.merge.method, params=params))
    preflight(space, scorer, make_target)
    study = open_study(space, paths, worker_index=worker_index, heartbeat=hb, threads=batch > 1)
    worker = _Worker(study, space, scorer, paths, n_trials or space.sampler.n_trials, make_target, hb, batch)
    with _storage_errors(paths.storage):
        worker.run(progress)
    return summarize(study, worker.evaluated)


class _Worker:
    """One process's share of a study: run trials while the budget has room, retry what dead workers left."""

    def __init__(
        self,
        study: optuna.Study,
        space: SearchSpace,
        scorer: Scorer,
        paths: StudyPaths,
        target: int,
        make_target: Callable[[Mixture], Target],
        hb: Heartbeat,
        batch: int = 1,
    ) -> None:
        self.study, self.space, self.scorer, self.paths = study, space, scorer, paths
        self.batch = batch
        self.batcher = (
            Batcher(scorer, paths.table, space.benchmarks, space.name or "", self._count) if batch > 1 else None
        )
        self.grid = space.sampler.name == "grid"
        self.target = target
        self.make_target = make_target
        self.hb = hb
        self.name = worker_name()
        self.evaluated = 0

    def ledger(self) -> _Ledger:
        return _Ledger.read(self.study.get_trials(deepcopy=False), self.hb.grace)

    def run(self, progress: bool) -> None:
        self.fail_stale()
        ledger = self.ledger()
        if self.grid:
            todo = ledger.waiting + ledger.running + ledger.pending
        else:
            todo = max(0, self.target - ledger.finished)
        told = False
        with _progress(progress and todo > 0, self.paths.study_name, todo) as bar:
            while True:
                if self.grid:
                    room = ledger.waiting > 0
                    done = False
                else:
                    done = ledger.finished >= self.target
                    room = ledger.waiting > 0 or len(ledger.live) < self.target
                if done:
                    break
                if room:
                    slots = ledger.waiting if self.grid else ledger.waiting + self.target - len(ledger.live)
                    self.one_trial(bar, max(1, min(self.batch, slots)))
                elif ledger.running or ledger.pending:
                    if not told:
                        log.info("waiting for %d trial(s) of other workers to finish", ledger.running)
                        told = True
                    time.sleep(self.hb.poll)
                else:
                    break
                self.fail_stale()
                ledger = self.ledger()

    def one_trial(self, bar: _progress, n: int = 1) -> None:
        """Run ``n`` trials at once (Optuna's threads; each asks, runs and is told on its own)."""
        objective = self.objective if self.batcher is None else self._batched_objective
        if self.batcher is not None:
            self.batcher.round(n)
        self._errors: list[BaseException] = []
        try:
            self.study.optimize(objective, n_trials=n, n_jobs=n, callbacks=[bar], catch=(_Surplus,))
            if self._errors:
                raise self._errors[0]
        except UpdateFinishedTrialError:
            # Another worker took this one for dead (no heartbeat for the grace period) and queued its trial
            # again; the score is in the results table, so the retry reads it instead of scoring again.
            log.warning("this worker's trial was failed by another worker (missed heartbeats); it will be retried")
        finally:
            _QUIET_TRIALS.clear()  # Optuna has logged about this trial by now; numbers repeat across studies

    def fail_stale(self) -> None:
        """Fail (and queue again once) the trials of workers that stopped beating or whose process is gone."""
        with _quiet():
            optuna.storages.fail_stale_trials(self.study)
        storage = self.study._storage
        callback = getattr(storage, "get_heartbeat_stale_trial_callback", lambda: None)()
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if _dead_local_pid(t.user_attrs.get(WORKER_ATTR)) is None:
                continue
            try:
                failed = storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
            except UpdateFinishedTrialError:
                continue  # another worker got there first
            if failed:
                log.warning("trial %d: its worker %s is gone; queueing it again", t.number, t.user_attrs[WORKER_ATTR])
                with _quiet():
                    retry = callback or RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)
                    retry(self.study, copy.deepcopy(storage.get_trial(t._trial_id)))

    def surplus_reason(self, trial: optuna.Trial) -> str | None:
        """Why this trial must not run, or None: its slot or grid candidate is taken, or it is a second retry."""
        trials = self.study.get_trials(deepcopy=False)
        mine = next((t for t in trials if t.number == trial.number), None)
        if mine is None:
            return None
        lineage = _lineage(mine)
        if _is_retry(mine):
            # It takes over the slot of the trial it replaces, unless another retry of that trial came first.
            for t in trials:
                if t.number < mine.number and _is_retry(t) and _lineage(t) == lineage:
                    return f"trial {lineage} is already retried by trial {t.number}"
            if not self.grid:
                return None
        ledger = _Ledger.read(trials, self.hb.grace)
        if self.grid:
            mixture = mine.user_attrs.get(MIXTURE_ATTR)
            if mixture is None:
                return "every grid candidate is taken"
            for lin in ledger.live:
                if lin < lineage and ledger.latest[lin].user_attrs.get(MIXTURE_ATTR) == mixture:
                    return f"candidate {mixture} is held by trial {ledger.latest[lin].number}"
            return None
        rank = sum(1 for lin in ledger.live if lin < lineage)
        return None if rank < self.target else f"the budget of {self.target} trials is taken"

    def _batched_objective(self, trial: optuna.Trial) -> float:
        assert self.batcher is not None
        with self.batcher.trial():
            try:
                return self.objective(trial)
            except (optuna.TrialPruned, _Surplus):
                raise
            except BaseException as exc:
                # Optuna's threads do not re-raise what the last trials of a round raise: one_trial does.
                self._errors.append(exc)
                raise

    def objective(self, trial: optuna.Trial) -> float:
        reason = self.surplus_reason(trial)
        if reason is not None:
            _QUIET_TRIALS.add(trial.number)
            trial.set_user_attr(SURPLUS_ATTR, reason)
            raise _Surplus(reason)
        trial.set_user_attr(WORKER_ATTR, self.name)
        try:
            mixture = trial_mixture(trial, self.space.domains)
            trial.set_user_attr(MIXTURE_ATTR, mixture.id)
            target = self.make_target(mixture)
            waited = lambda: trial.set_user_attr(CLAIM_WAIT_ATTR, True)  # noqa: E731
            with scoring_claim(self.paths.folder, claim_key(self.scorer, target), on_wait=waited):
                if self.batcher is not None:
                    scores, errors = self.batcher.score(target)
                else:
                    scores, errors = score_target(
                        self.scorer,
                        self.paths.table,
                        target,
                        self.space.benchmarks,
                        group=self.space.name or "",
                        on_evaluate=self._count,
                    )
            for b, s in scores.items():
                trial.set_user_attr(f"score:{b}", s)
            if errors:
                trial.set_user_attr("errors", errors)
                raise optuna.TrialPruned(f"benchmarks failed: {', '.join(sorted(errors))}")
            value = self.space.objective(scores)
            if not math.isfinite(value):
                raise DmoError(f"mixture {mixture.id} scored {scores}: the objective is {value}, not a finite number")
            return value
        except optuna.TrialPruned:
            raise
        except BaseException as exc:
            # Not a dead worker: the error (or Ctrl-C) reaches the user, and the trial gives back its slot.
            with contextlib.suppress(Exception):
                exc._dmo_objective = True  # type: ignore[attr-defined]
            if isinstance(exc, (DmoError, KeyboardInterrupt)):
                _QUIET_TRIALS.add(trial.number)
            with contextlib.suppress(Exception):
                trial.set_user_attr(ABORTED_ATTR, f"{type(exc).__name__}: {str(exc)[:500]}")
            raise

    def _count(self, _: Target) -> None:
        self.evaluated += 1


def summarize(study: optuna.Study, evaluated: int = 0) -> StudyResult:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return StudyResult(study, None, None, {}, evaluated)
    best = max(complete, key=lambda t: t.value if t.value is not None else float("-inf"))
    domains = study.user_attrs.get("domains")
    mixture = Mixture.parse(best.user_attrs[MIXTURE_ATTR], domains)
    scores = {k.removeprefix("score:"): v for k, v in best.user_attrs.items() if k.startswith("score:")}
    return StudyResult(study, mixture, best.value, scores, evaluated)


class _progress:
    """A rich progress bar over trials that shows the best value so far; a no-op when disabled."""

    def __init__(self, enabled: bool, name: str, total: int) -> None:
        self.enabled, self.name, self.total = enabled, name, total
        self.bar: Progress | None = None

    def __enter__(self) -> _progress:
        if self.enabled:
            self.bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[best]}"),
            )
            self.bar.start()
            self.task = self.bar.add_task(f"study {self.name}", total=self.total, best="")
        # Optuna logs one INFO line per trial; the bar replaces that.
        logging.getLogger("optuna").setLevel(logging.WARNING)
        return self

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if self.bar is None or trial.state not in (TrialState.COMPLETE, TrialState.PRUNED):
            return
        try:
            best = f"best {study.best_value:.4f}"
        except ValueError:
            best = ""
        self.bar.update(self.task, advance=1, best=best)

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()
