"""Expert manifests (``experts/*.yaml``): the base model, one expert per domain, the models trained on mixtures, and
the domain data. Relative paths resolve against the manifest's folder.

A model reference is ``{path: DIR}``, ``{hub: ORG/NAME, revision: REV}``, or a string: a string that starts
with ``./``, ``../``, ``/`` or ``~`` is a local path, any other string is a hub id.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import Field, field_validator, model_validator

from dmo.configfile import Strict, read_yaml, validate
from dmo.errors import DmoError
from dmo.mixture import Mixture, check_domain_name
from dmo.paths import safe_name

# resolved() keeps the subclass: an ExpertRef stays one
_Ref = TypeVar("_Ref", bound="ModelRef")
_Expert = TypeVar("_Expert", bound="ExpertRef")


class ModelRef(Strict):
    """A model or adapter: a local folder or a hub id (hub ids are only resolved when the user allows it)."""

    #: a local folder (relative to the manifest)
    path: Path | None = None
    #: a model hub id, ``org/name``
    hub: str | None = None
    #: the hub revision (default: main)
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

    def resolved(self: _Ref, root: Path) -> _Ref:
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

    #: the expert's diagonal Fisher weights (relative to the manifest; default: where ``dmo fisher`` writes them)
    fisher: Path | None = None

    def resolved(self: _Expert, root: Path) -> _Expert:
        out = super().resolved(root)
        if self.fisher is None:
            return out
        return out.model_copy(update={"fisher": (root / self.fisher.expanduser()).resolve()})


class TrainedRef(Strict):
    """A model trained on an actual mixture: the ground truth a proxy is compared with."""

    #: the mixture it was trained on, ``{domain: weight}``
    mixture: dict[str, float]
    #: its training seed
    seed: int = 0
    #: its folder (relative to the manifest)
    path: Path | None = None
    #: or its hub id
    hub: str | None = None

    def ref(self) -> ModelRef:
        return ModelRef(path=self.path, hub=self.hub)


class ExpertManifest(Strict):
    """One base model and one expert per domain, all trained the same way (``kind``, ``budget``)."""

    #: the manifest's name
    name: str
    #: the base model the experts were fine-tuned from
    base: ModelRef
    #: how the experts were trained: LoRA adapters or full fine-tunes
    kind: Literal["lora", "full"] = "lora"
    budget: int | None = Field(default=None, gt=0, description="training samples per expert")
    #: one expert per domain, ``{domain: reference}``
    experts: dict[str, ExpertRef]
    #: the models trained on mixtures: the ground truth a proxy is compared with
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


def load_manifest(path: str | Path, check_paths: bool = True) -> ExpertManifest:
    """Read an expert manifest; local paths become absolute and, with ``check_paths``, must exist."""
    path = Path(path)
    manifest: ExpertManifest = validate(ExpertManifest, read_yaml(path), str(path))
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
    (:func:`dmo.groundtruth.fisher_weights.record_in_manifest` writes it atomically).
    """
    path = Path(path)
    before = validate(ExpertManifest, read_yaml(path), str(path))
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
    after = validate(ExpertManifest, data, str(path))
    same = {d: r.model_copy(update={field: getattr(before.experts[d], field)}) if d in values else r
            for d, r in after.experts.items()}  # fmt: skip
    if after.model_copy(update={"experts": same}) != before or any(
        str(getattr(after.experts[d], field)) != str(Path(v)) for d, v in values.items()
    ):
        raise DmoError(f"{path}: cannot add {field} paths to this layout safely")
    return text
