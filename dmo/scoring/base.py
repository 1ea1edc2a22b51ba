"""What gets scored, the contract every scoring backend implements, and cached scoring.

A :class:`Target` names one model to evaluate: the base, one expert, a model trained on a mixture, or a
merged proxy of a mixture. A :class:`Scorer` turns a target into benchmark scores. Backends (``hf``, ``vllm``,
``replay``, and those of other packages) are :class:`Backend` entries of the :data:`SCORERS` registry (entry point
group ``dmo.scorers``): the scorer class, and the pydantic model of its own options, which a space gives under the
backend's name (``scoring: {backend: NAME, NAME: {...}}``). :func:`make_scorer` validates those options and calls
:meth:`Scorer.from_context` with them and the :class:`ScoringContext` that every backend receives.
:func:`score_target` puts the results table in front of any scorer, so a score that is already known is never
computed again, in this process or any other.
"""

from __future__ import annotations

import abc
import importlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from dmo.configfile import Strict
from dmo.errors import DmoError
from dmo.mixture import Mixture
from dmo.plugins import PluginRegistry
from dmo.results import Kind, ResultsTable, ScoreRow, cache_key

if TYPE_CHECKING:
    from dmo.manifest import ExpertManifest
    from dmo.scoring.metrics import MetricSpec


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


@dataclass
class ItemEvaluation:
    """A backend's answer for some items of one target: each item's score (by its document id in the benchmark's
    evaluation split), per benchmark, and errors for the benchmarks that failed."""

    scores: dict[str, dict[int, float]]
    metrics: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


class TargetRefused(DmoError):
    """A backend cannot score this one target (a replay: it was not recorded); it may still score others."""


@dataclass(frozen=True)
class ScoringContext:
    """What every scoring backend is built with, from the space's ``scoring`` section and its experts; a backend
    uses what applies to it (a replay reads recorded scores and needs none of it)."""

    #: the base model and the experts (paths absolute; ``experts: NAME`` spaces resolved to their manifest)
    manifest: ExpertManifest
    #: lmms-eval task folders, earlier ones winning: the space's ``scoring.tasks`` and ``--tasks-dir``, then those
    #: of the expert source (the tiny world's); None: lmms-eval's and dmo's own tasks only
    include_path: Path | list[Path] | None = None
    #: ``scoring.limit`` (``--limit``): examples per benchmark; None: all of them
    limit: int | None = None
    #: ``scoring.batch_size``: examples per forward pass, for backends that batch in-process
    batch_size: int = 64
    #: ``scoring.device`` (``auto``, ``cpu``, ``cuda:0``): where an in-process model runs
    device: str = "auto"
    #: the space's own metric entries (``scoring.metrics``) over the shipped map; None: the shipped map. A backend
    #: that reads lmms-eval results scores with it, and refuses a benchmark without an entry in :meth:`Scorer.check`
    metric_map: Mapping[str, MetricSpec] | None = None


class BackendOptions(Strict):
    """A backend's own options, given in a space as ``scoring: {backend: NAME, NAME: {...}}``; subclass it with the
    backend's fields (this base has none). Unknown keys are refused. A field typed ``Path`` is resolved against the
    space file's folder when the space is loaded."""

    def resolve_paths(self, folder: Path) -> BackendOptions:
        """These options with every relative ``Path`` value made absolute against ``folder``."""
        update = {
            k: (folder / v.expanduser()).resolve()
            for k, v in self
            if isinstance(v, Path) and not v.expanduser().is_absolute()
        }
        return self.model_copy(update=update) if update else self


@dataclass(frozen=True)
class Backend:
    """A registry entry of a scoring backend (what an entry point of group ``dmo.scorers`` names, or what
    :meth:`dmo.plugins.PluginRegistry.register` is given): listing backends and validating their options imports
    none of them (they pull in torch, transformers, lmms-eval, vLLM)."""

    #: ``module:Class`` of the :class:`Scorer` subclass, imported only when a scorer is made
    scorer: str
    #: the model of the options the space gives under the backend's name
    options: type[BackendOptions] = BackendOptions

    def load(self) -> type[Scorer]:
        module, _, name = self.scorer.partition(":")
        cls = getattr(importlib.import_module(module), name)
        if not (isinstance(cls, type) and issubclass(cls, Scorer)):
            raise DmoError(f"{self.scorer} is not a dmo.scoring.base.Scorer subclass: fix the backend's entry point")
        return cls

    def validate(self, name: str, options: Mapping[str, Any] | BackendOptions | None) -> BackendOptions:
        """``options`` checked by the backend's model; a problem is one line naming the backend and the key."""
        if isinstance(options, self.options):
            return options
        if options is not None and not isinstance(options, Mapping):
            raise DmoError(f"{name}: give the {name} backend's options as a mapping of keys, not {options!r}")
        try:
            return self.options.model_validate(dict(options or {}))
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                known = ", ".join(self.options.model_fields) or "none"
                msg = f"not an option of the {name} backend (its options: {known})"
            else:
                msg = f"{err['msg']} (an option of the {name} backend)"
            raise DmoError(f"{name}.{where}: {msg}") from None


class Scorer(abc.ABC):
    """A scoring backend. Subclasses set ``name``, implement the three abstract methods and :meth:`from_context`
    (how a space builds one); the rest has defaults."""

    #: Short backend name recorded in every row's ``source``.
    name: str = ""

    @property
    def max_batch(self) -> int:
        """How many targets one :meth:`evaluate_many` call scores together (``dmo study --batch`` may not exceed it)."""
        return 1

    @property
    def default_batch(self) -> int:
        """Trials a study runs at once when ``--batch`` is not given."""
        return 1

    @classmethod
    def from_context(cls, context: ScoringContext, options: Any) -> Scorer:
        """The scorer a space asks for: ``context`` is what every backend receives, ``options`` the backend's own,
        an instance of its entry's options model, already validated."""
        raise DmoError(f"scoring backend class {cls.__name__} does not implement from_context: it cannot be made")

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

    def item_count(self, benchmark: str) -> int:
        """How many items (documents) ``benchmark`` scores, ``limit`` applied: the items a stage scores part of."""
        raise DmoError(
            f"the {self.name or type(self).__name__} backend does not score single items: use the hf, vllm or replay "
            "backend, or drop scoring.stages and the pruner"
        )

    def evaluate_items(self, target: Target, items: Mapping[str, Sequence[int]]) -> ItemEvaluation:
        """Score ``target`` on these items only (document ids per benchmark); each item's score, whose mean over
        all of a benchmark's items is its score."""
        raise DmoError(
            f"the {self.name or type(self).__name__} backend does not score single items: use the hf, vllm or replay "
            "backend, or drop scoring.stages and the pruner"
        )

    def evaluate_items_many(
        self, targets: Sequence[Target], items: Mapping[str, Sequence[int]]
    ) -> list[ItemEvaluation]:
        """:meth:`evaluate_items` for several targets (the same items); ``max_batch > 1`` backends do better."""
        return [self.evaluate_items(t, items) for t in targets]

    def evaluate_many(self, targets: Sequence[Target], benchmarks: Sequence[str]) -> list[Evaluation]:
        """Score several targets in one call; backends with ``max_batch > 1`` do better than this loop."""
        return [self.evaluate(t, benchmarks) for t in targets]

    def close(self) -> None:  # noqa: B027 (nothing to release by default)
        """Release engines and devices."""


SCORERS = PluginRegistry("dmo.scorers", "scoring backend")


def scorer_names() -> list[str]:
    return SCORERS.names()


def backend(name: str) -> Backend:
    """The registry entry of a backend: its scorer class and the model of its options."""
    entry = SCORERS.get(name)
    if not isinstance(entry, Backend):
        raise DmoError(
            f"scoring backend {name!r} is registered as {entry!r}, not a dmo.scoring.base.Backend: "
            "fix its entry point (it must name a Backend(scorer='module:Class', options=OptionsModel))"
        )
    return entry


def make_scorer(
    name: str, context: ScoringContext, options: Mapping[str, Any] | BackendOptions | None = None
) -> Scorer:
    """A scorer of backend ``name``, built from the context every backend receives and its own ``options``
    (validated by its options model; None: its defaults)."""
    entry = backend(name)
    checked = entry.validate(name, options)
    try:
        cls = entry.load()
    except ModuleNotFoundError as exc:
        how = f"pip install 'dmo[{name}]'" if entry.scorer.startswith("dmo.") else f"install {exc.name!r}"
        raise DmoError(f"scoring backend {name!r} needs {exc.name!r}: {how}") from None
    return cls.from_context(context, checked)


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
    for i, (_, _, _, _, missing) in enumerate(plans):
        if missing:
            pending.setdefault(tuple(missing), []).append(i)
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
