"""One process's share of a study: run trials while the shared budget has room, retry what dead workers left.

The protocol (heartbeats, one budget, candidates enqueued once, one evaluation per proxy) is described in
:mod:`dmo.search.study`; this module is the loop that follows it.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import logging
import math
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from dmo.config import SearchSpace
from dmo.errors import DmoError
from dmo.mixture import Mixture
from dmo.progress import progress_bar
from dmo.scoring.base import Scorer, Target, score_target
from dmo.scoring.items import ItemScores, ItemStore, score_items
from dmo.search.batcher import Batcher
from dmo.search.claims import claim_key, scoring_claim
from dmo.search.ledger import Ledger, is_retry, lineage
from dmo.search.optuna_private import BaseHeartbeat, quiet_experimental, study_storage, told_a_finished_trial, trial_id
from dmo.search.stages import ITEMS_ATTR, PARTIAL_ATTR, StagedScoring, StagePruned, make_pruner, stages_of
from dmo.search.storage import MAX_RETRY, Heartbeat, storage_errors
from dmo.search.study import (
    ABORTED_ATTR,
    CLAIM_WAIT_ATTR,
    FIT_ATTR,
    MIXTURE_ATTR,
    PROXY_VALUE_ATTR,
    SURPLUS_ATTR,
    WORKER_ATTR,
    StudyPaths,
    StudyResult,
    open_study,
    summarize,
    trial_mixture,
)
from dmo.search.tradeoffs import (
    Threshold,
    objective_values,
    progress_note,
    record_constraints,
    record_thresholds,
    resolve_thresholds,
)

__all__ = ["ScoreObjective", "preflight", "proxy_target", "run_study", "worker_name"]


class ScoreObjective(Protocol):
    """What a trial maximises, from its mixture and its proxy's scores per benchmark (default: the space's aggregate
    of the scores; a calibrated objective, :func:`dmo.session.calibrated_objective`, also reads the mixture)."""

    @property
    def fit_id(self) -> str:
        """What the objective was fitted on; trials scored under another fit are not comparable with this one's."""
        ...

    def __call__(self, mixture: Mixture, scores: dict[str, float]) -> float: ...


log = logging.getLogger("dmo.study")


class _Surplus(Exception):
    """Raised by the objective for a trial that must not run; Optuna marks it failed."""


class _QuietTrials(logging.Filter):
    """Hides Optuna's two "Trial N failed" warnings about trials failed as surplus or for a DmoError (the user sees
    those as one line anyway); installed only while a study runs, so importing dmo changes no logging."""

    def __init__(self) -> None:
        super().__init__()
        self.numbers: set[int] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not any(text.startswith(f"Trial {n} failed ") for n in self.numbers)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        logger = logging.getLogger("optuna.study._optimize")
        logger.addFilter(self)
        try:
            yield
        finally:
            logger.removeFilter(self)


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


def proxy_target(space: SearchSpace) -> Callable[[Mixture], Target]:
    """The proxy a trial scores for a mixture: the space's merge method and parameters."""
    params = tuple(sorted(space.merge.params.items()))
    return lambda m: Target("proxy", mixture=m, method=space.merge.method, params=params)


def preflight(space: SearchSpace, scorer: Scorer, make_target: Callable[[Mixture], Target]) -> None:
    """Fail on broken inputs before the study is touched: fingerprinting a proxy reads every expert, and the
    scorer refuses benchmarks it cannot score."""
    if not space.benchmarks:
        raise DmoError(f"search space {space.name!r} lists no benchmarks: add 'benchmarks: [...]' to it")
    scorer.fingerprint(make_target(space.uniform()))
    scorer.check(list(space.benchmarks))


def run_study(
    space: SearchSpace,
    scorer: Scorer,
    paths: StudyPaths,
    n_trials: int | None = None,
    progress: bool = True,
    make_proxy: Callable[[Mixture], Target] | None = None,
    worker_index: int | None = None,
    heartbeat: Heartbeat | None = None,
    batch: int = 1,
    objective: ScoreObjective | None = None,
    thresholds: Sequence[Threshold] | None = None,
) -> StudyResult:
    """Run (or resume, or join) the space's study until it holds ``n_trials`` finished trials.

    For a grid, until every candidate has run. Safe to run in any number of processes at once on one storage.
    ``batch``: trials this process runs at once, their targets scored in one backend call (:mod:`dmo.search.batcher`).
    ``objective``: what a trial maximises (default: ``space.objective`` of the proxy's scores); every process on
    one study must use the same one. ``thresholds``: the space's constraints resolved (default: resolved here,
    :func:`dmo.search.tradeoffs.resolve_thresholds`).
    """
    if batch < 1:
        raise DmoError(f"--batch must be at least 1, got {batch}")
    hb = heartbeat or Heartbeat.from_env()
    make_target = make_proxy or proxy_target(space)
    preflight(space, scorer, make_target)
    if thresholds is None:
        thresholds = resolve_thresholds(space, scorer, paths.table)
    # a staged space: each benchmark's item order (drawn once, kept with the results) and the pruner, before the study
    store = ItemStore.open(paths.folder, scorer, space.benchmarks) if stages_of(space) else None
    pruner = make_pruner(space, store.totals) if store is not None else None
    study = open_study(space, paths, worker_index=worker_index, heartbeat=hb, threads=batch > 1, pruner=pruner)
    record_thresholds(study, thresholds)
    worker = _TrialLoop(
        study, space, scorer, paths, n_trials or space.sampler.n_trials, make_target, hb, batch, objective, store
    )
    worker.thresholds = list(thresholds)
    with storage_errors(paths.storage):
        worker.run(progress)
    return summarize(study, worker.evaluated)


class _TrialLoop:
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
        objective: ScoreObjective | None = None,
        store: ItemStore | None = None,
    ) -> None:
        self.study, self.space, self.scorer, self.paths = study, space, scorer, paths
        self.value = objective
        self.batch = batch
        self.batcher = (
            Batcher(scorer, paths.table, space.benchmarks, space.name or "", self._count, store=store)
            if batch > 1
            else None
        )
        self.store = store
        self.staged: StagedScoring | None = None
        if store is not None:  # the value a stage reports: the study's objective of the partial scores
            self.staged = StagedScoring.for_space(space, store.orders, space.objective)
        self.grid = space.sampler.name == "grid"
        self.target = target
        self.make_target = make_target
        self.hb = hb
        self.name = worker_name()
        self.evaluated = 0
        self.quiet = _QuietTrials()
        self.thresholds: list[Threshold] = []  # the space's constraints, resolved

    def ledger(self) -> Ledger:
        return Ledger.read(self.study.get_trials(deepcopy=False), self.hb.grace)

    def run(self, progress: bool) -> None:
        self.fail_stale()
        self.warn_if_refitted()
        ledger = self.ledger()
        if self.grid:
            todo = ledger.waiting + ledger.running + ledger.pending
        else:
            todo = max(0, self.target - ledger.finished)
        told = False
        with self.quiet.installed(), _progress(progress and todo > 0, self.paths.study_name, todo) as bar:
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
        except (UpdateFinishedTrialError, ValueError) as exc:
            # Another worker took this one for dead (no heartbeat for the grace period) and queued its trial
            # again; the score is in the results table, so the retry reads it instead of scoring again. Optuna says
            # so as UpdateFinishedTrialError, or, when the objective met it first, as a ValueError from telling the
            # already failed trial.
            if isinstance(exc, ValueError) and not told_a_finished_trial(exc):
                raise
            log.warning("this worker's trial was failed by another worker (missed heartbeats); it will be retried")
        finally:
            self.quiet.numbers.clear()  # Optuna has logged about this trial by now; numbers repeat across studies

    def warn_if_refitted(self) -> None:
        """A resumed calibrated study whose ground truth changed (new trained mixtures) keeps its earlier trials'
        values, fitted on the old ground truth: say so, since the best trial may then be the wrong one."""
        if self.value is None:
            return
        done = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        older = [t for t in done if t.user_attrs.get(FIT_ATTR) not in (None, self.value.fit_id)]
        if older:
            log.warning(
                "study %s: %d earlier trial(s) were valued by a calibration fitted on other ground truth (trained "
                "mixtures changed since); their values are not comparable with new ones: pass a new --study-name "
                "to search afresh",
                self.paths.study_name,
                len(older),
            )

    def fail_stale(self) -> None:
        """Fail (and queue again once) the trials of workers that stopped beating or whose process is gone."""
        with quiet_experimental():
            optuna.storages.fail_stale_trials(self.study)
        storage = study_storage(self.study)
        callback = storage.get_heartbeat_stale_trial_callback() if isinstance(storage, BaseHeartbeat) else None
        now = _dt.datetime.now()
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            worker = t.user_attrs.get(WORKER_ATTR)
            if worker is not None:
                if _dead_local_pid(worker) is None:
                    continue
                why = f"its worker {worker} is gone"
            else:
                # A worker killed between creating the trial (Optuna's ask, which also samples) and its first
                # heartbeat leaves a trial no heartbeat check can see: a trial nobody claimed for a whole grace period.
                started = t.datetime_start
                if started is None or abs((now - started).total_seconds()) < self.hb.grace:
                    continue
                why = f"no worker claimed it for {self.hb.grace:g} s"
            try:
                failed = storage.set_trial_state_values(trial_id(t), state=TrialState.FAIL)
            except UpdateFinishedTrialError:
                continue  # another worker got there first
            if failed:
                log.warning("trial %d: %s; queueing it again", t.number, why)
                with quiet_experimental():
                    retry = callback or RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)
                    retry(self.study, copy.deepcopy(storage.get_trial(trial_id(t))))

    def surplus_reason(self, trial: optuna.Trial) -> str | None:
        """Why this trial must not run, or None: its slot or grid candidate is taken, or it is a second retry."""
        trials = self.study.get_trials(deepcopy=False)
        mine = next((t for t in trials if t.number == trial.number), None)
        if mine is None:
            return None
        own = lineage(mine)
        if is_retry(mine):
            # It takes over the slot of the trial it replaces, unless another retry of that trial came first.
            for t in trials:
                if t.number < mine.number and is_retry(t) and lineage(t) == own:
                    return f"trial {own} is already retried by trial {t.number}"
            if not self.grid:
                return None
        ledger = Ledger.read(trials, self.hb.grace)
        if self.grid:
            mixture = mine.user_attrs.get(MIXTURE_ATTR)
            if mixture is None:
                return "every grid candidate is taken"
            for lin in ledger.live:
                if lin < own and ledger.latest[lin].user_attrs.get(MIXTURE_ATTR) == mixture:
                    return f"candidate {mixture} is held by trial {ledger.latest[lin].number}"
            return None
        rank = sum(1 for lin in ledger.live if lin < own)
        return None if rank < self.target else f"the budget of {self.target} trials is taken"

    def _batched_objective(self, trial: optuna.Trial) -> float | list[float]:
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

    def objective(self, trial: optuna.Trial) -> float | list[float]:
        reason = self.surplus_reason(trial)
        if reason is not None:
            self.quiet.numbers.add(trial.number)
            trial.set_user_attr(SURPLUS_ATTR, reason)
            raise _Surplus(reason)
        trial.set_user_attr(WORKER_ATTR, self.name)
        try:
            mixture = trial_mixture(trial, self.space.domains)
            trial.set_user_attr(MIXTURE_ATTR, mixture.id)
            target = self.make_target(mixture)
            waited = lambda: trial.set_user_attr(CLAIM_WAIT_ATTR, True)  # noqa: E731
            with scoring_claim(self.paths.folder, claim_key(self.scorer, target), on_wait=waited):
                if self.staged is not None:
                    stage_value = lambda partial: self._stage_value(mixture, partial)  # noqa: E731
                    try:
                        result = self.staged.run(trial, target, self._score_items, stage_value)
                    except StagePruned as pruned:
                        _keep_partial(trial, pruned.result)
                        raise
                    scores, errors = result.means, result.errors
                elif self.batcher is not None:
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
            if self.thresholds:
                record_constraints(trial, self.thresholds, scores)
            if self.space.objective.pareto is not None:
                return objective_values(self.space, mixture, scores)
            if self.value is None:
                value = self.space.objective(scores)
            else:  # calibrated: the proxy's own aggregate stays on the trial, for comparison
                trial.set_user_attr(PROXY_VALUE_ATTR, self.space.objective(scores))
                trial.set_user_attr(FIT_ATTR, self.value.fit_id)
                value = self.value(mixture, scores)
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
                self.quiet.numbers.add(trial.number)
            with contextlib.suppress(Exception):
                trial.set_user_attr(ABORTED_ATTR, f"{type(exc).__name__}: {str(exc)[:500]}")
            raise

    def _count(self, _: Target) -> None:
        self.evaluated += 1

    def _score_items(self, target: Target, sizes: dict[str, int]) -> ItemScores:
        """One stage of a trial's proxy: through the batch of this process's trials, or alone."""
        if self.batcher is not None:
            return self.batcher.score_items(target, sizes)
        assert self.store is not None
        group = self.space.name or ""
        return score_items(self.scorer, self.paths.table, self.store, [target], sizes, group, self._count)[0]

    def _stage_value(self, mixture: Mixture, scores: dict[str, float]) -> float:
        """What a stage reports: the study's objective of the partial scores (a calibrated one reads the mixture)."""
        if self.value is None:
            return self.space.objective(scores)
        return self.value(mixture, scores)


def _keep_partial(trial: optuna.Trial, result: ItemScores) -> None:
    """A pruned trial keeps its partial scores and how many items each covers (never as ``score:`` attributes)."""
    for b, s in result.means.items():
        trial.set_user_attr(f"{PARTIAL_ATTR}{b}", s)
    trial.set_user_attr(ITEMS_ATTR, result.covered())


class _progress:
    """The study's progress bar over trials, showing the best value so far (an Optuna callback)."""

    def __init__(self, enabled: bool, name: str, total: int) -> None:
        self.bar = progress_bar("{task.fields[best]}", enabled=enabled)
        self.task = self.bar.add_task(f"study {name}", total=total, best="")

    def __enter__(self) -> _progress:
        self.bar.start()
        # Optuna logs one INFO line per trial; the bar replaces that.
        logging.getLogger("optuna").setLevel(logging.WARNING)
        return self

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.state not in (TrialState.COMPLETE, TrialState.PRUNED):
            return
        self.bar.update(self.task, advance=1, best=progress_note(study))

    def __exit__(self, *exc: Any) -> None:
        self.bar.stop()
