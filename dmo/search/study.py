"""Optuna studies over mixture weights, run by one process or by many workers sharing one storage.

One trial = one mixture = one proxy scored on the space's benchmarks. The simplex is searched through the
stick-breaking box of :mod:`dmo.search.simplex`; a ``grid`` study instead enqueues the space's candidate list once.
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

import hashlib
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.exceptions import DuplicatedStudyError
from optuna.trial import FrozenTrial, TrialState

from dmo.config import SearchSpace
from dmo.errors import DmoError
from dmo.mixture import Mixture
from dmo.pareto import non_dominated
from dmo.paths import SpaceFolder, safe_name
from dmo.results import ResultsTable
from dmo.search.samplers import make_sampler
from dmo.search.simplex import from_box, param_names, to_box
from dmo.search.storage import Heartbeat, make_storage, redact, storage_errors
from dmo.search.tradeoffs import (
    FEASIBLE_ATTR,
    OBJECTIVES_ATTR,
    STUDY_CONSTRAINTS_ATTR,
    is_feasible,
    is_tradeoff_study,
    record_tradeoffs,
    sampler_constraints,
    study_directions,
)

__all__ = [
    "FIT_ATTR",
    "MIXTURE_ATTR",
    "PROXY_VALUE_ATTR",
    "FrontTrial",
    "StudyPaths",
    "StudyResult",
    "Tradeoffs",
    "enqueue_candidates",
    "open_study",
    "space_hash",
    "study_paths",
    "summarize",
    "summarize_tradeoffs",
    "trial_mixture",
    "worker_index_from_env",
    "worker_seed",
]

MIXTURE_ATTR = "mixture"
#: Trial user attribute: which worker ran the trial (``DMO_WORKER_NAME``, else ``local:HOST:PIDNS:PID``).
WORKER_ATTR = "worker"
#: Trial user attribute: the trial lost the race for a budget slot or a grid candidate; failed, never scored.
SURPLUS_ATTR = "dmo_surplus"
#: Trial user attribute: the objective raised (a bad input, Ctrl-C); its slot is given back, it is not retried.
ABORTED_ATTR = "dmo_aborted"
#: Trial user attribute: the trial waited for another worker that was scoring the same proxy.
CLAIM_WAIT_ATTR = "dmo_waited_for_claim"
#: Trial user attribute: the space's plain aggregate of the proxy's scores, where the objective is calibrated.
PROXY_VALUE_ATTR = "dmo_proxy_value"
#: Study user attributes: the creator sets ``dmo_init`` first and ``dmo_ready`` once the grid is enqueued.
INIT_ATTR = "dmo_init"
#: Trial user attribute: what the calibrated objective that valued the trial was fitted on.
FIT_ATTR = "dmo_objective_fit"
READY_ATTR = "dmo_ready"

log = logging.getLogger("dmo.study")


def space_hash(space: SearchSpace) -> str:
    """What a study's results depend on; the sampler and the trial count may change between runs."""
    # the pruner and the stage schedule decide how much of a proxy is scored, not what a full score is
    relevant = space.model_dump(mode="json", exclude={"sampler", "name", "pruner"})
    relevant["scoring"].pop("stages", None)
    if relevant["objective"].get("calibrate") is None:  # spaces from before calibration keep their studies
        relevant["objective"].pop("calibrate", None)
    if relevant["objective"].get("pareto") is None:  # and spaces from before multi-objective studies and constraints
        relevant["objective"].pop("pareto", None)
    if not relevant.get("constraints"):
        relevant.pop("constraints", None)
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
    folder = SpaceFolder.for_space(space.name, root)
    name = safe_name(study_name or f"{space.name}.{space.sampler.name}", "study name")
    return StudyPaths(folder.root, storage or folder.study_url, name, ResultsTable(folder.scores))


def open_study(
    space: SearchSpace,
    paths: StudyPaths,
    worker_index: int | None = None,
    heartbeat: Heartbeat | None = None,
    threads: bool = False,
    pruner: optuna.pruners.BasePruner | None = None,
) -> optuna.Study:
    """Create the study, or join it once its creator has set it up, if it was made for the same space.

    Exactly one process creates a study (creation is atomic in every storage); it records the space and, for a
    grid, enqueues the candidates, then marks the study ready. Everyone else waits for that mark.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    hb = heartbeat or Heartbeat.from_env()
    storage = make_storage(paths.storage, hb, threads)
    with storage_errors(paths.storage):
        try:
            storage.create_new_study(study_directions(space), paths.study_name)
            created = True
        except DuplicatedStudyError:
            created = False
        seed = worker_seed(space.sampler.seed, worker_index, created)
        sampler = make_sampler(space.sampler.name, seed, space.sampler.params, sampler_constraints(space))
        study = optuna.load_study(study_name=paths.study_name, storage=storage, sampler=sampler, pruner=pruner)
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
        worker_index = worker_index_from_env()
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
        record_tradeoffs(study, space)
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


@dataclass
class StudyResult:
    study: optuna.Study
    best: Mixture | None
    best_value: float | None
    best_scores: dict[str, float]
    evaluated: int
    #: a multi-objective or constrained study (:func:`summarize_tradeoffs`): its front, feasibility and constraints
    tradeoffs: Tradeoffs | None = None


@dataclass
class FrontTrial:
    """A non-dominated feasible trial of a multi-objective study."""

    number: int
    mixture: Mixture
    values: list[float]
    scores: dict[str, float]


@dataclass
class Tradeoffs:
    objectives: list[str]
    #: the non-dominated feasible trials of a multi-objective study, best first on the first objective
    front: list[FrontTrial] = field(default_factory=list)
    #: the constraints as recorded by the study's creator (e.g. ``dmo_tiny_ocr >= 0.4100 (base + 0.02)``)
    constraints: list[str] = field(default_factory=list)
    feasible: int = 0
    infeasible: int = 0

    @property
    def note(self) -> str:
        """What a user must know about feasibility, or an empty string."""
        if not self.constraints or self.feasible + self.infeasible == 0:
            return ""
        if self.feasible == 0:
            return f"no trial is feasible: all {self.infeasible} completed trials violate a constraint"
        return f"{self.feasible} feasible trial(s), {self.infeasible} infeasible (kept, marked {FEASIBLE_ATTR}=False)"


def summarize_tradeoffs(study: optuna.Study, evaluated: int = 0) -> StudyResult:
    """The summary of a multi-objective or constrained study: only feasible trials can be best or on the front."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    domains = study.user_attrs.get("domains")
    names = list(study.user_attrs.get(OBJECTIVES_ATTR) or ["objective"])
    constraints = list(study.user_attrs.get(STUDY_CONSTRAINTS_ATTR) or [])
    ok = [t for t in complete if is_feasible(t)]
    out = Tradeoffs(names, constraints=constraints, feasible=len(ok), infeasible=len(complete) - len(ok))

    def scores(t: FrozenTrial) -> dict[str, float]:
        return {k.removeprefix("score:"): v for k, v in t.user_attrs.items() if k.startswith("score:")}

    if not ok:
        return StudyResult(study, None, None, {}, evaluated, out)
    if len(study.directions) > 1:
        values = np.array([t.values for t in ok], float)
        front = [ok[i] for i in np.flatnonzero(non_dominated(values))]
        front.sort(key=lambda t: (-t.values[0], t.number))
        out.front = [
            FrontTrial(t.number, Mixture.parse(t.user_attrs[MIXTURE_ATTR], domains), list(t.values), scores(t))
            for t in front
        ]
        return StudyResult(study, None, None, {}, evaluated, out)
    best = max(ok, key=lambda t: (t.values[0], -t.number))
    mixture = Mixture.parse(best.user_attrs[MIXTURE_ATTR], domains)
    return StudyResult(study, mixture, best.values[0], scores(best), evaluated, out)


def summarize(study: optuna.Study, evaluated: int = 0) -> StudyResult:
    if is_tradeoff_study(study):
        return summarize_tradeoffs(study, evaluated)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return StudyResult(study, None, None, {}, evaluated)
    best = max(complete, key=lambda t: t.value if t.value is not None else float("-inf"))
    domains = study.user_attrs.get("domains")
    mixture = Mixture.parse(best.user_attrs[MIXTURE_ATTR], domains)
    scores = {k.removeprefix("score:"): v for k, v in best.user_attrs.items() if k.startswith("score:")}
    return StudyResult(study, mixture, best.value, scores, evaluated)


def worker_index_from_env() -> int | None:
    """``DMO_WORKER_INDEX``: this process's number under a scheduler (a SLURM array task), if it has one."""
    text = os.environ.get("DMO_WORKER_INDEX", "").strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise DmoError(f"DMO_WORKER_INDEX={text!r} must be a whole number") from None
