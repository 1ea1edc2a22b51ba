"""Config files: expert manifests (``experts/*.yaml``) and search spaces (``search_spaces/*.yaml``).

Both are pydantic models. Loading a file turns any validation problem into one :class:`DmoError` line that
names the file, the key and the problem. Relative paths inside a file resolve against that file's folder.

A model reference is ``{path: DIR}``, ``{hub: ORG/NAME, revision: REV}``, or a string: a string that starts
with ``./``, ``../``, ``/`` or ``~`` is a local path, any other string is a hub id.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dmo.errors import DmoError
from dmo.mixture import Mixture, check_domain_name, dedupe, dirichlet, lattice, uniform
from dmo.paths import safe_name
from dmo.presets import preset
from dmo.sources import is_source_name


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelRef(_Strict):
    """A model or adapter: a local folder or a hub id (hub ids are only resolved when the user allows it)."""

    path: Path | None = None
    hub: str | None = None
    revision: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        if isinstance(value, (str, Path)):
            text = str(value)
            if text.startswith(("./", "../", "/", "~")) or isinstance(value, Path):
                return {"path": text}
            return {"hub": text}
        return value

    @model_validator(mode="after")
    def _one_source(self) -> ModelRef:
        if (self.path is None) == (self.hub is None):
            raise ValueError("give exactly one of 'path' or 'hub'")
        return self

    def resolved(self, root: Path) -> ModelRef:
        if self.path is None:
            return self
        return self.model_copy(update={"path": (root / self.path.expanduser()).resolve()})

    def __str__(self) -> str:
        return str(self.path) if self.path is not None else f"{self.hub}@{self.revision or 'main'}"


class ExpertRef(ModelRef):
    """An expert: a model reference plus, optionally, its diagonal Fisher weights (``fisher: FILE``, a safetensors
    file or folder, relative to the manifest; written by ``dmo fisher``, read by the ``fisher``/``fisher_nn``
    merges). Without ``fisher`` they are looked for where ``dmo fisher`` puts them by default:
    ``<expert folder>/fisher.safetensors`` (a full checkpoint: ``<expert folder>/fisher/fisher.safetensors``)."""

    fisher: Path | None = None

    def resolved(self, root: Path) -> ExpertRef:
        out = super().resolved(root)
        if self.fisher is None:
            return out
        return out.model_copy(update={"fisher": (root / self.fisher.expanduser()).resolve()})


class TrainedRef(_Strict):
    """A model trained on an actual mixture: the ground truth a proxy is compared with."""

    mixture: dict[str, float]
    seed: int = 0
    path: Path | None = None
    hub: str | None = None

    def ref(self) -> ModelRef:
        return ModelRef(path=self.path, hub=self.hub)


class ExpertManifest(_Strict):
    """One base model and one expert per domain, all trained the same way (``kind``, ``budget``)."""

    name: str
    base: ModelRef
    kind: Literal["lora", "full"] = "lora"
    budget: int | None = Field(default=None, gt=0, description="training samples per expert")
    experts: dict[str, ExpertRef]
    trained: list[TrainedRef] = []
    trust_remote_code: bool = Field(
        default=False, description="let transformers run a checkpoint's own code (never needed for HF-layout models)"
    )
    #: A folder with each domain's data as ``dmo data mix --data`` reads it (relative to the manifest); a
    #: ``loss:<domain>`` benchmark scores the domain's validation split there (``<domain>/val.jsonl``, ...).
    data: Path | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return safe_name(v, "manifest name")

    @field_validator("experts")
    @classmethod
    def _domains(cls, v: dict[str, ExpertRef]) -> dict[str, ExpertRef]:
        if not v:
            raise ValueError("list at least one expert")
        for d in v:
            check_domain_name(d)
        return v

    @property
    def domains(self) -> list[str]:
        return list(self.experts)

    def trained_mixtures(self) -> list[tuple[Mixture, int, ModelRef]]:
        return [(Mixture.from_mapping(t.mixture, self.domains), t.seed, t.ref()) for t in self.trained]


class LatticeSpec(_Strict):
    resolution: int = Field(gt=0)
    min_weight: float = Field(default=0.0, ge=0, le=1)
    max_weight: float = Field(default=1.0, ge=0, le=1)
    drop_vertices: bool = False


class DirichletSpec(_Strict):
    n: int = Field(gt=0)
    alpha: float = Field(default=1.0, gt=0)
    seed: int = 0
    decimals: int | None = 4


class PresetSpec(_Strict):
    name: str
    with_uniform: bool = False


class MixtureSource(_Strict):
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


class MergeSpec(_Strict):
    method: str = "linear"
    params: dict[str, Any] = {}
    #: Reproduce the DMO paper's coefficients round(w * budget) / budget (no renormalisation, zeros dropped).
    paper_rounding: bool = False


class CalibrateSpec(_Strict):
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


class ObjectiveSpec(_Strict):
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


class SamplerSpec(_Strict):
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


class VLLMOptions(_Strict):
    """The vllm backend's engine: LoRA serving of exact linear proxies, weight writes for the rest."""

    lora: bool | None = Field(
        default=None,
        description="serve linear/RobustMerge proxies of LoRA experts as adapters (default: on a GPU, not on a CPU)",
    )
    max_lora_rank: int | None = Field(default=None, description="default: the smallest vLLM rank >= sum of ranks")
    max_loras: int = Field(default=4, gt=0, description="adapters (proxies) in flight together")
    gpu_memory_utilization: float | None = Field(
        default=None, gt=0, le=1, description="default: 0.85 of a GPU; on a CPU a fixed 1 GiB KV cache instead"
    )
    max_model_len: int | None = Field(default=None, gt=0)
    dtype: str = "auto"
    store: Literal["device", "host"] = Field(default="device", description="where the expert bank lives")
    engine: dict[str, Any] = Field(default_factory=dict, description="extra vllm.LLM keyword arguments")


class ScoringSpec(_Strict):
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
    #: ``replay`` backend only: the recorded results table to answer from, and whether the nearest recorded
    #: mixture may answer for one that was not recorded (dmo/scoring/replay_backend.py).
    table: str | None = None
    nearest: bool = False
    #: ``vllm`` backend only: its engine options (dmo/scoring/vllm_backend.py, ``VLLMOptions``).
    vllm: VLLMOptions | None = None
    #: Folders of one's own lmms-eval task YAMLs, put on lmms-eval's include path (relative paths start from the space
    #: file's folder); earlier folders win over later ones and over lmms-eval's built-in tasks of the same name.
    tasks: list[Path] = []
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
    def _backend_only(self) -> ScoringSpec:
        if self.backend != "replay" and (self.table is not None or self.nearest):
            raise ValueError("'table' and 'nearest' are options of the replay backend only (backend: replay)")
        if self.backend != "vllm" and self.vllm is not None:
            raise ValueError("'vllm' options apply to the vllm backend only (backend: vllm)")
        return self

    def backend_options(self) -> dict[str, Any]:
        """Keyword arguments for the backend's factory besides the common ones."""
        if self.backend == "replay":
            return {"table": self.table, "nearest": self.nearest}
        if self.backend == "vllm":
            return (self.vllm or VLLMOptions()).model_dump()
        return {}


class SearchSpace(_Strict):
    """Domains, the experts that represent them, candidate mixtures, and how to merge, score and search."""

    name: str | None = None
    domains: list[str]
    experts: str | None = None
    mixtures: list[dict[str, float]] | MixtureSource
    merge: MergeSpec = MergeSpec()
    benchmarks: list[str] = []
    objective: ObjectiveSpec = ObjectiveSpec()
    sampler: SamplerSpec = SamplerSpec()
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
            s = src.lattice
            return lattice(
                self.domains,
                s.resolution,
                min_weight=s.min_weight,
                max_weight=s.max_weight,
                drop_vertices=s.drop_vertices,
            )
        if src.dirichlet is not None:
            s = src.dirichlet
            return dirichlet(self.domains, s.n, alpha=s.alpha, seed=s.seed, decimals=s.decimals)
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


_TYPE_MISMATCH = {"list_type", "dict_type", "model_type", "model_attributes_type"}
_BRANCH_TAG = re.compile(r"[\[\]]|^function-|^MixtureSource$")


def _format_error(source: str, exc: ValidationError) -> DmoError:
    errors = exc.errors()
    # A union reports one error per branch; the branch whose *type* did not match is noise.
    specific = [e for e in errors if e["type"] not in _TYPE_MISMATCH]
    err = (specific or errors)[0]
    loc = ".".join(str(p) for p in err["loc"] if not _BRANCH_TAG.search(str(p)))
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key (check its spelling)"
    elif err["type"] == "missing":
        msg = "required key is missing"
    return DmoError(f"{source}: {loc or 'top level'}: {msg}")


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise DmoError(f"{path}: file not found") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise DmoError(f"{path}:{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise DmoError(f"{path}: expected a mapping of keys at the top level")
    return data


def _validate(model: type[BaseModel], data: dict[str, Any], source: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _format_error(source, exc) from None
    except DmoError as exc:
        raise DmoError(f"{source}: {exc}") from None


def load_manifest(path: str | Path, check_paths: bool = True) -> ExpertManifest:
    """Read an expert manifest; local paths become absolute and, with ``check_paths``, must exist."""
    path = Path(path)
    manifest: ExpertManifest = _validate(ExpertManifest, read_yaml(path), str(path))
    root = path.parent.resolve()
    base = manifest.base.resolved(root)
    experts = {d: r.resolved(root) for d, r in manifest.experts.items()}
    trained = [
        t.model_copy(update={"path": (root / t.path).resolve()}) if t.path is not None else t for t in manifest.trained
    ]
    data = (root / manifest.data.expanduser()).resolve() if manifest.data is not None else None
    manifest = manifest.model_copy(update={"base": base, "experts": experts, "trained": trained, "data": data})
    if check_paths:
        for what, ref in [("base", base), *((f"expert {d!r}", r) for d, r in experts.items())]:
            if ref.path is not None and not ref.path.is_dir():
                raise DmoError(f"{path}: {what} points at missing folder {ref.path}: fix the path or build it first")
    for t in manifest.trained:
        try:
            Mixture.from_mapping(t.mixture, manifest.domains)
        except DmoError as exc:
            raise DmoError(f"{path}: trained: {exc}") from None
    return manifest


_PLAIN = re.compile(r"[A-Za-z0-9_./~+-][A-Za-z0-9_./~+@=-]*")


def _yaml_scalar(text: str) -> str:
    """``text`` as a YAML scalar that reads back as the same string (plain where safe, else double-quoted)."""
    if _PLAIN.fullmatch(text) and yaml.safe_load(text) == text:
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def set_expert_field(path: str | Path, field: str, values: dict[str, str]) -> str:
    """The text of manifest ``path`` with ``experts.<domain>.<field>: value`` set for each of ``values``.

    Everything else (comments, order, quoting, flow or block style) is kept: only the experts' entries change,
    through the positions PyYAML reports. A string entry ``ocr: ./ocr`` becomes ``ocr: {path: ./ocr, fisher: x}``;
    a mapping gets the key added (or its value replaced). The result is validated as a manifest; a layout this
    cannot edit safely (an anchor shared by two experts, ...) raises :class:`DmoError`. Nothing is written here
    (:func:`dmo.groundtruth.fisher.record_in_manifest` writes it atomically).
    """
    path = Path(path)
    before = _validate(ExpertManifest, read_yaml(path), str(path))
    text = path.read_text()
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        raise DmoError(f"{path}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    experts = None
    if isinstance(root, yaml.MappingNode):
        experts = next((v for k, v in root.value if getattr(k, "value", None) == "experts"), None)
    if not isinstance(experts, yaml.MappingNode):
        raise DmoError(f"{path}: no 'experts:' mapping to add {field} paths to")
    edits: list[tuple[int, int, str]] = []
    found = set()
    for key, node in experts.value:
        domain = getattr(key, "value", None)
        if domain not in values:
            continue
        found.add(domain)
        new = _yaml_scalar(values[domain])
        start, end = node.start_mark.index, node.end_mark.index
        if isinstance(node, yaml.ScalarNode):
            local = str(node.value).startswith(("./", "../", "/", "~"))
            edits.append((start, end, f"{{{'path' if local else 'hub'}: {text[start:end]}, {field}: {new}}}"))
            continue
        if not isinstance(node, yaml.MappingNode):
            raise DmoError(f"{path}: experts.{domain} is neither a path nor a mapping")
        existing = next((v for k, v in node.value if getattr(k, "value", None) == field), None)
        if existing is not None:
            edits.append((existing.start_mark.index, existing.end_mark.index, new))
        elif node.flow_style:
            brace = text.rindex("}", start, end)
            edits.append((brace, brace, f", {field}: {new}"))
        else:
            last = node.value[-1][1]
            eol = text.find("\n", last.end_mark.index)
            eol = len(text) if eol < 0 else eol
            indent = " " * node.value[0][0].start_mark.column
            edits.append((eol, eol, f"\n{indent}{field}: {new}"))
    missing = [d for d in values if d not in found]
    if missing:
        raise DmoError(f"{path}: no expert {missing[0]!r} under 'experts:'")
    for start, end, new in sorted(edits, reverse=True):
        text = text[:start] + new + text[end:]
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        data = None
    if not isinstance(data, dict):
        raise DmoError(f"{path}: cannot add {field} paths to this layout safely")
    after = _validate(ExpertManifest, data, str(path))
    same = {d: r.model_copy(update={field: getattr(before.experts[d], field)}) if d in values else r
            for d, r in after.experts.items()}  # fmt: skip
    if after.model_copy(update={"experts": same}) != before or any(
        str(getattr(after.experts[d], field)) != str(Path(v)) for d, v in values.items()
    ):
        raise DmoError(f"{path}: cannot add {field} paths to this layout safely")
    return text


def load_space(path: str | Path) -> SearchSpace:
    """Read a search space; ``experts`` (when a path) becomes absolute, resolved against the file's folder."""
    path = Path(path)
    space: SearchSpace = _validate(SearchSpace, read_yaml(path), str(path))
    updates: dict[str, Any] = {}
    if space.name is None:
        updates["name"] = safe_name(path.stem, "space name")
    if space.experts and not is_source_name(space.experts):
        updates["experts"] = str((path.parent / Path(space.experts).expanduser()).resolve())
    scoring: dict[str, Any] = {}
    if space.scoring.table:
        scoring["table"] = str((path.parent / Path(space.scoring.table).expanduser()).resolve())
    if space.scoring.tasks:  # task folders of one's own, relative to the space file
        scoring["tasks"] = [(path.parent / t.expanduser()).resolve() for t in space.scoring.tasks]
    if scoring:
        updates["scoring"] = space.scoring.model_copy(update=scoring)
    return space.model_copy(update=updates) if updates else space


def parse_space(data: dict[str, Any], source: str = "<space>") -> SearchSpace:
    return _validate(SearchSpace, data, source)
