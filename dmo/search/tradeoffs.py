"""Multi-objective and constrained studies: what the study records beyond one maximised value.

A space with ``objective: {pareto: [...]}`` makes a study with one maximised direction per entry; a trial's values
are the entries' scores (:meth:`dmo.config.ObjectiveSpec.values`). A space with ``constraints`` resolves each
threshold once per process (:func:`resolve_thresholds`: the base's and the experts' scores, through the results
table), and every trial records its violations (threshold - score, per constraint; feasible when none is positive)
and whether it is feasible. Infeasible trials stay in the study, complete, with their values, and the study's summary
picks its best trial, or its front, among the feasible ones only (:func:`dmo.search.study.summarize_tradeoffs`).

The samplers that model constraints (TPE, GP, NSGA-II) learn them from Optuna: from Optuna 5 on, each trial sets its
violations with ``Trial.set_constraint`` and the samplers read them from the trial (Optuna 5 deprecates
``constraints_func``); on Optuna 4 the sampler gets a ``constraints_func`` (:func:`sampler_constraints`) that reads the
violations the trial recorded (:func:`trial_constraints`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial

from dmo.config import SearchSpace
from dmo.errors import DmoError
from dmo.mixture import Mixture
from dmo.results import ResultsTable
from dmo.scoring.base import Scorer, Target, score_targets

__all__ = [
    "CONSTRAINED_ATTR",
    "FEASIBLE_ATTR",
    "OBJECTIVES_ATTR",
    "STUDY_CONSTRAINTS_ATTR",
    "VIOLATIONS_ATTR",
    "Threshold",
    "is_feasible",
    "is_tradeoff_study",
    "objective_values",
    "progress_note",
    "record_constraints",
    "record_thresholds",
    "record_tradeoffs",
    "resolve_thresholds",
    "sampler_constraints",
    "study_directions",
    "trial_constraints",
]

#: Study user attribute: the objectives' names of a multi-objective study, in the order of its values.
OBJECTIVES_ATTR = "objectives"
#: Study user attribute: the space's constraints as written (``dmo_tiny_ocr >= base + 0.02``).
CONSTRAINED_ATTR = "dmo_constrained"
#: Study user attribute: the constraints with their thresholds resolved (``dmo_tiny_ocr >= 0.4100 (base + 0.02)``).
STUDY_CONSTRAINTS_ATTR = "dmo_thresholds"
#: Trial user attribute: per constraint, threshold - score (Optuna's convention: feasible when <= 0).
VIOLATIONS_ATTR = "dmo_violations"
#: Trial user attribute: whether the trial meets every constraint.
FEASIBLE_ATTR = "dmo_feasible"
#: Optuna >= 5: a trial's constraints are set on the trial and every sampler reads them there.
SET_ON_TRIAL = hasattr(optuna.trial.Trial, "set_constraint")


@dataclass(frozen=True)
class Threshold:
    """One constraint, resolved: the proxy must score at least ``minimum`` on ``benchmark``."""

    benchmark: str
    minimum: float
    given: str  # the space's ``min``, as written

    @property
    def label(self) -> str:
        how = "" if _is_number(self.given) else f" ({self.given})"
        return f"{self.benchmark} >= {self.minimum:.4f}{how}"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def study_directions(space: SearchSpace) -> list[StudyDirection]:
    """One maximised direction per objective (dmo's scores are higher-is-better)."""
    n = len(space.objective.pareto) if space.objective.pareto is not None else 1
    return [StudyDirection.MAXIMIZE] * n


def record_tradeoffs(study: optuna.Study, space: SearchSpace) -> None:
    """What the study's creator writes down besides the space: its objectives' names and its constraints."""
    if space.objective.pareto is not None:
        study.set_user_attr(OBJECTIVES_ATTR, space.objective.objective_names())
    if space.constraints:
        study.set_user_attr(CONSTRAINED_ATTR, [f"{c.benchmark} >= {c.min}" for c in space.constraints])


def record_thresholds(study: optuna.Study, thresholds: Sequence[Threshold]) -> None:
    """The resolved thresholds, once (every process resolves the same ones from the same results table)."""
    labels = [t.label for t in thresholds]
    if thresholds and study.user_attrs.get(STUDY_CONSTRAINTS_ATTR) != labels:
        study.set_user_attr(STUDY_CONSTRAINTS_ATTR, labels)


def is_tradeoff_study(study: optuna.Study) -> bool:
    return len(study.directions) > 1 or bool(study.user_attrs.get(CONSTRAINED_ATTR))


def is_feasible(trial: FrozenTrial) -> bool:
    """Whether a trial met every constraint (a trial of an unconstrained study always has)."""
    return bool(trial.user_attrs.get(FEASIBLE_ATTR, True))


def resolve_thresholds(space: SearchSpace, scorer: Scorer, table: ResultsTable) -> list[Threshold]:
    """Each constraint's absolute threshold; the base and the experts it refers to are scored through the results
    table (once: later calls, and other workers, read them). Refuses, in one line, a reference that cannot be scored."""
    if not space.constraints:
        return []
    need_base = any(c.reference()[0] == "base" for c in space.constraints)
    need_experts = any(c.reference()[0] == "expert" for c in space.constraints)
    benches = sorted({c.benchmark for c in space.constraints if c.reference()[0] != "absolute"})
    targets = ([Target("base")] if need_base else []) + (
        [Target("expert", domain=d) for d in space.domains] if need_experts else []
    )
    results = score_targets(scorer, table, targets, benches, group=space.name or "") if targets else []
    base: dict[str, float] | None = None
    experts: dict[str, dict[str, float]] = {}
    for target, (scores, errors) in zip(targets, results):
        if errors:
            b, why = next(iter(errors.items()))
            raise DmoError(f"constraints: the {target.label} model could not be scored on {b} ({why})")
        if target.kind == "base":
            base = scores
        else:
            assert target.domain is not None
            experts[target.domain] = scores
    return [Threshold(c.benchmark, c.threshold(base, experts), str(c.min)) for c in space.constraints]


def record_constraints(trial: optuna.Trial, thresholds: Sequence[Threshold], scores: dict[str, float]) -> bool:
    """Write a scored trial's violations and feasibility on it; returns whether it is feasible."""
    violations = [t.minimum - scores[t.benchmark] for t in thresholds]
    feasible = all(v <= 0 for v in violations)
    trial.set_user_attr(VIOLATIONS_ATTR, violations)
    trial.set_user_attr(FEASIBLE_ATTR, feasible)
    if SET_ON_TRIAL:
        for i, (t, v) in enumerate(zip(thresholds, violations)):
            trial.set_constraint(f"{i}:{t.benchmark}", v)
    return feasible


def trial_constraints(trial: FrozenTrial, n: int) -> list[float]:
    """Optuna's ``constraints_func``: the violations a trial recorded; a trial pruned before it was scored on every
    benchmark counts as violating each constraint."""
    got = trial.user_attrs.get(VIOLATIONS_ATTR)
    return [float(v) for v in got] if got is not None and len(got) == n else [1.0] * n


def sampler_constraints(space: SearchSpace) -> Callable[[FrozenTrial], Sequence[float]] | None:
    """The ``constraints_func`` of the space's sampler (None: unconstrained, or Optuna >= 5, where the trial sets its
    constraints itself)."""
    if not space.constraints or SET_ON_TRIAL:
        return None
    return functools.partial(trial_constraints, n=len(space.constraints))


def objective_values(space: SearchSpace, mixture: Mixture, scores: dict[str, float]) -> list[float]:
    """A multi-objective trial's values, all finite."""
    values = space.objective.values(scores)
    if not all(math.isfinite(v) for v in values):
        raise DmoError(f"mixture {mixture.id} scored {scores}: the objectives are {values}, not all finite numbers")
    return values


def progress_note(study: optuna.Study) -> str:
    """The progress bar's note: the best feasible value, or the size of the feasible front."""
    done = [
        t
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if is_feasible(t) and t.values is not None
    ]
    if not done:
        return ""
    if len(study.directions) > 1:
        from dmo.pareto import non_dominated

        return f"front {int(non_dominated(np.array([t.values for t in done], float)).sum())}"
    return f"best {max(t.values[0] for t in done):.4f}"
