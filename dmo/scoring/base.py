"""What gets scored, the interface every scoring backend implements, and cached scoring.

A :class:`Target` names one model to evaluate: the base, one expert, a model trained on a mixture, or a
merged proxy of a mixture. A :class:`Scorer` turns a target into benchmark scores; backends (``hf``,
``vllm``, ``replay``) are named in the :data:`SCORERS` registry. :func:`score_target` puts the results table in front of
any scorer, so a score that is already known is never computed again, in this process or any other.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dmo.errors import DmoError
from dmo.mixture import Mixture
from dmo.plugins import PluginRegistry
from dmo.results import Kind, ResultsTable, ScoreRow, cache_key


@dataclass(frozen=True)
class Target:
    kind: Kind
    mixture: Mixture | None = None
    domain: str | None = None
    seed: int | None = None
    method: str = ""
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        if self.kind == "base":
            return "base"
        if self.kind == "expert":
            assert self.domain is not None
            return self.domain
        assert self.mixture is not None
        return self.mixture.id

    @property
    def weights(self) -> dict[str, float]:
        return self.mixture.as_dict() if self.mixture is not None else {}


@dataclass
class Evaluation:
    """A backend's answer for one target: scores per benchmark, and errors for those that failed."""

    scores: dict[str, float]
    metrics: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


class Scorer(abc.ABC):
    """A scoring backend. Subclasses set ``name`` and implement the three abstract methods; the rest has defaults."""

    #: Short backend name recorded in every row's ``source``.
    name: str = ""
    #: How many targets one :meth:`evaluate_many` call scores together (``dmo study --batch`` may not exceed it).
    max_batch: int = 1
    #: Trials a study runs at once when ``--batch`` is not given.
    default_batch: int = 1

    @abc.abstractmethod
    def fingerprint(self, target: Target) -> str:
        """Identifies the model's weights: base, experts' contents, method, parameters and weights."""

    @abc.abstractmethod
    def settings(self) -> dict[str, Any]:
        """Everything besides the weights that changes a score (limit, generation settings, versions)."""

    @abc.abstractmethod
    def evaluate(self, target: Target, benchmarks: Sequence[str]) -> Evaluation: ...

    def benchmark_settings(self, benchmark: str) -> dict[str, Any]:
        """What else changes one benchmark's score (a ``loss:<domain>``'s validation data); ``{}`` leaves the cache
        key as ``settings()`` alone makes it."""
        return {}

    def check(self, benchmarks: Sequence[str]) -> None:  # noqa: B027 (a default that accepts everything)
        """Refuse, with a DmoError, benchmarks this backend cannot score (before any study opens)."""

    def evaluate_many(self, targets: Sequence[Target], benchmarks: Sequence[str]) -> list[Evaluation]:
        """Score several targets in one call; backends with ``max_batch > 1`` do better than this loop."""
        return [self.evaluate(t, benchmarks) for t in targets]

    def close(self) -> None:  # noqa: B027 (nothing to release by default)
        """Release engines and devices."""


SCORERS = PluginRegistry("dmo.scorers", "scoring backend")


def scorer_names() -> list[str]:
    return SCORERS.names()


def backend(name: str) -> Any:
    """The registry entry of a backend (:class:`dmo.scoring.backends.Backend`: its factory and options model)."""
    return SCORERS.get(name)


def make_scorer(name: str, **kwargs: Any) -> Scorer:
    entry = backend(name)
    try:
        factory = entry.load() if hasattr(entry, "load") else entry  # in-process registrations give the class
    except ModuleNotFoundError as exc:
        raise DmoError(f"scoring backend {name!r} needs {exc.name!r}: pip install 'dmo[{name}]'") from None
    return factory(**kwargs)


def score_target(
    scorer: Scorer,
    table: ResultsTable,
    target: Target,
    benchmarks: Sequence[str],
    group: str = "",
    on_evaluate: Callable[[Target], None] | None = None,
) -> tuple[dict[str, float], dict[str, str]]:
    """Scores of ``target`` on ``benchmarks``, from the table where known, else evaluated and recorded.

    Returns (scores, errors): a benchmark that failed is recorded as a failed row with its error and left
    out of ``scores``; the other benchmarks still count.
    """
    return score_targets(scorer, table, [target], benchmarks, group, on_evaluate)[0]


def score_targets(
    scorer: Scorer,
    table: ResultsTable,
    targets: Sequence[Target],
    benchmarks: Sequence[str],
    group: str = "",
    on_evaluate: Callable[[Target], None] | None = None,
) -> list[tuple[dict[str, float], dict[str, str]]]:
    """:func:`score_target` for several targets; a backend with ``evaluate_many`` scores the unknown ones together
    (the vllm backend generates for several LoRA-served proxies in one engine batch)."""
    settings = scorer.settings()
    extra = {b: scorer.benchmark_settings(b) for b in benchmarks}
    known = table.cached_keys()
    plans = []
    for target in targets:
        fp = scorer.fingerprint(target)
        keys = {b: cache_key(model=fp, benchmark=b, **settings, **extra[b]) for b in benchmarks}
        scores = {b: float(known[k]["score"]) for b, k in keys.items() if k in known}
        plans.append((target, fp, keys, scores, [b for b in benchmarks if b not in scores]))
    pending: dict[tuple[str, ...], list[int]] = {}
    for i, (_, _, _, _, todo) in enumerate(plans):
        if todo:
            pending.setdefault(tuple(todo), []).append(i)
    errors: list[dict[str, str]] = [{} for _ in targets]

    def record(i: int, todo: tuple[str, ...], result: Evaluation, seconds: float) -> None:
        target, fp, keys, scores, _ = plans[i]
        rows = []
        for b in todo:
            common: dict[str, Any] = dict(
                kind=target.kind, mixture=target.label, benchmark=b, weights=target.weights, group=group,
                method=target.method, seed=target.seed, source=scorer.name, fingerprint=fp, key=keys[b],
                seconds=seconds, metric=result.metrics.get(b, ""),
            )  # fmt: skip
            if b in result.scores:
                scores[b] = float(result.scores[b])
                rows.append(ScoreRow(score=scores[b], **common))
            else:
                errors[i][b] = result.errors.get(b, "no score returned")
                rows.append(ScoreRow(score=None, status="failed", error=errors[i][b], **common))
        table.append(rows)

    for todo, indices in pending.items():
        if scorer.max_batch > 1 and len(indices) > 1:
            for i in indices:
                if on_evaluate is not None:
                    on_evaluate(plans[i][0])
            t0 = time.perf_counter()
            results = scorer.evaluate_many([plans[i][0] for i in indices], list(todo))
            seconds = round((time.perf_counter() - t0) / len(indices), 3)
            for i, result in zip(indices, results):
                record(i, todo, result, seconds)
            continue
        for i in indices:  # one at a time, each recorded as soon as it is known
            if on_evaluate is not None:
                on_evaluate(plans[i][0])
            t0 = time.perf_counter()
            result = scorer.evaluate(plans[i][0], list(todo))
            record(i, todo, result, round(time.perf_counter() - t0, 3))
    return [({b: p[3][b] for b in benchmarks if b in p[3]}, errors[i]) for i, p in enumerate(plans)]
