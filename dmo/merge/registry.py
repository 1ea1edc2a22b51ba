"""Merge methods by name, defined as pure functions over one parameter's stacked task vectors.

In the style of mergekit's ``@merge_method``: a method receives ``deltas`` of shape ``(K, *param_shape)`` (float32
task vectors ``s_i B_i @ A_i`` of the K experts, zeros where an expert does not adapt the parameter), the mixture
``weights`` of shape ``(K,)`` and keyword parameters, and returns the merged delta of shape ``param_shape``.
:func:`merge_deltas` runs a method parameter by parameter. ``linear`` is registered here; TIES, DARE and
RobustMerge are meant to be added as their own modules with the same decorator.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dmo.errors import DmoError

MergeFn = Callable[..., Tensor]

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: MergeFn
    description: str
    #: True when the merge equals the concatenated LoRA proxy, so it can be served as an adapter without densifying
    lora_exact: bool


_METHODS: dict[str, MergeMethod] = {}


def merge_method(name: str, *, description: str = "", lora_exact: bool = False) -> Callable[[MergeFn], MergeFn]:
    """Register ``fn(deltas, weights, **params) -> Tensor`` under ``name``; the function is returned unchanged."""
    if not _NAME.match(name):
        raise DmoError(f"invalid merge method name {name!r}: use lower-case letters, digits and '_'")

    def register(fn: MergeFn) -> MergeFn:
        if name in _METHODS and _METHODS[name].fn is not fn:
            raise DmoError(f"merge method {name!r} is registered twice; pick another name")
        doc = (fn.__doc__ or "").strip().splitlines()
        _METHODS[name] = MergeMethod(name, fn, description or (doc[0] if doc else ""), lora_exact)
        return fn

    return register


def get_method(name: str) -> MergeMethod:
    try:
        return _METHODS[name]
    except KeyError:
        raise DmoError(f"unknown merge method {name!r}; available: {', '.join(method_names())}") from None


def method_names() -> tuple[str, ...]:
    return tuple(sorted(_METHODS))


def merge_deltas(
    method: str, task_vectors: Sequence[Mapping[str, Tensor]], weights: Sequence[float], **params: Any
) -> dict[str, Tensor]:
    """Merge K experts' dense task vectors parameter by parameter with a registered method.

    Parameters adapted by only some experts get zero task vectors for the others. Returns float32 deltas.
    """
    fn = get_method(method).fn
    if len(task_vectors) != len(weights):
        raise DmoError(f"{len(task_vectors)} experts but {len(weights)} weights")
    if not task_vectors:
        raise DmoError("no experts to merge")
    w = torch.tensor([float(x) for x in weights], dtype=torch.float32)
    out: dict[str, Tensor] = {}
    for param in sorted(set().union(*task_vectors)):
        present = [tv[param] for tv in task_vectors if param in tv]
        shape = present[0].shape
        if any(t.shape != shape for t in present):
            raise DmoError(f"experts disagree on the shape of {param}: they were trained on different bases")
        stacked = torch.stack(
            [tv[param].to(torch.float32) if param in tv else torch.zeros(shape) for tv in task_vectors]
        )
        out[param] = fn(stacked, w, **params)
    return out


@merge_method("linear", lora_exact=True)
def linear(deltas: Tensor, weights: Tensor) -> Tensor:
    """Task arithmetic: sum_i w_i * delta_i (weights are used as given, not renormalised)."""
    return torch.tensordot(weights.to(deltas.dtype), deltas, dims=1)
