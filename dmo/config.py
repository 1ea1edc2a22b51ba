"""Search spaces (``search_spaces/*.yaml``): domains, experts, candidate mixtures, and how to merge, score and search.

Loading a file turns any validation problem into one :class:`DmoError` line that names the file, the key and the
problem (:mod:`dmo.configfile`); relative paths inside a file resolve against that file's folder. Expert manifests
are :mod:`dmo.manifest`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ConfigDict, Field, ValidationInfo, field_validator, model_validator

from dmo.configfile import Strict, read_yaml, validate
from dmo.errors import DmoError
from dmo.mixture import Mixture, check_domain_name, dedupe, dirichlet, lattice, uniform
from dmo.paths import safe_name
from dmo.presets import preset
from dmo.sources import is_source_name

if TYPE_CHECKING:
    from dmo.scoring.base import BackendOptions


class LatticeSpec(Strict):
    """``mixtures: {lattice: {...}}``: every mixture whose weights are multiples of ``1 / resolution``."""

    #: weights are multiples of 1 / resolution (8: steps of 0.125)
    resolution: int = Field(gt=0)
    #: leave out mixtures with a weight below this
    min_weight: float = Field(default=0.0, ge=0, le=1)
    #: leave out mixtures with a weight above this
    max_weight: float = Field(default=1.0, ge=0, le=1)
    #: leave out the single-domain mixtures (the experts themselves)
    drop_vertices: bool = False


class DirichletSpec(Strict):
    """``mixtures: {dirichlet: {...}}``: ``n`` random mixtures drawn from a symmetric Dirichlet distribution."""

    #: how many mixtures to draw
    n: int = Field(gt=0)
    #: the Dirichlet concentration (1: uniform over the simplex; below 1: towards its corners)
    alpha: float = Field(default=1.0, gt=0)
    #: seed of the draw
    seed: int = 0
    #: round the weights to this many decimals (null: no rounding)
    decimals: int | None = 4


class PresetSpec(Strict):
    """``mixtures: {preset: paper-3d}``: the DMO paper's published mixtures."""

    #: the preset's name (its domains must be the space's, in the same order)
    name: str
    #: add the uniform mixture
    with_uniform: bool = False


class MixtureSource(Strict):
    """Exactly one generator of candidate mixtures."""

    #: a regular grid over the simplex
    lattice: LatticeSpec | None = None
    #: random mixtures
    dirichlet: DirichletSpec | None = None
    #: the DMO paper's mixtures; ``{preset: paper-3d, with_uniform: true}`` is short for ``{preset: {name: ...}}``
    preset: PresetSpec | None = None

    @model_validator(mode="before")
    @classmethod
    def _preset_string(cls, value: Any) -> Any:
        if isinstance(value, dict) and isinstance(value.get("preset"), str):
            value = {**value, "preset": {"name": value["preset"], "with_uniform": value.get("with_uniform", False)}}
            value.pop("with_uniform", None)
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> MixtureSource:
        given = [k for k in ("lattice", "dirichlet", "preset") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of 'lattice', 'dirichlet', 'preset', or an explicit list of mixtures")
        return self


class MergeSpec(Strict):
    """How a mixture's proxy is merged from the experts."""

    #: a merge method of the registry (see the merge methods reference)
    method: str = "linear"
    #: the method's parameters, e.g. ``{density: 0.2}``
    params: dict[str, Any] = {}
    #: Reproduce the DMO paper's coefficients round(w * budget) / budget (no renormalisation, zeros dropped).
    paper_rounding: bool = False


class CalibrateSpec(Strict):
    """``objective: {calibrate: {method: isotonic}}``: the study maximises the trained score a calibration predicts
    from the proxy's scores, fitted on the space's trained mixtures and its experts (dmo/calibration.py)."""

    #: empty: dmo.calibration.DEFAULT_CALIBRATION, written out on loading (so the space's hash names the method)
    method: str = Field(default="", validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"method": value} if isinstance(value, str) else value

    @field_validator("method")
    @classmethod
    def _known(cls, v: str) -> str:
        from dmo.calibration import DEFAULT_CALIBRATION, check_score_calibration

        v = v or DEFAULT_CALIBRATION
        try:
            check_score_calibration(v)
        except DmoError as exc:
            raise ValueError(str(exc)) from None
        return v


class ObjectiveGroup(Strict):
    """One objective of a multi-objective study made of several benchmarks: their weighted mean."""

    #: the objective's label in tables and plots (default: its benchmarks joined by ``+``)
    name: str | None = None
    #: per benchmark, its weight in the group's mean
    weights: dict[str, float]

    @field_validator("weights")
    @classmethod
    def _positive(cls, v: dict[str, float]) -> dict[str, float]:
        if not v:
            raise ValueError("a weighted group needs 'weights: {benchmark: weight}'")
        if any(w < 0 for w in v.values()) or sum(v.values()) <= 0:
            raise ValueError(f"a weighted group's weights must be >= 0 with a positive sum, got {v}")
        return v

    @property
    def label(self) -> str:
        return self.name or "+".join(self.weights)


class ObjectiveSpec(Strict):
    """How per-benchmark scores become the number the search maximises, or with ``pareto`` the several numbers."""

    #: mean or min over the benchmarks, or a weighted mean (``weights``); a string ``objective: min`` is the same
    aggregate: Literal["mean", "min", "weighted"] = "mean"
    #: per benchmark, its weight in the ``weighted`` aggregate
    weights: dict[str, float] = {}
    #: Calibrate the proxy's scores before aggregating them (None: the proxy's own scores, as before).
    calibrate: CalibrateSpec | None = None
    #: A multi-objective study: one objective (maximised) per entry, a benchmark (or a sub-score such as
    #: ``pope_dmo/f1``) or a weighted group of benchmarks (None: one objective, the aggregate above).
    pareto: list[str | ObjectiveGroup] | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"aggregate": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _weights_given(self) -> ObjectiveSpec:
        if self.aggregate == "weighted" and not self.weights:
            raise ValueError("aggregate 'weighted' needs 'weights: {benchmark: weight}'")
        if self.pareto is not None:
            if len(self.pareto) < 2:
                raise ValueError("pareto needs at least two objectives (for one, use 'aggregate')")
            given = [k for k, v in (("aggregate", self.aggregate != "mean"), ("weights", self.weights),
                                     ("calibrate", self.calibrate is not None)) if v]  # fmt: skip
            if given:
                raise ValueError(
                    f"pareto makes every entry an objective of its own: drop {', '.join(sorted(given))} "
                    "(a calibrated multi-objective study is not supported)"
                )
            names = self.objective_names()
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise ValueError(f"pareto names an objective twice: {', '.join(twice)} (give groups a 'name')")
        return self

    def objective_names(self) -> list[str]:
        """One name per objective: the benchmark, or the group's name."""
        if self.pareto is None:
            return ["objective"]
        return [e if isinstance(e, str) else e.label for e in self.pareto]

    def objective_weights(self) -> list[dict[str, float]]:
        """Per objective of a ``pareto`` study, its benchmarks and their weights (a benchmark alone: weight 1)."""
        return [{e: 1.0} if isinstance(e, str) else dict(e.weights) for e in self.pareto or []]

    def values(self, scores: dict[str, float]) -> list[float]:
        """The objectives of a ``pareto`` study from per-benchmark scores, in the order of the entries."""
        out = []
        for name, weights in zip(self.objective_names(), self.objective_weights()):
            missing = [b for b in weights if b not in scores]
            if missing:
                raise DmoError(f"objective {name!r} needs a score on {', '.join(missing)}, which is missing")
            out.append(sum(w * scores[b] for b, w in weights.items()) / sum(weights.values()))
        return out

    def __call__(self, scores: dict[str, float]) -> float:
        if self.pareto is not None:
            raise DmoError(
                f"a multi-objective study (objective.pareto: {', '.join(self.objective_names())}) has no single "
                "objective value: use one of its objectives"
            )
        if not scores:
            raise DmoError("no benchmark scores to aggregate")
        if self.aggregate == "min":
            return min(scores.values())
        if self.aggregate == "weighted":
            total = sum(self.weights.get(b, 0.0) for b in scores)
            if total <= 0:
                raise DmoError(f"objective weights {self.weights} give no weight to benchmarks {sorted(scores)}")
            return sum(self.weights.get(b, 0.0) * s for b, s in scores.items()) / total
        return sum(scores.values()) / len(scores)


#: ``min: base``, ``min: base + 0.02``, ``min: expert - 0.05``, ``min: expert:ocr``
_RELATIVE = re.compile(r"^\s*(base|expert(?::([A-Za-z0-9_.-]+))?)\s*(?:([+-])\s*(\d+(?:\.\d*)?|\.\d+))?\s*$")


class ConstraintSpec(Strict):
    """``{benchmark: X, min: 0.6}``: a mixture is feasible only if its proxy scores at least ``min`` on X. ``min`` is
    a number, or relative: ``base`` (the base model's score on X), ``expert`` (the best of the space's experts on X),
    ``expert:<domain>`` (that domain's expert), each optionally ``+`` or ``-`` a number."""

    #: the benchmark (one of the space's) whose proxy score is bounded
    benchmark: str
    #: the bound: a number, or ``base`` / ``expert`` / ``expert:<domain>``, optionally ``+`` or ``-`` a number
    min: float | str

    @field_validator("min")
    @classmethod
    def _form(cls, v: float | str) -> float | str:
        if isinstance(v, str) and not _RELATIVE.match(v):
            raise ValueError(
                f"min {v!r} is neither a number nor 'base', 'expert' or 'expert:<domain>' with an optional "
                "'+ number' or '- number'"
            )
        return v

    def reference(self) -> tuple[str, str | None, float]:
        """(``absolute`` | ``base`` | ``expert``, the expert's domain or None for the best one, the offset); for
        ``absolute`` the offset is the threshold itself."""
        if not isinstance(self.min, str):
            return "absolute", None, float(self.min)
        m = _RELATIVE.match(self.min)
        assert m is not None  # checked on loading
        kind = "base" if m.group(1) == "base" else "expert"
        offset = float(m.group(4)) * (-1 if m.group(3) == "-" else 1) if m.group(4) else 0.0
        return kind, m.group(2), offset

    def threshold(self, base: dict[str, float] | None, experts: dict[str, dict[str, float]]) -> float:
        """The absolute threshold, given the base's and the experts' scores (per domain) on the benchmarks."""
        kind, domain, offset = self.reference()
        if kind == "absolute":
            return offset
        if kind == "base":
            if base is None or self.benchmark not in base:
                raise DmoError(f"constraint on {self.benchmark} (min: {self.min}) needs the base model's score on it")
            return base[self.benchmark] + offset
        known = {d: s[self.benchmark] for d, s in experts.items() if self.benchmark in s}
        if domain is not None:
            if domain not in known:
                raise DmoError(f"constraint on {self.benchmark} (min: {self.min}) needs the {domain} expert's score")
            return known[domain] + offset
        if not known:
            raise DmoError(f"constraint on {self.benchmark} (min: {self.min}) needs an expert's score on it")
        return max(known.values()) + offset


class SamplerSpec(Strict):
    """The study's sampler (a string ``sampler: tpe`` names it with the defaults)."""

    #: a registered sampler (``grid`` scores the space's candidates only); default: TPE (dmo.search.samplers)
    name: str = "tpe"
    #: total trials of the study (``dmo study --n-trials`` overrides it)
    n_trials: int = Field(default=20, gt=0)
    #: the sampler's seed
    seed: int = 0
    #: keyword arguments of the Optuna sampler, over dmo's defaults
    params: dict[str, Any] = {}

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from dmo.search.samplers import sampler_names

        if v not in sampler_names():
            raise ValueError(f"unknown sampler {v!r}: choose one of {', '.join(sampler_names())}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value


class PrunerSpec(Strict):
    """``pruner: wilcoxon`` or ``{name: hyperband, params: {...}}``: which Optuna pruner may stop a proxy between its
    scoring stages (dmo/search/stages.py); ``none`` scores every proxy in full."""

    #: a registered pruner: wilcoxon, successive_halving, hyperband, median, or none
    name: str = "none"
    #: keyword arguments of the Optuna pruner, over dmo's defaults
    params: dict[str, Any] = {}

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from dmo.search.stages import pruner_names

        if v not in pruner_names():
            raise ValueError(f"unknown pruner {v!r}: choose one of {', '.join(pruner_names())}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value


class ScoringSpec(Strict):
    """The options common to every backend (what :class:`dmo.scoring.base.ScoringContext` carries), and, under the
    chosen backend's name, that backend's own options, checked by the model of its registry entry
    (``scoring: {backend: vllm, vllm: {max_loras: 2}}``): a backend from another package brings its own."""

    model_config = ConfigDict(extra="allow", frozen=True)

    #: the scoring backend (``dmo study --backend`` overrides it)
    backend: str = "hf"

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, v: str) -> str:
        from dmo.scoring.base import scorer_names

        names = scorer_names()
        if names and v not in names:  # no names at all: a stale install, said when the backend is made
            raise ValueError(f"unknown scoring backend {v!r}: choose one of {', '.join(names)}")
        return v

    #: evaluate only the first N items of each benchmark (null: all; ``dmo study --limit`` overrides it)
    limit: int | None = Field(default=None, gt=0)
    #: examples per forward pass, for backends that batch in-process
    batch_size: int = Field(default=64, gt=0)
    #: where an in-process model runs: auto, cpu, cuda:0, ...
    device: str = "auto"
    #: Folders of one's own lmms-eval task YAMLs, put on lmms-eval's include path (relative paths start from the space
    #: file's folder); earlier folders win over later ones and over lmms-eval's built-in tasks of the same name.
    tasks: list[Path] = []
    #: Stagewise scoring (dmo/search/stages.py): the fractions of each benchmark's items a proxy is scored on, in
    #: stages, increasing and ending at 1 (a study's pruner may stop a proxy after any stage but the last); None: in
    #: one go, or the default schedule when the space has a pruner.
    stages: list[float] | None = None

    @field_validator("stages")
    @classmethod
    def _stages(cls, v: list[float] | None) -> list[float] | None:
        if v is None:
            return v
        from dmo.search.stages import check_stages

        try:
            return check_stages(v)
        except DmoError as exc:
            raise ValueError(str(exc)) from None

    #: Metric-map entries of one's own, ``{benchmark: {metric, filter, divide_by}}`` as in dmo/scoring/metrics.yaml,
    #: merged over the shipped map (an entry here replaces the shipped one of the same benchmark).
    metrics: dict[str, dict[str, Any]] = {}

    @field_validator("metrics")
    @classmethod
    def _metric_entries(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        from dmo.scoring.metrics import parse_metric_map

        try:
            parse_metric_map(v, "scoring.metrics")
        except DmoError as exc:
            raise ValueError(str(exc)) from None
        return v

    def metric_map(self) -> dict[str, Any] | None:
        """The shipped metric map with this space's own entries over it; None when the space has none."""
        if not self.metrics:
            return None
        from dmo.scoring.metrics import load_metric_map, parse_metric_map

        return {**load_metric_map(), **parse_metric_map(self.metrics, "scoring.metrics")}

    @model_validator(mode="after")
    def _own_options(self) -> ScoringSpec:
        from dmo.scoring.base import scorer_names

        names = scorer_names()
        for key in self.model_extra or {}:
            if names and key not in names:
                raise ValueError(
                    f"unknown key {key!r}: neither a scoring option nor a backend's name ({', '.join(names)})"
                )
            if key != self.backend:
                raise ValueError(
                    f"{key!r} holds options of the {key} backend, but the backend is {self.backend}: "
                    f"set 'backend: {key}', or remove them"
                )
        if self.backend in names:  # an unknown backend was refused above; a stale install is said when it is made
            try:
                own = self.backend_options().model_dump(mode="json", exclude_defaults=True)
            except DmoError as exc:
                raise ValueError(str(exc)) from None
            # one spelling per meaning, so that the space's hash does not tell `vllm: {}` from no `vllm` key
            extra = self.__pydantic_extra__ if self.__pydantic_extra__ is not None else {}
            extra.pop(self.backend, None)
            if own:
                extra[self.backend] = own
        return self

    def backend_options(self) -> BackendOptions:
        """The chosen backend's own options, validated by the model of its registry entry (its defaults when the
        section gives none)."""
        from dmo.scoring.base import backend

        return backend(self.backend).validate(self.backend, (self.model_extra or {}).get(self.backend))

    def with_backend_options(self, options: BackendOptions) -> ScoringSpec:
        """This section with the backend's options replaced."""
        data = {k: v for k, v in self.model_dump().items() if k not in (self.model_extra or {})}
        return type(self).model_validate({**data, self.backend: options.model_dump(mode="json")})


class SearchSpace(Strict):
    """Domains, the experts that represent them, candidate mixtures, and how to merge, score and search."""

    #: the space's name: its results folder ``results/<name>`` and studies (default: the file's name)
    name: str | None = None
    #: the domains, in order (the columns ``w_<domain>`` of the results table)
    domains: list[str]
    #: an expert manifest (a path relative to this file) or an expert source's name (``tinyworld``)
    experts: str | None = None
    #: the candidate mixtures: an explicit list of ``{domain: weight}``, or one generator
    mixtures: list[dict[str, float]] | MixtureSource
    #: how proxies are merged
    merge: MergeSpec = MergeSpec()
    #: the benchmarks every model is scored on (lmms-eval task names, ``<task>/<sub-score>``, ``loss:<domain>``)
    benchmarks: list[str] = []
    #: how the benchmark scores become the one number the study maximises
    objective: ObjectiveSpec = ObjectiveSpec()
    #: scores a mixture's proxy must reach to be feasible (before ``sampler``, whose default depends on them)
    constraints: list[ConstraintSpec] = []
    #: how the study proposes mixtures
    sampler: SamplerSpec = Field(default=SamplerSpec(), validate_default=True)
    #: stop unpromising proxies early (a staged space: ``scoring.stages``)
    pruner: PrunerSpec = PrunerSpec()
    #: how models are scored
    scoring: ScoringSpec = ScoringSpec()

    @field_validator("objective")
    @classmethod
    def _objectives_scored(cls, v: ObjectiveSpec, info: ValidationInfo) -> ObjectiveSpec:
        benchmarks = info.data.get("benchmarks")
        if v.pareto is not None and benchmarks is not None:
            for entry, weights in zip(v.pareto, v.objective_weights()):
                unknown = [b for b in weights if b not in benchmarks]
                if unknown:
                    where = "" if isinstance(entry, str) else f"objective {entry.label!r}: "
                    raise ValueError(
                        f"pareto: {where}{', '.join(map(repr, unknown))} is not a benchmark of this space "
                        f"({', '.join(benchmarks) or 'none listed'}): list it under 'benchmarks' or fix its name"
                    )
        return v

    @field_validator("constraints")
    @classmethod
    def _constraints_scored(cls, v: list[ConstraintSpec], info: ValidationInfo) -> list[ConstraintSpec]:
        benchmarks, domains = info.data.get("benchmarks"), info.data.get("domains")
        for i, c in enumerate(v):
            if benchmarks is not None and c.benchmark not in benchmarks:
                raise ValueError(
                    f"{i}: {c.benchmark!r} is not scored by this space ({', '.join(benchmarks) or 'no benchmarks'}): "
                    "a constraint needs one of its benchmarks"
                )
            _, domain, _ = c.reference()
            if domain is not None and domains is not None and domain not in domains:
                raise ValueError(f"{i}: min {c.min!r} names domain {domain!r}, not one of {', '.join(domains)}")
        return v

    @field_validator("sampler", mode="before")
    @classmethod
    def _default_sampler(cls, v: Any, info: ValidationInfo) -> Any:
        from dmo.search.samplers import default_sampler

        objective, constraints = info.data.get("objective"), info.data.get("constraints")
        if objective is None or constraints is None:
            return v  # refused already
        named = (
            isinstance(v, str)
            or (isinstance(v, dict) and "name" in v)
            or (isinstance(v, SamplerSpec) and "name" in v.model_fields_set)
        )
        if named:
            return v
        name = default_sampler(objective.pareto is not None, bool(constraints))
        if isinstance(v, SamplerSpec):
            return v.model_copy(update={"name": name})
        return {**(v or {}), "name": name}

    @field_validator("sampler")
    @classmethod
    def _sampler_fits(cls, v: SamplerSpec, info: ValidationInfo) -> SamplerSpec:
        from dmo.search.samplers import sampler_fits

        objective, constraints = info.data.get("objective"), info.data.get("constraints")
        if objective is not None and constraints is not None:
            problem = sampler_fits(v.name, objective.pareto is not None, bool(constraints))
            if problem:
                raise ValueError(problem)
        return v

    @model_validator(mode="after")
    def _no_pruner_with_pareto(self) -> SearchSpace:
        # Optuna cannot prune a multi-objective study (optuna#3450); spaces that have a pruner key refuse the pair
        pruner = getattr(self, "pruner", None)
        if self.objective.pareto is not None and pruner is not None and getattr(pruner, "name", pruner) != "none":
            raise ValueError(
                "a multi-objective study (objective.pareto) cannot be pruned (Optuna prunes one objective only): "
                "remove 'pruner'"
            )
        return self

    @field_validator("domains")
    @classmethod
    def _domains(cls, v: list[str]) -> list[str]:
        if len(v) < 1:
            raise ValueError("list at least one domain")
        for d in v:
            check_domain_name(d)
        if len(set(v)) != len(v):
            raise ValueError(f"a domain is listed twice: {v}")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        return None if v is None else safe_name(v, "space name")

    @model_validator(mode="after")
    def _check_mixtures(self) -> SearchSpace:
        self.candidates()  # validates every explicit mixture against the domains now, not mid-study
        return self

    @model_validator(mode="after")
    def _check_pruner(self) -> SearchSpace:
        from dmo.search.stages import check_pruner_compatible

        try:
            check_pruner_compatible(self)
        except DmoError as exc:
            raise ValueError(str(exc)) from None
        return self

    def candidates(self) -> list[Mixture]:
        """The candidate mixtures in file order, duplicates removed."""
        src = self.mixtures
        if isinstance(src, list):
            if not src:
                raise DmoError("'mixtures' is an empty list: give at least one mixture")
            out = []
            for i, m in enumerate(src):
                try:
                    out.append(Mixture.from_mapping(m, self.domains))
                except DmoError as exc:
                    raise DmoError(f"mixtures.{i}: {exc}") from None
            return dedupe(out)
        if src.lattice is not None:
            lat = src.lattice
            return lattice(
                self.domains,
                lat.resolution,
                min_weight=lat.min_weight,
                max_weight=lat.max_weight,
                drop_vertices=lat.drop_vertices,
            )
        if src.dirichlet is not None:
            dir_ = src.dirichlet
            return dirichlet(self.domains, dir_.n, alpha=dir_.alpha, seed=dir_.seed, decimals=dir_.decimals)
        assert src.preset is not None
        mixtures = preset(src.preset.name, src.preset.with_uniform)
        if mixtures and list(mixtures[0].domains) != list(self.domains):
            raise DmoError(
                f"preset {src.preset.name!r} has domains {list(mixtures[0].domains)}, "
                f"but this space lists {self.domains}: list the same domains in the same order"
            )
        return mixtures

    def uniform(self) -> Mixture:
        return uniform(self.domains)


def load_space(path: str | Path) -> SearchSpace:
    """Read a search space; ``experts`` (when a path) becomes absolute, resolved against the file's folder."""
    path = Path(path)
    space: SearchSpace = validate(SearchSpace, read_yaml(path), str(path))
    updates: dict[str, Any] = {}
    if space.name is None:
        updates["name"] = safe_name(path.stem, "space name")
    if space.experts and not is_source_name(space.experts):
        updates["experts"] = str((path.parent / Path(space.experts).expanduser()).resolve())
    scoring = space.scoring
    if scoring.tasks:  # task folders of one's own, relative to the space file
        scoring = scoring.model_copy(
            update={"tasks": [(path.parent / t.expanduser()).resolve() for t in scoring.tasks]}
        )
    if (model_extra := scoring.model_extra) and scoring.backend in model_extra:  # the backend's own paths likewise
        scoring = scoring.with_backend_options(scoring.backend_options().resolve_paths(path.parent))
    if scoring is not space.scoring:
        updates["scoring"] = scoring
    return space.model_copy(update=updates) if updates else space


def parse_space(data: dict[str, Any], source: str = "<space>") -> SearchSpace:
    return validate(SearchSpace, data, source)
