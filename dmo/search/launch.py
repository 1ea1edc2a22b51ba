"""``dmo study --workers N``: N local worker processes on one study.

Each worker is a fresh ``spawn`` process that opens the same space and storage and runs the same loop as a
single ``dmo study`` (:func:`dmo.search.trials.run_study`), with its own sampler seed (``seed + index``). Workers
coordinate only through the Optuna storage and the results folder, exactly as workers on different hosts do
(see ``scripts/slurm/``). The parent creates the study first (so a grid is enqueued once, by it), shows the
study's progress, reports a worker that crashes while the others go on, and returns the study's summary.
A crashed worker's running trial goes back to the queue after the heartbeat grace period (at once when its
process is gone from this host) and is run by another worker.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from rich.console import Console

from dmo.config import SearchSpace
from dmo.errors import DmoError
from dmo.paths import results_dir
from dmo.progress import progress_bar
from dmo.scoring.base import Scorer
from dmo.search.storage import Heartbeat
from dmo.search.study import StudyResult, open_study, study_paths, summarize, worker_index_from_env
from dmo.search.tradeoffs import resolve_thresholds
from dmo.search.trials import ScoreObjective, preflight, proxy_target, run_study

__all__ = ["WorkerSpec", "run_workers"]

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker process needs; pickled to it, so it holds no live objects."""

    space: SearchSpace
    storage: str
    study_name: str
    n_trials: int | None
    results: str  # absolute results root, so a worker's relative paths cannot drift
    #: builds the worker's own scorer from the space; a module-level function, pickled by name
    open_scorer: Callable[[SearchSpace], Scorer]
    batch: int = 1
    #: builds the trials' objective from the space and the worker's scorer (None: the space's aggregate); a
    #: module-level function, pickled by name, that rebuilds the parent's objective from the same inputs
    open_objective: Callable[[SearchSpace, Scorer], ScoreObjective | None] | None = None


@dataclass
class WorkerReport:
    index: int
    pid: int | None
    exitcode: int | None = None
    evaluated: int = 0
    error: str = ""

    def describe(self) -> str:
        code = self.exitcode
        if code is not None and code < 0:
            try:
                how = f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
        else:
            how = f"stopped with exit code {code}"
        return f"worker {self.index} (pid {self.pid}) {how}" + (f": {self.error}" if self.error else "")


def run_workers(
    space: SearchSpace,
    scorer: Scorer,
    n_workers: int,
    n_trials: int | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    progress: bool = True,
    console: Console | None = None,
    batch: int = 1,
    *,
    open_scorer: Callable[[SearchSpace], Scorer],
    open_objective: Callable[[SearchSpace, Scorer], ScoreObjective | None] | None = None,
) -> StudyResult:
    """Run the space's study in ``n_workers`` local processes; returns the study's summary.

    ``scorer`` is used here only to check the inputs before any process starts; every worker builds its own with
    ``open_scorer`` (e.g. :func:`dmo.session.scorer_for`), a module-level function so that it can be pickled.
    ``batch``: trials each worker runs at once (see :func:`dmo.search.trials.run_study`).
    ``open_objective``: builds the trials' objective (e.g. :func:`dmo.session.objective_for`); it runs here once
    first, so that a bad input stops the study before any worker starts, and again in every worker.
    """
    if n_workers < 1:
        raise DmoError(f"--workers must be at least 1, got {n_workers}")
    console = console or Console(stderr=True)
    paths = study_paths(space, storage, study_name)
    preflight(space, scorer, proxy_target(space))
    if open_objective is not None:
        open_objective(space, scorer)
    resolve_thresholds(space, scorer, paths.table)  # a constraint's reference that cannot be scored stops us here
    hb = Heartbeat.from_env()
    study = open_study(space, paths, heartbeat=hb)  # creates the study and enqueues a grid, once, here
    spec = WorkerSpec(
        space,
        paths.storage,
        paths.study_name,
        n_trials,
        str(results_dir().resolve()),
        open_scorer,
        batch,
        open_objective,
    )
    # Under a scheduler that already numbers this process (DMO_WORKER_INDEX, e.g. one SLURM task running
    # --workers 4), number the workers after it, so that no two workers anywhere share a sampler seed.
    first = max(0, worker_index_from_env() or 0) * n_workers
    total = len(space.candidates()) if space.sampler.name == "grid" else (n_trials or space.sampler.n_trials)

    ctx = mp.get_context("spawn")
    messages: Any = ctx.Queue()
    procs = [
        ctx.Process(target=worker_main, args=(spec, first + i, messages), name=f"dmo-worker-{i}")
        for i in range(n_workers)
    ]
    reports: dict[int, WorkerReport] = {}
    try:
        for i, p in enumerate(procs):
            p.start()
            reports[first + i] = WorkerReport(first + i, p.pid)
        bar = progress_bar("{task.fields[note]}", console=console, enabled=progress)
        with bar:
            task = bar.add_task(f"study {paths.study_name} ({n_workers} workers)", total=total, note="")
            done: set[int] = set()
            while len(done) < len(procs):
                _drain(messages, reports)
                for i, p in enumerate(procs):
                    if i not in done and p.exitcode is not None:
                        done.add(i)
                        _drain(messages, reports)
                        report = reports[first + i]
                        report.exitcode = p.exitcode
                        if p.exitcode != 0:
                            again = "; its running trial is queued again" if p.exitcode < 0 else ""
                            console.print(
                                f"[bold yellow]warning:[/] {report.describe()}; the other workers go on{again}",
                                highlight=False,
                                soft_wrap=True,
                            )
                finished = len(study.get_trials(deepcopy=False, states=FINISHED))
                alive = len(procs) - len(done)
                bar.update(task, completed=min(finished, total), note=f"{alive} running")
                if len(done) < len(procs):
                    time.sleep(0.3)
    except BaseException:
        for p in procs:
            if p.is_alive():
                p.terminate()  # like a dead worker: its trial is retried by the next run
        for p in procs:
            p.join(timeout=10)
        raise
    for p in procs:
        p.join()
    _drain(messages, reports)

    failed = [r for r in reports.values() if r.exitcode != 0]
    result = summarize(study, sum(r.evaluated for r in reports.values()))
    if failed and len(failed) == len(procs):
        finished = len(study.get_trials(deepcopy=False, states=FINISHED))
        raise DmoError(
            f"all {len(procs)} workers of study {paths.study_name!r} stopped ({finished} of {total} trials "
            f"finished); first: {failed[0].describe()}; fix the cause and run the same command to resume"
        )
    return result


def _drain(messages: Any, reports: dict[int, WorkerReport]) -> None:
    while True:
        try:
            kind, index, evaluated, text = messages.get_nowait()
        except (queue_mod.Empty, EOFError, OSError):
            return
        report = reports.setdefault(index, WorkerReport(index, None))
        report.evaluated += evaluated
        if kind == "error":
            report.error = text


def worker_main(spec: WorkerSpec, index: int, messages: Any) -> None:
    """Body of one worker process: open the space, then run the shared study loop."""
    os.environ["DMO_RESULTS"] = spec.results
    if os.environ.get("DMO_WORKER_NAME"):  # a name given to the whole group: tell its workers apart
        os.environ["DMO_WORKER_NAME"] = f"{os.environ['DMO_WORKER_NAME']}.w{index}"
    err = Console(stderr=True)
    try:
        scorer = spec.open_scorer(spec.space)
        objective = spec.open_objective(spec.space, scorer) if spec.open_objective is not None else None
        paths = study_paths(spec.space, spec.storage, spec.study_name, root=Path(spec.results))
        result = run_study(
            spec.space, scorer, paths, n_trials=spec.n_trials, progress=False, worker_index=index, batch=spec.batch,
            objective=objective,
        )  # fmt: skip
        messages.put(("done", index, result.evaluated, ""))
    except DmoError as exc:
        messages.put(("error", index, 0, str(exc)))
        err.print(f"[bold red]error:[/] worker {index}: {exc}", highlight=False, soft_wrap=True)
        _exit(messages, 2)
    except KeyboardInterrupt:
        messages.put(("error", index, 0, "interrupted"))
        _exit(messages, 130)
    except BaseException as exc:  # a bug: the traceback is what the user must send
        messages.put(("error", index, 0, f"{type(exc).__name__}: {exc}"))
        traceback.print_exc()
        _exit(messages, 1)


def _exit(messages: Any, code: int) -> None:
    messages.close()
    messages.join_thread()  # the parent must get the message before the process is gone
    sys.exit(code)
