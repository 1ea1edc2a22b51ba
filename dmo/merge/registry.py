"""Merge methods by name, defined as pure functions over one parameter's stacked task vectors.

In the style of mergekit's ``@merge_method``: a method receives ``deltas`` of shape ``(K, *param_shape)`` (float32
task vectors ``s_i B_i @ A_i`` or ``theta_i - theta_base`` of the K experts, zeros where an expert does not adapt
the parameter), the mixture ``weights`` of shape ``(K,)`` and keyword parameters, and returns the merged delta of
shape ``param_shape``. :func:`merge_deltas` runs a method parameter by parameter.

Methods that merge LoRA *factors* rather than dense deltas (RobustMerge) register with ``inputs="lora"``: their
function takes ``a`` of shape ``(K, r, in)``, ``b`` of shape ``(K, out, r)`` and ``weights`` and returns the merged
``(a, b)``. A method whose function has a ``name`` keyword receives the parameter's name (DARE seeds its masks
with it).

A delta method may also register a *chunked* form (``chunked=`` a :class:`Chunked` subclass): an optional
statistics pass over each expert's flattened delta (chunks in order), then a merge of any chunk of the K deltas on
its own. The streaming engine (:mod:`dmo.merge.stream`) uses it to merge checkpoints with memory bounded by a chunk
(plus what the statistics keep); the plain function is the same computation on one chunk holding the whole tensor.

One module per method: ``linear`` (and its alias ``task_arithmetic``) lives here, ``ties``, ``dare`` (with
``dare_ties``) and ``robustmerge`` in their own modules, imported on first lookup.
"""

from __future__ import annotations

import abc
import importlib
import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from dmo.errors import DmoError

MergeFn = Callable[..., Any]

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
#: Modules that register the built-in methods (imported lazily so that ``import dmo.merge.registry`` stays cheap).
BUILTIN_MODULES = ("dmo.merge.ties", "dmo.merge.dare", "dmo.merge.robustmerge")


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: MergeFn
    description: str
    #: True when the merge equals the concatenated LoRA proxy, so it can be served as an adapter without densifying
    lora_exact: bool
    #: "delta": fn(deltas, weights, **params) -> delta; "lora": fn(a, b, weights, **params) -> (a, b)
    inputs: Literal["delta", "lora"] = "delta"
    #: keyword parameters with their defaults (``name``, filled in by dmo, is not listed)
    defaults: Mapping[str, Any] = field(default_factory=dict)
    #: the function takes the parameter's name as ``name=``
    takes_name: bool = False
    #: chunked form of a delta method (see :class:`Chunked`), or None
    chunked: type[Chunked] | None = None

    def check_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """``params`` validated against the function's keywords: unknown names are refused with the valid ones."""
        unknown = [k for k in params if k not in self.defaults]
        if unknown:
            valid = ", ".join(f"{k}={v!r}" for k, v in self.defaults.items()) or "none"
            raise DmoError(f"merge method {self.name!r} has no parameter {unknown[0]!r}; its parameters: {valid}")
        return dict(params)


class Chunked(abc.ABC):
    """A delta method in chunks: ``observe``/``done`` see each expert's flat delta once (when ``stats``), in order;
    then ``merge`` takes any chunk ``[lo, lo + n)`` of all K deltas, shape (K, n), and may modify it in place."""

    #: whether ``observe``/``done`` must run over every expert before ``merge``
    stats = False

    def __init__(self, weights: Tensor, numel: int, name: str = "", **params: Any):
        self.weights = weights
        self.numel = numel
        self.name = name

    def observe(self, index: int, lo: int, delta: Tensor) -> None:  # noqa: B027 - optional hook, no-op by default
        """Chunk ``[lo, lo + len(delta))`` of expert ``index``'s flat delta (float32)."""

    def done(self, index: int) -> None:  # noqa: B027 - optional hook
        """Expert ``index`` has been observed completely."""

    @abc.abstractmethod
    def merge(self, deltas: Tensor, lo: int) -> Tensor:
        """The merged chunk, shape (n,)."""

    @classmethod
    def whole(cls, deltas: Tensor, weights: Tensor, name: str = "", **params: Any) -> Tensor:
        """The method on whole tensors: one chunk holding everything."""
        k = deltas.shape[0]
        flat = deltas.reshape(k, -1)
        method = cls(weights.to(flat.device), flat.shape[1], name, **params)
        if method.stats:
            for i in range(k):
                method.observe(i, 0, flat[i])
                method.done(i)
        return method.merge(flat.clone(), 0).reshape(deltas.shape[1:])


_METHODS: dict[str, MergeMethod] = {}
_LOADED = False


def merge_method(
    name: str,
    *,
    description: str = "",
    lora_exact: bool = False,
    inputs: Literal["delta", "lora"] = "delta",
    chunked: type[Chunked] | None = None,
) -> Callable[[MergeFn], MergeFn]:
    """Register ``fn(deltas, weights, **params) -> Tensor`` under ``name``; the function is returned unchanged."""
    if not _NAME.match(name):
        raise DmoError(f"invalid merge method name {name!r}: use lower-case letters, digits and '_'")
    if inputs not in ("delta", "lora"):
        raise DmoError(f"merge method {name!r}: inputs must be 'delta' or 'lora', not {inputs!r}")

    def register(fn: MergeFn) -> MergeFn:
        if name in _METHODS and _METHODS[name].fn is not fn:
            raise DmoError(f"merge method {name!r} is registered twice; pick another name")
        doc = (fn.__doc__ or "").strip().splitlines()
        positional = 3 if inputs == "lora" else 2
        sig = inspect.signature(fn)
        params = list(sig.parameters.values())[positional:]
        defaults = {p.name: p.default for p in params if p.name != "name" and p.default is not inspect.Parameter.empty}
        takes_name = "name" in sig.parameters
        _METHODS[name] = MergeMethod(
            name, fn, description or (doc[0] if doc else ""), lora_exact, inputs, defaults, takes_name, chunked
        )
        return fn

    return register


def _load_builtins() -> None:
    global _LOADED
    if not _LOADED:
        _LOADED = True
        for module in BUILTIN_MODULES:
            importlib.import_module(module)


def get_method(name: str) -> MergeMethod:
    _load_builtins()
    try:
        return _METHODS[name]
    except KeyError:
        raise DmoError(f"unknown merge method {name!r}; available: {', '.join(method_names())}") from None


def method_names() -> tuple[str, ...]:
    _load_builtins()
    return tuple(sorted(_METHODS))


def merge_deltas(
    method: str, task_vectors: Sequence[Mapping[str, Tensor]], weights: Sequence[float], **params: Any
) -> dict[str, Tensor]:
    """Merge K experts' dense task vectors parameter by parameter with a registered method.

    Parameters adapted by only some experts get zero task vectors for the others. Returns float32 deltas.
    """
    spec = get_method(method)
    if spec.inputs != "delta":
        raise DmoError(
            f"merge method {method!r} merges LoRA factors, not dense task vectors; "
            "use dmo.merge.stream.merge_checkpoints"
        )
    params = spec.check_params(params)
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
        device = present[0].device
        stacked = torch.stack(
            [tv[param].to(torch.float32) if param in tv else torch.zeros(shape, device=device) for tv in task_vectors]
        )
        extra = {"name": param} if spec.takes_name else {}
        out[param] = spec.fn(stacked, w.to(device), **params, **extra)
    return out


@merge_method("linear", lora_exact=True)
def linear(deltas: Tensor, weights: Tensor, scale: float = 1.0) -> Tensor:
    """Task arithmetic: scale * sum_i w_i * delta_i (weights are used as given, not renormalised)."""
    out = torch.tensordot(weights.to(deltas.dtype), deltas, dims=1)
    return out if scale == 1.0 else out.mul_(scale)


merge_method("task_arithmetic", lora_exact=True, description="Alias of linear: scale * sum_i w_i * delta_i.")(linear)
