"""Optuna studies over mixture weights.

One trial = one mixture = one proxy scored on the space's benchmarks. The simplex is searched through the
stick-breaking box of :mod:`dmo.simplex`; a ``grid`` study instead enqueues the space's candidate list once.
Storage defaults to SQLite at ``results/<space>/study.db``; running the same command again resumes the
study (``n_trials`` is the total wanted, not an increment), and every score goes through the results table,
so a mixture already scored, by this study or another one on the same space, is never scored again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dmo.config import SearchSpace
from dmo.errors import DmoError
from dmo.mixture import Mixture
from dmo.paths import results_dir, safe_name
from dmo.results import ResultsTable
from dmo.samplers import make_sampler
from dmo.scorer import Scorer, Target, score_target
from dmo.simplex import from_box, param_names, to_box

MIXTURE_ATTR = "mixture"
# Heartbeats and the retry callback are "experimental" in Optuna; they are what makes dead workers recoverable.
warnings.filterwarnings("ignore", category=ExperimentalWarning)


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


def make_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage from a URL: ``sqlite:///``, ``postgresql://``..., or ``journal:PATH`` for a journal file.

    RDB storages get heartbeats, so a trial whose worker died is marked failed and retried once.
    """
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        path = Path(url.removeprefix("journal:"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    try:
        return optuna.storages.RDBStorage(
            url, heartbeat_interval=30, grace_period=120, heartbeat_stale_trial_callback=retry,
            engine_kwargs={"pool_pre_ping": True},
        )
    except Exception as exc:  # sqlalchemy raises many types; the user needs the URL and the reason
        raise DmoError(f"cannot open study storage {url}: {str(exc).splitlines()[0]}") from None


def open_study(space: SearchSpace, paths: StudyPaths) -> optuna.Study:
    """Create the study, or load it if it exists and was made for the same space."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = make_storage(paths.storage)
    sampler = make_sampler(space.sampler.name, space.sampler.seed, space.sampler.params)
    study = optuna.create_study(
        storage=storage, study_name=paths.study_name, sampler=sampler, direction="maximize", load_if_exists=True
    )
    want = space_hash(space)
    have = study.user_attrs.get("space_hash")
    if have is None:
        study.set_user_attr("space_hash", want)
        study.set_user_attr("domains", list(space.domains))
        study.set_user_attr("benchmarks", list(space.benchmarks))
    elif have != want:
        raise DmoError(
            f"study {paths.study_name!r} in {paths.storage} was made for a different search space "
            "(domains, candidates, merge, benchmarks, objective or scoring changed): "
            "pass a new --study-name, or restore the space file"
        )
    return study


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
    waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
    return len(waiting)


@dataclass
class StudyResult:
    study: optuna.Study
    best: Mixture | None
    best_value: float | None
    best_scores: dict[str, float]
    evaluated: int


def run_study(
    space: SearchSpace,
    scorer: Scorer,
    paths: StudyPaths,
    n_trials: int | None = None,
    progress: bool = True,
    proxy_target: Callable[[Mixture], Target] | None = None,
) -> StudyResult:
    """Run (or resume) the space's study until it holds ``n_trials`` finished trials."""
    if not space.benchmarks:
        raise DmoError(f"search space {space.name!r} lists no benchmarks: add 'benchmarks: [...]' to it")
    study = open_study(space, paths)
    params = tuple(sorted(space.merge.params.items()))
    make_target = proxy_target or (lambda m: Target("proxy", mixture=m, method=space.merge.method, params=params))
    evaluated = 0

    def count_evaluation(_: Target) -> None:
        nonlocal evaluated
        evaluated += 1

    def objective(trial: optuna.Trial) -> float:
        mixture = trial_mixture(trial, space.domains)
        trial.set_user_attr(MIXTURE_ATTR, mixture.id)
        scores, errors = score_target(
            scorer, paths.table, make_target(mixture), space.benchmarks, group=space.name or "",
            on_evaluate=count_evaluation,
        )
        for b, s in scores.items():
            trial.set_user_attr(f"score:{b}", s)
        if errors:
            trial.set_user_attr("errors", errors)
            raise optuna.TrialPruned(f"benchmarks failed: {', '.join(sorted(errors))}")
        return space.objective(scores)

    finished_states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    done = len(study.get_trials(deepcopy=False, states=finished_states))
    if space.sampler.name == "grid":
        todo = enqueue_candidates(study, space)
    else:
        todo = max(0, (n_trials or space.sampler.n_trials) - done)
    if todo:
        with _progress(progress, paths.study_name, todo) as bar:
            study.optimize(objective, n_trials=todo, callbacks=[bar], catch=())
    return summarize(study, evaluated)


def summarize(study: optuna.Study, evaluated: int = 0) -> StudyResult:
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
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
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("{task.fields[best]}"),
            )
            self.bar.start()
            self.task = self.bar.add_task(f"study {self.name}", total=self.total, best="")
        # Optuna logs one INFO line per trial; the bar replaces that.
        logging.getLogger("optuna").setLevel(logging.WARNING)
        return self

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if self.bar is None:
            return
        try:
            best = f"best {study.best_value:.4f}"
        except ValueError:
            best = ""
        self.bar.update(self.task, advance=1, best=best)

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()
