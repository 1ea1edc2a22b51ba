"""Stagewise trials: score a proxy on growing prefixes of each benchmark's item order, and stop it when a pruner says
it will not beat the best one.

A space with ``scoring: {stages: [0.125, 0.25, 0.5, 1]}`` (or a ``pruner`` and the default schedule) scores each
trial's proxy in stages over the fixed item order of :mod:`dmo.scoring.items`. After each stage but the last the trial
reports to Optuna and asks :meth:`optuna.Trial.should_prune`:

* ``wilcoxon`` (:class:`optuna.pruners.WilcoxonPruner`): one report per block of consecutive items of the order
  (``pruner.params.block`` items; default: a benchmark's items / 50, at least 1, so a trial writes about 50 reports a
  benchmark to the storage), the step being the block's place in the study's list of blocks, so that the test pairs
  the trial's blocks with the best trial's scores on the same items. Item values are weighted so that a fully scored
  trial's mean report is its objective;
* ``successive_halving``, ``hyperband``, ``median``: one report per stage, the objective of the stage's partial
  scores at step = items scored so far;
* ``none``: never stops a proxy (the stages only save work when a proxy is promoted later).

A pruned trial is an Optuna ``PRUNED`` trial: its partial scores are kept (trial attributes ``partial:<benchmark>``
and ``dmo_items``, partial rows in the results table, its items in the item table), and its value, which samplers that
consider pruned trials read, is the objective of its partial scores. ``dmo rescore`` scores pruned proxies in full
later, continuing from their last item. A trial that completes is scored on every item, so the study's best trial
always holds a full score.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import optuna

from dmo.errors import DmoError
from dmo.scoring.items import ItemScores, prefix_sizes

if TYPE_CHECKING:
    from dmo.config import SearchSpace
    from dmo.scoring.base import Target

__all__ = [
    "DEFAULT_STAGES",
    "ITEMS_ATTR",
    "PARTIAL_ATTR",
    "PARTIAL_STEP",
    "PRUNERS",
    "StagePruned",
    "StagedScoring",
    "check_pruner_compatible",
    "check_stages",
    "make_pruner",
    "pruner_names",
    "stages_of",
]

#: The schedule of a space that names a pruner but no ``scoring.stages`` (chosen by benchmarks/adaptive_scoring.py).
DEFAULT_STAGES: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0)
#: Trial user attribute: items scored per benchmark (of a pruned trial: fewer than the benchmark has).
ITEMS_ATTR = "dmo_items"
#: Trial user attribute prefix: a pruned trial's partial score (the mean of its scored items) per benchmark.
PARTIAL_ATTR = "partial:"
#: The step of a pruned ``wilcoxon`` trial's last report: the objective of its partial scores. Beyond every item's
#: step, so it is the trial's value (Optuna values a pruned trial by its last step) and is paired with nothing.
PARTIAL_STEP = 2**31 - 1

#: ``wilcoxon`` reports about this many blocks of items per benchmark unless ``pruner.params.block`` says otherwise:
#: every report is a write to the study's storage (milliseconds each on SQLite).
REPORTS_PER_BENCHMARK = 50

#: name -> what the pruner reports (``items``: per item or block; ``stages``: per stage)
PRUNERS: dict[str, str] = {
    "none": "stages",
    "wilcoxon": "items",
    "successive_halving": "stages",
    "hyperband": "stages",
    "median": "stages",
}


def pruner_names() -> list[str]:
    return list(PRUNERS)


def check_stages(stages: Sequence[float]) -> list[float]:
    """A stage schedule: fractions of the items in (0, 1], strictly increasing, the last one 1 (a trial that is not
    pruned ends fully scored)."""
    out = [float(f) for f in stages]
    if not out:
        raise DmoError("scoring.stages is empty: give fractions of the items such as [0.25, 1], or leave it out")
    bad = [f for f in out if not (0 < f <= 1) or math.isnan(f)]
    if bad:
        raise DmoError(f"scoring.stages has {bad[0]}: each stage is a fraction of the items in (0, 1]")
    for a, b in itertools.pairwise(out):
        if b <= a:
            raise DmoError(
                f"scoring.stages {out} is not increasing ({a} then {b}): list growing fractions, e.g. [0.25, 1]"
            )
    if out[-1] != 1:
        raise DmoError(f"scoring.stages {out} ends at {out[-1]}: the last stage must be 1 (every item)")
    return out


def is_multi_objective(space: SearchSpace) -> bool:
    """Whether the space's study has several objectives (``objective: {pareto: [...]}``, where config has it)."""
    return bool(getattr(space.objective, "pareto", None))


def check_pruner_compatible(space: SearchSpace) -> None:
    """Refuse, in one line, a pruner that cannot work with the space's study: Optuna prunes single-objective
    studies only, and the Wilcoxon test pairs items, whose mean a calibrated objective is not."""
    name = space.pruner.name
    if name == "none":
        return
    if is_multi_objective(space):
        raise DmoError(
            f"pruner {name!r} cannot stop trials of a multi-objective study (Optuna prunes single-objective studies "
            "only): set 'pruner: none', or optimise one objective"
        )
    if name == "wilcoxon" and space.objective.calibrate is not None:
        raise DmoError(
            "pruner 'wilcoxon' compares items, but a calibrated objective is not a mean of items: use "
            "successive_halving, hyperband or median, or drop objective.calibrate"
        )
    block = space.pruner.params.get("block")
    if block is not None and (name != "wilcoxon" or isinstance(block, bool) or not isinstance(block, int) or block < 1):
        raise DmoError(
            f"pruner.params.block is {block!r}: the items one wilcoxon report covers, a whole number >= 1 (other "
            "pruners report once a stage)"
        )
    _make(name, dict(space.pruner.params), {"b": 100}, list(stages_of(space) or DEFAULT_STAGES))


def stages_of(space: SearchSpace) -> list[float] | None:
    """The space's stage schedule: ``scoring.stages``, else the default one when it names a pruner, else None."""
    if space.scoring.stages is not None:
        return list(space.scoring.stages)
    return list(DEFAULT_STAGES) if space.pruner.name != "none" else None


def make_pruner(space: SearchSpace, totals: Mapping[str, int]) -> optuna.pruners.BasePruner:
    """The space's Optuna pruner for benchmarks of ``totals`` items each."""
    return _make(space.pruner.name, dict(space.pruner.params), totals, list(stages_of(space) or DEFAULT_STAGES))


def _stage_steps(totals: Mapping[str, int], stages: Sequence[float]) -> list[int]:
    return [sum(prefix_sizes(f, totals).values()) for f in stages]


def _make(
    name: str, params: dict[str, Any], totals: Mapping[str, int], stages: Sequence[float]
) -> optuna.pruners.BasePruner:
    from optuna import pruners

    params.pop("block", None)  # dmo's own parameter of wilcoxon, not Optuna's
    steps = _stage_steps(totals, stages)
    try:
        if name == "none":
            return pruners.NopPruner(**params)
        if name == "wilcoxon":
            from dmo.search.optuna_private import quiet_experimental

            with quiet_experimental():
                return pruners.WilcoxonPruner(**params)
        if name == "successive_halving":
            rate = max(2, round(steps[1] / steps[0])) if len(steps) > 1 else 4
            return pruners.SuccessiveHalvingPruner(**{"min_resource": steps[0], "reduction_factor": rate, **params})
        if name == "hyperband":
            defaults = {"min_resource": steps[0], "max_resource": steps[-1], "reduction_factor": 3}
            return pruners.HyperbandPruner(**{**defaults, **params})
        if name == "median":
            return pruners.MedianPruner(**params)
    except (TypeError, ValueError) as exc:
        raise DmoError(f"pruner {name!r}: {str(exc).splitlines()[0]} (check pruner.params)") from None
    raise DmoError(f"unknown pruner {name!r}: choose one of {', '.join(pruner_names())}")


def item_weights(space: SearchSpace, totals: Mapping[str, int]) -> dict[str, float]:
    """Per benchmark, the factor of an item's score in a ``wilcoxon`` report: the reports of a fully scored trial
    then average to its objective (a mean, or a weighted mean, of the benchmarks' item means). For ``min`` the items
    count as for a mean."""
    benches = list(totals)
    objective = space.objective
    if objective.aggregate == "weighted":
        total = sum(objective.weights.get(b, 0.0) for b in benches)
        share = {b: objective.weights.get(b, 0.0) / total for b in benches}
    else:
        share = {b: 1 / len(benches) for b in benches}
    m = sum(totals.values())
    return {b: share[b] * m / totals[b] for b in benches}


class StagePruned(optuna.TrialPruned):
    """A trial stopped after a stage, with the scores of the items it was scored on."""

    def __init__(self, message: str, result: ItemScores) -> None:
        super().__init__(message)
        self.result = result


@dataclass
class StagedScoring:
    """Runs one trial's stages: score, report, ask the pruner; what :mod:`dmo.search.trials` calls for a staged space
    (and ``benchmarks/adaptive_scoring.py`` against recorded items)."""

    stages: list[float]
    totals: dict[str, int]
    orders: dict[str, list[int]]
    pruner: str
    objective: Callable[[dict[str, float]], float]
    #: wilcoxon: factor of each benchmark's item scores (:func:`item_weights`) and items per report
    weights: dict[str, float] = field(default_factory=dict)
    #: wilcoxon: items per report, per benchmark
    blocks: dict[str, int] = field(default_factory=dict)

    @classmethod
    def for_space(
        cls, space: SearchSpace, orders: Mapping[str, list[int]], objective: Callable[[dict[str, float]], float]
    ) -> StagedScoring:
        stages = stages_of(space)
        assert stages is not None
        totals = {b: len(orders[b]) for b in space.benchmarks}
        block = space.pruner.params.get("block")  # checked with the space (check_pruner_compatible)
        blocks = {b: block or max(1, math.ceil(n / REPORTS_PER_BENCHMARK)) for b, n in totals.items()}
        return cls(
            stages, totals, {b: list(orders[b]) for b in space.benchmarks}, space.pruner.name, objective,
            item_weights(space, totals), blocks,
        )  # fmt: skip

    def run(
        self,
        trial: optuna.Trial,
        target: Target,
        score: Callable[[Target, dict[str, int]], ItemScores],
        objective: Callable[[dict[str, float]], float] | None = None,
    ) -> ItemScores:
        """The trial's scores once it is complete (every item), or :class:`StagePruned` after the stage the pruner
        stopped it at; a stage whose benchmarks fail ends the stages with their errors. ``objective``: what a stage
        reports, for this trial (default: the one given at construction)."""
        value = objective or self.objective
        reported: set[int] = set()
        result: ItemScores | None = None
        for k, fraction in enumerate(self.stages):
            result = score(target, prefix_sizes(fraction, self.totals))
            if result.errors:
                return result
            if result.known and len(result.known) == len(self.totals):
                return result  # scored in full before, without stages: nothing to report, nothing to prune
            self.report(trial, result, reported, value)
            if result.complete:
                return result
            if k < len(self.stages) - 1 and trial.should_prune():
                if self.pruner == "wilcoxon":
                    trial.report(value(result.means), PARTIAL_STEP)
                covered = result.covered()
                raise StagePruned(f"pruned after {sum(covered.values())} items: {covered}", result)
        assert result is not None
        return result

    def report(
        self, trial: optuna.Trial, result: ItemScores, reported: set[int], value: Callable[[dict[str, float]], float]
    ) -> None:
        if PRUNERS[self.pruner] == "stages":
            step = sum(result.covered().values())
            if step not in reported:
                trial.report(value(result.means), step)
                reported.add(step)
            return
        offset = 0
        for b, n in self.totals.items():  # the space's order of benchmarks: a step names one item in every trial
            values, w, block = result.values[b], self.weights[b], self.blocks.get(b, 1)
            for start in range(0, len(values), block):
                chunk = values[start : start + block]
                step = offset + start // block
                # a block is reported once whole (or at the end of the benchmark), so its value never changes
                if step in reported or (len(chunk) < block and start + len(chunk) < n):
                    continue
                trial.report(w * sum(chunk) / len(chunk), step)
                reported.add(step)
            offset += math.ceil(n / block)
