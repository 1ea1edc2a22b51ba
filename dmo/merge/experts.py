"""The experts of a streaming merge: opened lazily (full checkpoints and LoRA adapters), checked against the base,
and the filter of which tensors are merged. Kept apart from the planning and running of :mod:`dmo.merge.stream`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dmo.errors import DmoError
from dmo.manifest import FinetuneKind
from dmo.merge.checkpoint import (
    Checkpoint,
)
from dmo.merge.dense import resolve_names
from dmo.merge.families import check_family
from dmo.merge.lora import LoraAdapter, LoraModule, load_lora
from dmo.merge.names import KeyMap

#: The DMO paper's parameters that keep the base value, by how the experts were trained.
PAPER_EXCLUDE: dict[str, tuple[str, ...]] = {
    "lora": ("visual", "vision_tower", "multi_modal_projector", "embed_tokens", "lm_head", "norm", "bias"),
    "full": (r"visual\.blocks", r"visual\.patch_embed", "vision_tower"),
}


# ------------------------------------------------------------------------------------------------------ experts


@dataclass
class Expert:
    """One expert with a non-zero weight: a full checkpoint or a LoRA adapter."""

    name: str
    folder: Path
    weight: float
    checkpoint: Checkpoint | None = None
    adapter: LoraAdapter | None = None
    #: base tensor name -> LoRA module / non-LoRA value, after name resolution
    modules: dict[str, LoraModule] = field(default_factory=dict)
    extra: dict[str, Tensor] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return "lora" if self.adapter is not None else "full"

    @property
    def what(self) -> str:
        return f"expert {self.name!r}"


def expert_kind(folder: str | os.PathLike[str]) -> FinetuneKind:
    """``"lora"`` for a PEFT adapter folder (``adapter_config.json``), ``"full"`` otherwise."""
    return "lora" if (Path(folder) / "adapter_config.json").is_file() else "full"


def check_weights(names: Sequence[str], weights: Mapping[str, float]) -> dict[str, float]:
    """The non-zero weights, in the experts' order; unknown names and non-finite values are refused."""
    unknown = [k for k in weights if k not in names]
    if unknown:
        raise DmoError(f"weight given for unknown expert {unknown[0]!r}; the experts are {sorted(names)}")
    out = {}
    for name in names:
        w = weights.get(name, 0.0)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise DmoError(f"weight of expert {name!r} is {w!r}: weights must be finite numbers")
        if w != 0:
            out[name] = float(w)
    if not out:
        raise DmoError("all mixture weights are 0: the proxy is the base model itself; use the base model instead")
    return out


def _compile(patterns: Iterable[str] | None, what: str) -> list[re.Pattern[str]] | None:
    if patterns is None:
        return None
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as exc:
            raise DmoError(f"invalid {what} pattern {p!r}: {exc}") from None
    return out


class ParamFilter:
    """Which base tensors a merge changes; the others keep the base value.

    ``include``/``exclude`` are regular expressions searched in the base checkpoint's tensor names (they match the
    live model's names too: those only add a prefix); the default ``exclude`` is the DMO paper's for the experts'
    kind (:data:`PAPER_EXCLUDE`). Build it with :func:`merge_filter`, which every route uses: ``dmo merge``, the live
    merge (:class:`dmo.merge.live.ExpertBank`), the hf backend and both vllm routes.
    """

    def __init__(self, kind: str, include: Iterable[str] | None = None, exclude: Iterable[str] | None = None):
        if kind not in PAPER_EXCLUDE:
            raise DmoError(f"expert kind must be 'lora' or 'full', got {kind!r}")
        self.include = _compile(include, "include")
        self.exclude = _compile(PAPER_EXCLUDE[kind] if exclude is None else exclude, "exclude") or []

    def __call__(self, name: str) -> bool:
        if self.include is not None and not any(p.search(name) for p in self.include):
            return False
        return not any(p.search(name) for p in self.exclude)

    def adapter(self, adapter: LoraAdapter) -> LoraAdapter:
        """``adapter`` without the LoRA modules and non-LoRA trainables this filter keeps at the base value."""
        return dataclasses.replace(
            adapter,
            modules={k: m for k, m in adapter.modules.items() if self(k)},
            extra={k: t for k, t in adapter.extra.items() if self(k)},
        )

    def describe(self) -> dict[str, Any]:
        return {
            "include": None if self.include is None else [p.pattern for p in self.include],
            "exclude": [p.pattern for p in self.exclude],
        }

    def id(self) -> str:
        """A short hash of the patterns: part of a merged target's fingerprint, so a score cached under another
        filter (an older dmo's, or other patterns) is never taken for this one's."""
        blob = json.dumps(self.describe(), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:8]


def merge_filter(
    base: str | os.PathLike[str],
    kind: str,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
) -> ParamFilter:
    """The filter of a merge of ``kind`` experts into ``base``: the paper's unless ``exclude`` is given.

    The paper's patterns name the vision parts of the families dmo knows, so a multimodal base of another family is
    refused then (:func:`dmo.merge.families.check_family`).
    """
    check_family(base, paper_filter=exclude is None)
    return ParamFilter(kind, include, exclude)


def map_names(keys: Iterable[str], base: Checkpoint, what: str) -> dict[str, str]:
    """Adapter parameter names -> base checkpoint names (exactly, else through transformers' renaming rules)."""
    unique = list(dict.fromkeys(keys))
    if not unique:
        return {}
    try:
        return resolve_names(unique, base.tensors.keys(), KeyMap.identity(), what=f"the base model {base.folder}")
    except DmoError as first:
        try:
            keymap = KeyMap.for_config(base.folder)
        except DmoError:
            raise DmoError(f"{what}: {first}") from None
        try:
            return resolve_names(unique, base.tensors.keys(), keymap, what=f"the base model {base.folder}")
        except DmoError as exc:
            raise DmoError(f"{what}: {exc}") from None


def open_experts(
    base: Checkpoint, experts: Mapping[str, str | os.PathLike[str]], weights: Mapping[str, float], allow_bin: bool
) -> list[Expert]:
    """Open and validate the experts with a non-zero weight against the base."""
    out: list[Expert] = []
    try:
        for name, w in weights.items():
            folder = Path(experts[name])
            expert = Expert(name, folder, w)
            out.append(expert)
            if expert_kind(folder) == "lora":
                expert.adapter = load_lora(folder, non_lora=True, allow_bin=allow_bin)
                where = f"expert {name!r} ({folder})"
                mapped = map_names(expert.adapter.modules, base, where)
                expert.modules = {mapped[k]: m for k, m in expert.adapter.modules.items()}
                mapped = map_names(expert.adapter.extra, base, where)
                expert.extra = {mapped[k]: t for k, t in expert.adapter.extra.items()}
                _check_adapter(expert, base)
            else:
                expert.checkpoint = Checkpoint.open(folder, what=expert.what, allow_bin=allow_bin)
                _check_full(expert, base)
    except BaseException:
        close_experts(out)
        raise
    return out


def close_experts(experts: Iterable[Expert]) -> None:
    for e in experts:
        if e.checkpoint is not None:
            e.checkpoint.close()


def _check_full(expert: Expert, base: Checkpoint) -> None:
    assert expert.checkpoint is not None
    mine = expert.checkpoint.tensors
    for name, info in base.tensors.items():
        other = mine.get(name)
        if other is None:
            raise DmoError(
                f"{expert.what} ({expert.folder}) lacks tensor {name}, which the base has in {info.file}: it was "
                "saved from a different model or is incomplete"
            )
        if other.shape != info.shape:
            raise DmoError(
                f"{expert.what}: tensor {name} has shape {list(other.shape)} in {other.file} but {list(info.shape)} "
                f"in the base's {info.file}: the expert was trained on a different base model"
            )
    extra = [n for n in mine if n not in base.tensors]
    if extra:
        raise DmoError(
            f"{expert.what}: tensor {extra[0]} in {mine[extra[0]].file} does not exist in the base model "
            f"{base.folder}: the expert was trained on a different base (or with resized embeddings)"
        )


def _check_adapter(expert: Expert, base: Checkpoint) -> None:
    file = expert.folder / "adapter_model.safetensors"
    for name, module in expert.modules.items():
        info = base.tensors[name]
        if tuple(info.shape) != module.shape:
            raise DmoError(
                f"{expert.what}: {file} adapts {module.module} as a {list(module.shape)} weight but the base tensor "
                f"{name} in {info.file} has shape {list(info.shape)}: the expert was trained on a different base"
            )
    for name, value in expert.extra.items():
        info = base.tensors[name]
        if tuple(info.shape) != tuple(value.shape):
            raise DmoError(
                f"{expert.what}: {file} holds {name} with shape {list(value.shape)} but the base's {info.file} has "
                f"{list(info.shape)}: the expert was trained on a different base"
            )
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise DmoError(f"{expert.what}: tensor {name} in {file} holds NaN or Inf values; fix or drop that expert")
