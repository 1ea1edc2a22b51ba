"""Expert manifests (``experts/*.yaml``): the base model, one expert per domain, the models trained on mixtures, and
the domain data. Relative paths resolve against the manifest's folder.

A model reference is ``{path: DIR}``, ``{hub: ORG/NAME, revision: REV, subfolder: DIR}``, or a string: a string that
starts with ``./``, ``../``, ``/`` or ``~`` is a local path, any other string is a hub id. Hub models are fetched
through ``huggingface_hub`` into its cache when they are first needed (:mod:`dmo.hub`); loading or validating a
manifest never fetches anything.

``trained:`` lists models trained on mixtures: each one with its ``mixture`` (and ``seed``), or a *collection*: a hub
repository (``{hub: ORG/NAME}``, optionally a ``subfolder`` in it) or a local folder whose folders are models named as
the DMO paper names them (``qwen2_2b_lora_mixed_general-25600++ocr-76800``, ``..._seed1``; :mod:`dmo.paper_names`),
read into trained mixtures, with their weights, when the trained models are first needed. A collection's experts (the
paper's download scripts put them in the same folder) are passed over, and so are mixtures over domains the manifest
has no expert for.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import Field, field_validator, model_validator

from dmo.configfile import Strict, read_yaml, validate
from dmo.errors import DmoError
from dmo.mixture import Mixture, check_domain_name
from dmo.paths import safe_name

#: How an expert or a trained mixture was fine-tuned: a LoRA adapter or every weight.
FinetuneKind = Literal["lora", "full"]

# resolved() keeps the subclass: an ExpertRef stays one
_Ref = TypeVar("_Ref", bound="ModelRef")
_Expert = TypeVar("_Expert", bound="ExpertRef")


class ModelRef(Strict):
    """A model or adapter: a local folder, or a hub repository (or a folder in it), fetched when first needed."""

    #: a local folder (relative to the manifest)
    path: Path | None = None
    #: a hub repository, ``org/name``, fetched through huggingface_hub into its cache when first needed
    hub: str | None = None
    #: the hub revision (default: main)
    revision: str | None = None
    #: a folder inside the hub repository that holds the model (only with ``hub``)
    subfolder: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return _string_ref(value)

    @model_validator(mode="after")
    def _one_source(self) -> ModelRef:
        _check_source(self.path, self.hub, self.subfolder)
        return self

    def resolved(self: _Ref, root: Path) -> _Ref:
        if self.path is None:
            return self
        return self.model_copy(update={"path": (root / self.path.expanduser()).resolve()})

    def local(self, what: str) -> Path:
        """The model's folder: its ``path``, or its hub files, fetched into the hub cache the first time."""
        if self.path is not None:
            return Path(self.path)
        assert self.hub is not None
        from dmo.hub import HubError, fetch

        try:
            return fetch(self.hub, self.revision, self.subfolder)
        except HubError as exc:
            raise type(exc)(f"{what}: {exc}") from None

    @property
    def identity(self) -> str:
        """The model's name as an adapter trained on it records it (``base_model_name_or_path``): the folder, or the
        hub id (and folder in it), never the hub cache's snapshot folder it is fetched into."""
        if self.path is not None:
            return str(self.path)
        return f"{self.hub}/{self.subfolder.strip('/')}" if self.subfolder else str(self.hub)

    def __str__(self) -> str:
        if self.path is not None:
            return str(self.path)
        return f"{self.hub}@{self.revision or 'main'}" + (f"/{self.subfolder}" if self.subfolder else "")


def _string_ref(value: Any) -> Any:
    if isinstance(value, (str, Path)):
        text = str(value)
        if text.startswith(("./", "../", "/", "~")) or isinstance(value, Path):
            return {"path": text}
        return {"hub": text}
    return value


def _check_source(path: Path | None, hub: str | None, subfolder: str | None) -> None:
    if (path is None) == (hub is None):
        raise ValueError("give exactly one of 'path' or 'hub'")
    if path is not None and subfolder is not None:
        raise ValueError("'subfolder' goes with 'hub'; for a local folder, name it in 'path'")
    if subfolder is not None and (not subfolder.strip("/") or ".." in Path(subfolder).parts):
        raise ValueError(f"subfolder {subfolder!r} must be a folder inside the repository")


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


class TrainedRef(ModelRef):
    """A model trained on an actual mixture (the ground truth a proxy is compared with): with ``mixture``, one model;
    without, a collection of models named as the DMO paper names them (see the module docstring). Its source
    (``path``, or ``hub`` with ``revision`` and ``subfolder``) is the model's folder, or the collection's."""

    #: the mixture it was trained on, ``{domain: weight}``; without it, the entry is a collection of models named
    #: as the DMO paper names them (``<model>_mixed_general-25600++ocr-76800``), read into mixtures by their names
    mixture: dict[str, float] | None = None
    #: its training seed (default 0; a collection reads each model's seed from its name)
    seed: int | None = None

    @model_validator(mode="after")
    def _one_source(self) -> TrainedRef:  # replaces ModelRef's, which it extends
        _check_source(self.path, self.hub, self.subfolder)
        if self.mixture is None and self.seed is not None:
            raise ValueError("a collection of trained models (no 'mixture') reads each model's seed from its name")
        return self

    @property
    def is_collection(self) -> bool:
        return self.mixture is None

    def ref(self) -> ModelRef:
        return ModelRef(path=self.path, hub=self.hub, revision=self.revision, subfolder=self.subfolder)

    def where(self) -> str:
        return str(self.ref())


class ExpertManifest(Strict):
    """One base model and one expert per domain, all trained the same way (``kind``, ``budget``)."""

    #: the manifest's name
    name: str
    #: the base model the experts were fine-tuned from
    base: ModelRef
    #: how the experts were trained: LoRA adapters or full fine-tunes
    kind: FinetuneKind = "lora"
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

    @field_validator("trained", mode="before")
    @classmethod
    def _one_collection(cls, v: Any) -> Any:
        return v if isinstance(v, list) or v is None else [v]  # ``trained: ORG/NAME``: one collection

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
        """Every model trained on a mixture: its mixture (over the manifest's domains), seed and reference; the
        collections are listed here (a hub repository once per process), and a (mixture, seed) twice is refused."""
        out: list[tuple[Mixture, int, ModelRef]] = []
        seen: dict[tuple[str, int], str] = {}
        for t in self.trained:
            for mixture, seed, ref in self._models(t):
                key = (mixture.id, seed)
                if key in seen:
                    raise DmoError(
                        f"manifest {self.name!r} lists two models trained on {mixture.id} with seed {seed} "
                        f"({seen[key]} and {ref}): keep one"
                    )
                seen[key] = str(ref)
                out.append((mixture, seed, ref))
        return out

    def _models(self, t: TrainedRef) -> Iterator[tuple[Mixture, int, ModelRef]]:
        if t.mixture is not None:
            yield Mixture.from_mapping(t.mixture, self.domains), t.seed or 0, t.ref()
            return
        from dmo.paper_names import trained_folder

        for name in _collection_folders(t):
            found = trained_folder(name, None, self.budget)
            if found is None:  # one of the paper's experts
                continue
            mixture, seed = found
            if any(d not in self.domains for d in mixture.domains):
                continue  # trained on a domain this manifest has no expert for
            mixture = Mixture.from_mapping(mixture.as_dict(), self.domains, tolerance=mixture.tolerance)
            if t.path is not None:
                yield mixture, seed, ModelRef(path=Path(t.path) / name)
            else:
                sub = f"{t.subfolder.strip('/')}/{name}" if t.subfolder else name
                yield mixture, seed, ModelRef(hub=t.hub, revision=t.revision, subfolder=sub)


def load_manifest(path: str | Path, check_paths: bool = True) -> ExpertManifest:
    """Read an expert manifest; local paths become absolute and, with ``check_paths``, must exist."""
    path = Path(path)
    manifest: ExpertManifest = validate(ExpertManifest, read_yaml(path), str(path))
    root = path.parent.resolve()
    base = manifest.base.resolved(root)
    experts = {d: r.resolved(root) for d, r in manifest.experts.items()}
    trained = [t.resolved(root) for t in manifest.trained]
    data = (root / manifest.data.expanduser()).resolve() if manifest.data is not None else None
    manifest = manifest.model_copy(update={"base": base, "experts": experts, "trained": trained, "data": data})
    if check_paths:
        for what, ref in [("base", base), *((f"expert {d!r}", r) for d, r in experts.items())]:
            if ref.path is not None and not ref.path.is_dir():
                raise DmoError(f"{path}: {what} points at missing folder {ref.path}: fix the path or build it first")
    for t in manifest.trained:
        if t.mixture is None:
            continue  # a collection: listed when its models are first needed
        try:
            Mixture.from_mapping(t.mixture, manifest.domains)
        except DmoError as exc:
            raise DmoError(f"{path}: trained: {exc}") from None
    return manifest


def _collection_folders(t: TrainedRef) -> list[str]:
    """The folders of a collection of trained models: listed on the hub (or its cache), or on disk."""
    if t.hub is not None:
        from dmo.hub import HubError, list_folders

        try:
            return list_folders(t.hub, t.revision, t.subfolder)
        except HubError as exc:
            raise type(exc)(f"trained models: {exc}") from None
    assert t.path is not None
    folder = Path(t.path)
    if not folder.is_dir():
        raise DmoError(f"trained models: {folder} is not a folder: fix the manifest's 'trained:' path")
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


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
