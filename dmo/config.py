"""Search spaces (``search_spaces/*.yaml``): domains, experts, candidate mixtures, and how to merge, score and search.

Loading a file turns any validation problem into one :class:`DmoError` line that names the file, the key and the
problem (:mod:`dmo.configfile`); relative paths inside a file resolve against that file's folder. Expert manifests
are :mod:`dmo.manifest`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from dmo.configfile import Strict, read_yaml, validate
from dmo.errors import DmoError
from dmo.mixture import Mixture, check_domain_name, dedupe, dirichlet, lattice, uniform
from dmo.paths import safe_name
from dmo.presets import preset
from dmo.sources import is_source_name

if TYPE_CHECKING:
    from dmo.scoring.base import BackendOptions


class LatticeSpec(Strict):
    resolution: int = Field(gt=0)
    min_weight: float = Field(default=0.0, ge=0, le=1)
    max_weight: float = Field(default=1.0, ge=0, le=1)
    drop_vertices: bool = False


class DirichletSpec(Strict):
    n: int = Field(gt=0)
    alpha: float = Field(default=1.0, gt=0)
    seed: int = 0
    decimals: int | None = 4


class PresetSpec(Strict):
    name: str
    with_uniform: bool = False


class MixtureSource(Strict):
    """Exactly one generator of candidate mixtures."""

    lattice: LatticeSpec | None = None
    dirichlet: DirichletSpec | None = None
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
    method: str = "linear"
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


class ObjectiveSpec(Strict):
    """How per-benchmark scores become the one number the search maximises."""

    aggregate: Literal["mean", "min", "weighted"] = "mean"
    weights: dict[str, float] = {}
    #: Calibrate the proxy's scores before aggregating them (None: the proxy's own scores, as before).
    calibrate: CalibrateSpec | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"aggregate": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _weights_given(self) -> ObjectiveSpec:
        if self.aggregate == "weighted" and not self.weights:
            raise ValueError("aggregate 'weighted' needs 'weights: {benchmark: weight}'")
        return self

    def __call__(self, scores: dict[str, float]) -> float:
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


class SamplerSpec(Strict):
    name: str = "cmaes"
    n_trials: int = Field(default=20, gt=0)
    seed: int = 0
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

    name: str = "none"
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

    backend: str = "hf"

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, v: str) -> str:
        from dmo.scoring.base import scorer_names

        names = scorer_names()
        if names and v not in names:  # no names at all: a stale install, said when the backend is made
            raise ValueError(f"unknown scoring backend {v!r}: choose one of {', '.join(names)}")
        return v

    limit: int | None = Field(default=None, gt=0)
    batch_size: int = Field(default=64, gt=0)
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

    name: str | None = None
    domains: list[str]
    experts: str | None = None
    mixtures: list[dict[str, float]] | MixtureSource
    merge: MergeSpec = MergeSpec()
    benchmarks: list[str] = []
    objective: ObjectiveSpec = ObjectiveSpec()
    sampler: SamplerSpec = SamplerSpec()
    pruner: PrunerSpec = PrunerSpec()
    scoring: ScoringSpec = ScoringSpec()

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
