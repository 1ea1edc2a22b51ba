"""Plans of a streaming merge: for each output tensor, how to compute it from the base and the experts (linear
sums of dense deltas and LoRA products, RobustMerge, chunked and whole-tensor methods, per-expert extra inputs).
:mod:`dmo.merge.stream` runs them.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from dmo.errors import DmoError
from dmo.merge.checkpoint import (
    Checkpoint,
    OutTensor,
    TensorInfo,
)
from dmo.merge.experts import Expert, map_names
from dmo.merge.lora import LoraModule
from dmo.merge.registry import Chunked, MergeMethod, stack_extra

#: |1 - scale * sum of the full experts' weights| below which the base term is dropped (its effect would be
#: below 1e-12 of the base value, far under float32 rounding).
EXACT = 1e-12


# --------------------------------------------------------------------------------------------------------- plans


@dataclass
class Term:
    """``coef * value`` where value is a view of a checkpoint tensor (or an in-memory tensor)."""

    coef: float
    who: str  # "the base" / "expert 'ocr'" (for messages)
    info: TensorInfo | None
    source: Checkpoint | None
    tensor: Tensor | None = None
    file: Path | None = None

    def flat(self) -> Tensor:
        t = self.tensor if self.tensor is not None else self.source.view(self.info.name)  # type: ignore[union-attr]
        return t.reshape(-1)


@dataclass
class Plan:
    """How to produce one output tensor."""

    name: str
    base: TensorInfo
    out: OutTensor
    mode: Literal["copy", "linear", "chunked", "whole"]
    terms: list[Term] = field(default_factory=list)
    #: mode "chunked": each merged expert's value of this parameter, in order, and the method's chunked form
    values: list[_Value] = field(default_factory=list)
    chunked: Callable[[], Chunked] | None = None
    _chunker: Chunked | None = None
    #: builds (B, A) float32 such that the LoRA part of the chunk of rows [r0, r1) is B[r0:r1] @ A
    lora: Callable[[], tuple[Tensor, Tensor]] | None = None
    #: computes the merged float32 tensor (mode "whole")
    whole: Callable[[torch.device], Tensor] | None = None
    #: bytes a "whole" computation reads
    read_bytes: int = 0
    _factors: tuple[Tensor, Tensor] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _pending: int = 0

    @property
    def numel(self) -> int:
        return self.base.numel

    @property
    def cols(self) -> int:
        lora = self.lora is not None or any(v.lora is not None for v in self.values)
        return self.base.shape[-1] if lora else 1

    def factors(self, device: torch.device) -> tuple[Tensor, Tensor]:
        with self._lock:
            if self._factors is None:
                assert self.lora is not None
                b, a = self.lora()
                self._factors = (b.to(device=device, dtype=torch.float32), a.to(device=device, dtype=torch.float32))
            return self._factors


def _lora_stack(blocks: Sequence[tuple[float, LoraModule]]) -> Callable[[], tuple[Tensor, Tensor]]:
    """B = [c_1 B_1, ..., c_K B_K] and A = [A_1; ...; A_K] in float32 (built on first use)."""

    def build() -> tuple[Tensor, Tensor]:
        out_f, in_f = blocks[0][1].shape
        rank = sum(m.rank for _, m in blocks)
        b = torch.empty(out_f, rank)
        a = torch.empty(rank, in_f)
        start = 0
        for coef, m in blocks:
            stop = start + m.rank
            b[:, start:stop].copy_(m.b).mul_(coef)
            a[start:stop].copy_(m.a)
            start = stop
        return b, a

    return build


def output_dtype(info: TensorInfo, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is None or not info.dtype.is_floating_point:
        return info.dtype
    return dtype


def plan_linear(
    name: str, base: Checkpoint, experts: Sequence[Expert], coefficients: Mapping[str, float]
) -> tuple[Literal["copy", "linear"], list[Term], Callable[[], tuple[Tensor, Tensor]] | None]:
    """``base + sum_i c_i (theta_i - base)``, ``c_i = coefficients[expert]``, as a sum of terms and LoRA factors."""
    info = base.tensors[name]
    terms: list[Term] = []
    full_sum = 0.0
    blocks: list[tuple[float, LoraModule]] = []
    for e in experts:
        coef = coefficients[e.name]
        if e.checkpoint is not None:
            terms.append(Term(coef, e.what, e.checkpoint.tensors[name], e.checkpoint))
            full_sum += coef
        if name in e.extra:
            terms.append(Term(coef, e.what, info, None, tensor=e.extra[name], file=e.folder))
            full_sum += coef
        if name in e.modules:
            m = e.modules[name]
            blocks.append((coef * m.scale, m))
    if not terms and not blocks:
        return "copy", [], None
    c = 1.0 - full_sum
    if abs(c) > EXACT:
        terms.insert(0, Term(c, "the base", info, base))
    return "linear", terms, (_lora_stack(blocks) if blocks else None)


def plan_robust(
    name: str, base: Checkpoint, experts: Sequence[Expert], method: MergeMethod, params: Mapping[str, Any]
) -> tuple[Literal["copy", "linear"], list[Term], Callable[[], tuple[Tensor, Tensor]] | None]:
    info = base.tensors[name]
    with_module = [e for e in experts if name in e.modules]
    with_extra = [e for e in experts if name in e.extra]
    if with_extra and with_module:
        raise DmoError(f"{with_extra[0].what} saves {name} in full and other experts adapt it with LoRA: "
                       "robustmerge cannot merge the two; exclude it or retrain without saving it")  # fmt: skip
    if with_extra:
        if len(with_extra) != len(experts):
            missing = next(e for e in experts if name not in e.extra)
            raise DmoError(f"{missing.what} does not save {name} although other experts do: robustmerge averages "
                           "non-LoRA trainables and needs them from every expert")  # fmt: skip
        total = sum(e.weight for e in experts)
        terms = [Term(e.weight / total, e.what, info, None, tensor=e.extra[name], file=e.folder) for e in experts]
        return "linear", terms, None
    if not with_module:
        return "copy", [], None
    if len(with_module) != len(experts):
        missing = next(e for e in experts if name not in e.modules)
        raise DmoError(
            f"{missing.what} does not adapt {name} although other experts do: robustmerge needs every expert to "
            "adapt the same modules with the same rank"
        )
    modules = [e.modules[name] for e in experts]
    ranks = {m.rank for m in modules}
    scales = {m.scale for m in modules}
    if len(ranks) > 1 or len(scales) > 1:
        raise DmoError(
            f"the experts adapt {name} with different ranks {sorted(ranks)} or scalings {sorted(scales)}: robustmerge "
            "needs LoRA experts trained with the same r and lora_alpha"
        )
    weights = torch.tensor([e.weight for e in experts], dtype=torch.float32)

    def build() -> tuple[Tensor, Tensor]:
        a = torch.stack([m.a.to(torch.float32) for m in modules])
        b = torch.stack([m.b.to(torch.float32) for m in modules])
        merged_a, merged_b = method.fn(a, b, weights, **params)
        return merged_b.mul_(modules[0].scale), merged_a

    return "linear", [Term(1.0, "the base", info, base)], build


@dataclass
class _Value:
    """One expert's value of one parameter: a full tensor (checkpoint view or saved module) and/or a LoRA delta."""

    full: Term | None
    lora: LoraModule | None
    who: str

    def delta_into(self, out: Tensor, flat: Tensor | None, b32: Tensor, lo: int, cols: int) -> None:
        """``out`` (float32, the chunk ``[lo, lo + len(out))``) = this expert's value minus the base."""
        dev = out.device
        if flat is not None:
            src = flat[lo : lo + out.numel()]
            out.copy_(src if dev.type == "cpu" else src.to(dev, non_blocking=True))
            out.sub_(b32)
        else:
            out.zero_()
        if self.lora is not None:
            m = self.lora
            r0, r1 = lo // cols, (lo + out.numel()) // cols
            b = m.b[r0:r1].to(device=dev, dtype=torch.float32)
            out.view(r1 - r0, cols).addmm_(b, m.a.to(device=dev, dtype=torch.float32), alpha=m.scale)


def plan_chunked(
    name: str, base: Checkpoint, experts: Sequence[Expert], method: MergeMethod, params: Mapping[str, Any]
) -> tuple[list[_Value], list[Term], Callable[[], Chunked]] | None:
    info = base.tensors[name]
    values: list[_Value] = []
    terms = [Term(1.0, "the base", info, base)]
    for e in experts:
        full = None
        if e.checkpoint is not None:
            full = Term(1.0, e.what, e.checkpoint.tensors[name], e.checkpoint)
        elif name in e.extra:
            full = Term(1.0, e.what, info, None, tensor=e.extra[name], file=e.folder)
        if full is not None:
            terms.append(full)
        values.append(_Value(full, e.modules.get(name), e.what))
    if all(v.full is None and v.lora is None for v in values):
        return None
    weights = torch.tensor([e.weight for e in experts], dtype=torch.float32)
    return values, terms, lambda: method.make_chunked(weights, info.numel, name, params)


class ExtraInputs:
    """A method's per-expert inputs (``MergeMethod.extra``, e.g. Fisher weights), memory-mapped from safetensors.

    ``files[key][i]`` is expert ``i``'s checkpoint for input ``key`` and its names by base tensor name.
    """

    def __init__(self, files: dict[str, list[tuple[Checkpoint, dict[str, str]]]], who: list[str]):
        self.files = files
        self.who = who

    @classmethod
    def open(
        cls,
        method: MergeMethod,
        base: Checkpoint,
        experts: Sequence[Expert],
        paths: Mapping[str, Mapping[str, str | os.PathLike[str]]] | None,
    ) -> ExtraInputs | None:
        given = dict(paths or {})
        unknown = [k for k in given if k not in method.extra]
        if unknown:
            takes = f"takes only {', '.join(method.extra)}" if method.extra else "takes no per-expert inputs"
            raise DmoError(f"{unknown[0]} weights given, but merge method {method.name!r} {takes}")
        if not method.extra:
            return None
        files: dict[str, list[tuple[Checkpoint, dict[str, str]]]] = {}
        try:
            for key in method.extra:
                per = given.get(key)
                if per is None:
                    raise DmoError(
                        f"merge method {method.name!r} needs each expert's {key} weights (safetensors, one tensor per "
                        f"merged parameter); none were given"
                    )
                missing = [e.name for e in experts if e.name not in per]
                if missing:
                    raise DmoError(f"no {key} weights given for expert {missing[0]!r}; {method.name} needs them for "
                                   "every expert in the mixture")  # fmt: skip
                files[key] = []
                for e in experts:
                    what = f"the {key} weights of {e.what}"
                    ckpt = open_input_checkpoint(per[e.name], what)
                    try:
                        mapped = map_names(ckpt.tensors, base, what)
                    except BaseException:
                        ckpt.close()
                        raise
                    files[key].append((ckpt, {b: f for f, b in mapped.items()}))
        except BaseException:
            for per_expert in files.values():
                for ckpt, _ in per_expert:
                    ckpt.close()
            raise
        return cls(files, [e.what for e in experts])

    def close(self) -> None:
        for per_expert in self.files.values():
            for ckpt, _ in per_expert:
                ckpt.close()

    def check(self, param: str, shape: Sequence[int]) -> None:
        """Refuse, before anything is written, inputs that lack ``param`` or give it another shape."""
        for key, per_expert in self.files.items():
            for (ckpt, names), who in zip(per_expert, self.who):
                if param not in names:
                    raise DmoError(
                        f"the {key} weights of {who} ({ckpt.folder}) have no tensor for {param}: they were computed "
                        "for another model or another set of parameters; recompute them"
                    )
                info = ckpt.tensors[names[param]]
                if tuple(info.shape) != tuple(shape):
                    raise DmoError(
                        f"the {key} weights of {who} give {param} the shape {list(info.shape)} in {info.file}, but the "
                        f"base has {list(shape)}: they were computed for another model; recompute them"
                    )

    def views(self, key: str, param: str) -> list[Tensor | None]:
        return [ckpt.view(names[param]) if param in names else None for ckpt, names in self.files[key]]

    def stacked(self, param: str, shape: Sequence[int], device: torch.device) -> dict[str, Tensor]:
        return {key: stack_extra(key, param, shape, self.views(key, param), device, self.who) for key in self.files}

    def prepare(self, method: MergeMethod, params: Sequence[str]) -> tuple[dict[str, Any], int]:
        """The method's model-wide statistics over ``params`` and the bytes read for them."""
        if method.prepare is None:
            return {}, 0
        data = {
            key: [{p: ckpt.view(names[p]) for p in params if p in names} for ckpt, names in per_expert]
            for key, per_expert in self.files.items()
        }
        nbytes = sum(
            ckpt.tensors[names[p]].nbytes
            for per_expert in self.files.values()
            for ckpt, names in per_expert
            for p in params
            if p in names
        )
        return dict(method.prepare(data)), nbytes

    def nbytes(self, param: str) -> int:
        return sum(ckpt.tensors[n[param]].nbytes for per in self.files.values() for ckpt, n in per if param in n)


def open_input_checkpoint(path: str | os.PathLike[str], what: str) -> Checkpoint:
    """A folder of safetensors, or one ``.safetensors`` file."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        from dmo.merge.checkpoint import read_header

        return Checkpoint(path.parent, read_header(path)[0], what=what)
    return Checkpoint.open(path, what=what)


def plan_whole(
    name: str,
    base: Checkpoint,
    experts: Sequence[Expert],
    method: MergeMethod,
    params: Mapping[str, Any],
    extra: ExtraInputs | None = None,
    prepared: Mapping[str, Any] | None = None,
) -> Callable[[torch.device], Tensor] | None:
    """``prepared`` (the method's model-wide statistics) may still be filled in after planning, before running."""
    if not any(e.checkpoint is not None or name in e.modules or name in e.extra for e in experts):
        return None
    info = base.tensors[name]
    if extra is not None:
        extra.check(name, info.shape)
    weights = torch.tensor([e.weight for e in experts], dtype=torch.float32)

    def compute(device: torch.device) -> Tensor:
        b32 = base.view(name).to(device=device, dtype=torch.float32)
        deltas = torch.zeros((len(experts), *info.shape), dtype=torch.float32, device=device)
        for i, e in enumerate(experts):
            if e.checkpoint is not None:
                deltas[i].copy_(e.checkpoint.view(name))
                deltas[i] -= b32
            if name in e.extra:
                deltas[i].copy_(e.extra[name])
                deltas[i] -= b32
            if name in e.modules:
                m = e.modules[name]
                b_, a_ = m.b.to(device, torch.float32), m.a.to(device, torch.float32)
                deltas[i].view(b_.shape[0], a_.shape[1]).addmm_(b_, a_, alpha=m.scale)
        inputs: dict[str, Any] = {"name": name} if method.takes_name else {}
        inputs |= dict(prepared or {})
        if extra is not None:
            inputs |= extra.stacked(name, info.shape, device)
        merged = method.fn(deltas, weights.to(device), **params, **inputs)
        del deltas, inputs
        return merged.add_(b32)

    return compute


def plan_tensor(
    target: OutTensor,
    base: Checkpoint,
    experts: Sequence[Expert],
    method: MergeMethod,
    params: Mapping[str, Any],
    keep: Callable[[str], bool],
    extra: ExtraInputs | None = None,
    prepared: Mapping[str, Any] | None = None,
) -> Plan:
    """How to produce output tensor ``target``: a copy of the base (not floating, not kept by ``keep``, or changed
    by no expert), else the method's streaming form: a weighted sum (the linear methods), RobustMerge's merged
    factors, the method's chunked form, or the whole tensor at once."""
    name = target.name
    info = base.tensors[name]
    plan = Plan(name, info, target, "copy", [Term(1.0, "the base", info, base)])
    if not info.dtype.is_floating_point or not keep(name):
        return plan
    coefficients = method.linear_coefficients({e.name: e.weight for e in experts}, params)
    if coefficients is not None:
        mode, terms, lora = plan_linear(name, base, experts, coefficients)
        if mode == "linear":
            plan.mode, plan.terms, plan.lora = mode, terms, lora
    elif method.inputs == "lora":
        mode, terms, lora = plan_robust(name, base, experts, method, params)
        if mode == "linear":
            plan.mode, plan.terms, plan.lora = mode, terms, lora
    elif method.chunked is not None:
        planned = plan_chunked(name, base, experts, method, params)
        if planned is not None:
            plan.mode = "chunked"
            plan.values, plan.terms, plan.chunked = planned
    else:
        whole = plan_whole(name, base, experts, method, params, extra, prepared)
        if whole is not None:
            plan.mode, plan.whole = "whole", whole
            plan.read_bytes = info.nbytes + sum(
                e.checkpoint.tensors[name].nbytes for e in experts if e.checkpoint is not None
            )
            plan.read_bytes += extra.nbytes(name) if extra is not None else 0
    return plan
