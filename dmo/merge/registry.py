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
The function's signature is the one place where a method's parameters and defaults are declared: the chunked form
takes the same keyword parameters without defaults (checked at registration) and is built with
:meth:`MergeMethod.make_chunked`, which fills in the function's defaults.

What the rest of dmo needs to know about a method is a field of its entry, never a list of names: whether the merge
is a weighted sum of the task vectors (``adapter_coefficients``, :meth:`MergeMethod.linear_coefficients`: streamed as
a sum, served as one concatenated LoRA adapter), whether one expert merges into itself
(:attr:`MergeMethod.expert_at_vertex`), its chunked form, its extra inputs.

A chunked form may also ask for a *joint* pass (``joint = True``): after the statistics pass, ``observe_all`` sees
every chunk of all K deltas together once (the paper's TIES needs one number over the whole tensor, its majority
sign, before any chunk can be merged).

Methods that need more per-expert inputs than the deltas (Fisher merging's diagonal Fisher weights) name them with
``extra=``: the function takes them as keyword arguments (stacked like the deltas), :func:`merge_deltas` takes
them with ``extra=``, and they are not user parameters. A method whose computation needs a statistic over *all*
merged parameters (Fisher merging's per-expert norm) registers ``prepare=``: it receives the extra inputs of every
merged parameter once (per expert, name -> tensor) and returns keyword arguments for every call.

Mixture weights: every method takes them. Methods that the DMO paper's code runs without its coefficients (TIES,
DARE, DARE-TIES, TSV, Iso-C, WUDI) have a ``weighted`` parameter: ``True`` (the default) is dmo's weighted form,
``False`` the paper's: every expert present in the mixture (weight != 0) counts alike. :data:`PAPER_PARAMS` holds,
per method, the parameters that reproduce the paper's ``merge_models``.

One module per method: ``linear`` (and its alias ``task_arithmetic``) and ``weight_average`` live here, ``ties``,
``dare`` (with ``dare_ties``), ``robustmerge``, ``spectral`` (``svd``, ``iso``), ``wudi`` (``wudi``, ``wudi2``) and
``fisher`` (``fisher``, ``fisher_nn``) in their own modules, imported on first lookup.
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
Prepare = Callable[[Mapping[str, Sequence[Mapping[str, Tensor]]]], Mapping[str, Any]]
AdapterCoefficients = Callable[[Mapping[str, float], Mapping[str, Any]], dict[str, float]]

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
#: Modules that register the built-in methods (imported lazily so that ``import dmo.merge.registry`` stays cheap).
BUILTIN_MODULES = (
    "dmo.merge.ties",
    "dmo.merge.dare",
    "dmo.merge.robustmerge",
    "dmo.merge.spectral",
    "dmo.merge.wudi",
    "dmo.merge.fisher_merge",
)
#: Per method, the parameters with which dmo reproduces the DMO paper's ``merge_models`` (mLLMs_merging_4_DMO's
#: ``model_merging.py``; the paper's coefficients come from :meth:`dmo.mixture.Mixture.rounded_to_budget`). Its
#: ``task_arithmetic`` and ``weight_average`` are dmo's defaults; ``dare`` is its ``dare_ta``; its ``svd`` applies
#: TSV only to ``lm_head.weight`` and averages every other tensor (``scope: lm_head``).
PAPER_PARAMS: dict[str, dict[str, Any]] = {
    "task_arithmetic": {},
    "weight_average": {},
    "ties": {"weighted": False, "density": 0.2},
    "dare": {"weighted": False, "drop_rate": 0.2, "rescale": "inverse"},
    "dare_ties": {"weighted": False, "drop_rate": 0.2, "rescale": "inverse", "density": 0.2},
    "svd": {"weighted": False, "scope": "lm_head"},
    "iso": {"weighted": False},
    "wudi": {"weighted": False},
    "wudi2": {"weighted": False},
    "fisher": {},
    "fisher_nn": {},
}


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: MergeFn
    description: str
    #: For LoRA experts, each expert's coefficient in the concatenated adapter that equals this merge exactly
    #: (``coefficients(weights, params)``), or None when the merge is no weighted sum of the experts' ``s B A``
    adapter_coefficients: AdapterCoefficients | None
    #: "delta": fn(deltas, weights, **params) -> delta; "lora": fn(a, b, weights, **params) -> (a, b)
    inputs: Literal["delta", "lora"] = "delta"
    #: keyword parameters with their defaults (``name``, filled in by dmo, is not listed)
    defaults: Mapping[str, Any] = field(default_factory=dict)
    #: the function takes the parameter's name as ``name=``
    takes_name: bool = False
    #: chunked form of a delta method (see :class:`Chunked`), or None
    chunked: type[Chunked] | None = None
    #: per-expert inputs besides the deltas, passed stacked as keyword arguments (e.g. ``("fisher",)``)
    extra: tuple[str, ...] = ()
    #: model-wide statistics from the extra inputs: ``prepare({key: [per-expert {param: tensor}]}) -> kwargs``
    prepare: Prepare | None = None

    @property
    def lora_exact(self) -> bool:
        """Whether the merge is a weighted sum of the task vectors (``adapter_coefficients`` gives the weights): LoRA
        experts then merge exactly into their concatenated adapter (served as one, never densified) and the streaming
        merge accumulates the inputs block by block."""
        return self.adapter_coefficients is not None

    @property
    def expert_at_vertex(self) -> bool:
        """Whether the merge of one expert with weight 1 is that expert, with the default parameters."""
        if self.adapter_coefficients is None:
            return False
        return self.linear_coefficients({"expert": 1.0}, {}) == {"expert": 1.0}

    def linear_coefficients(self, weights: Mapping[str, float], params: Mapping[str, Any]) -> dict[str, float] | None:
        """Each expert's coefficient when the merge is a weighted sum of the task vectors, else None."""
        if self.adapter_coefficients is None:
            return None
        return self.adapter_coefficients(weights, {**self.defaults, **params})

    def make_chunked(self, weights: Tensor, numel: int, name: str, params: Mapping[str, Any]) -> Chunked:
        """The chunked form for one parameter, with the function's defaults for the parameters not given."""
        if self.chunked is None:
            raise DmoError(f"merge method {self.name!r} has no chunked form")
        named = {"name": name} if self.takes_name else {}
        return self.chunked(weights, numel, **named, **{**self.defaults, **params})

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
    #: whether ``observe_all`` must see every chunk of all K deltas (after the statistics pass) before ``merge``
    joint = False

    def __init__(self, weights: Tensor, numel: int, name: str = ""):
        self.weights = weights
        self.numel = numel
        self.name = name

    def observe(self, index: int, lo: int, delta: Tensor) -> None:  # noqa: B027 - optional hook, no-op by default
        """Chunk ``[lo, lo + len(delta))`` of expert ``index``'s flat delta (float32)."""

    def done(self, index: int) -> None:  # noqa: B027 - optional hook
        """Expert ``index`` has been observed completely."""

    def observe_all(self, deltas: Tensor, lo: int) -> None:  # noqa: B027 - optional hook
        """Chunk ``[lo, lo + n)`` of all K flat deltas, shape (K, n) (when ``joint``); may modify it in place."""

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
        if method.joint:
            method.observe_all(flat.clone(), 0)
        return method.merge(flat.clone(), 0).reshape(deltas.shape[1:])


_METHODS: dict[str, MergeMethod] = {}
_LOADED = False


def merge_method(
    name: str,
    *,
    description: str = "",
    adapter_coefficients: AdapterCoefficients | None = None,
    inputs: Literal["delta", "lora"] = "delta",
    chunked: type[Chunked] | None = None,
    extra: tuple[str, ...] = (),
    prepare: Prepare | None = None,
) -> Callable[[MergeFn], MergeFn]:
    """Register ``fn(deltas, weights, **params) -> Tensor`` under ``name``; the function is returned unchanged.

    ``extra`` names keyword arguments that are per-expert inputs (stacked like the deltas), not parameters.
    """
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
        missing = [x for x in extra if x not in sig.parameters]
        if missing:
            raise DmoError(f"merge method {name!r}: its function has no argument {missing[0]!r} for extra=")
        defaults = {
            p.name: p.default
            for p in params
            if p.name != "name" and p.name not in extra and p.default is not inspect.Parameter.empty
        }
        takes_name = "name" in sig.parameters
        if chunked is not None:
            _check_chunked(name, chunked, defaults)
        _METHODS[name] = MergeMethod(
            name, fn, description or (doc[0] if doc else ""), adapter_coefficients, inputs, defaults, takes_name,
            chunked, tuple(extra), prepare,
        )  # fmt: skip
        return fn

    return register


def _check_chunked(name: str, chunked: type[Chunked], defaults: Mapping[str, Any]) -> None:
    """The chunked form takes exactly the function's parameters, without defaults of its own: the function's
    signature is the one place where a method's parameters and defaults are declared."""
    params: dict[str, inspect.Parameter] = {}
    for cls in chunked.__mro__:  # a subclass passing **params on to its base takes the base's parameters too
        if "__init__" not in vars(cls):
            continue
        own = list(inspect.signature(vars(cls)["__init__"]).parameters.values())[3:]  # self, weights, numel
        params |= {p.name: p for p in own if p.name != "name" and p.kind is not inspect.Parameter.VAR_KEYWORD}
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in own):
            break
    if set(params) != set(defaults):
        raise DmoError(
            f"merge method {name!r}: its chunked form {chunked.__name__} takes {sorted(params)} but its function "
            f"{sorted(defaults)}; give both the same parameters"
        )
    with_default = [p for p in params.values() if p.default is not inspect.Parameter.empty]
    if with_default:
        raise DmoError(
            f"merge method {name!r}: {chunked.__name__} gives {with_default[0].name!r} a default of its own; "
            "declare defaults once, in the method's function"
        )


def expert_at_vertex_methods() -> tuple[str, ...]:
    """The methods whose one-expert merge is the expert itself (a proxy at a simplex vertex scores as the expert)."""
    return tuple(m for m in method_names() if get_method(m).expert_at_vertex)


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
    method: str,
    task_vectors: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float],
    *,
    extra: Mapping[str, Sequence[Mapping[str, Tensor]]] | None = None,
    **params: Any,
) -> dict[str, Tensor]:
    """Merge K experts' dense task vectors parameter by parameter with a registered method.

    Parameters adapted by only some experts get zero task vectors for the others. ``extra`` holds the per-expert
    inputs a method names in ``extra=`` (e.g. ``{"fisher": [fisher_of_expert_0, ...]}``, one dict per expert, each
    with every parameter merged). Returns float32 deltas.
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
    extra = dict(extra or {})
    for key in spec.extra:
        per_expert = extra.get(key)
        if per_expert is None or len(per_expert) != len(task_vectors):
            raise DmoError(
                f"merge method {method!r} needs extra={{{key!r}: [...]}}: one dict of tensors per expert "
                f"({len(task_vectors)})"
            )
    unknown = [k for k in extra if k not in spec.extra]
    if unknown:
        raise DmoError(f"merge method {method!r} takes no extra input {unknown[0]!r}")
    names = sorted(set().union(*task_vectors))
    prepared: dict[str, Any] = {}
    if spec.prepare is not None:
        prepared = dict(spec.prepare({k: [{p: e[p] for p in names if p in e} for e in v] for k, v in extra.items()}))
    out: dict[str, Tensor] = {}
    for param in names:
        present = [tv[param] for tv in task_vectors if param in tv]
        shape = present[0].shape
        if any(t.shape != shape for t in present):
            raise DmoError(f"experts disagree on the shape of {param}: they were trained on different bases")
        device = present[0].device
        stacked = torch.stack(
            [tv[param].to(torch.float32) if param in tv else torch.zeros(shape, device=device) for tv in task_vectors]
        )
        inputs: dict[str, Any] = {"name": param} if spec.takes_name else {}
        inputs |= prepared
        for key in spec.extra:
            inputs[key] = stack_extra(key, param, shape, [e.get(param) for e in extra[key]], device)
        out[param] = spec.fn(stacked, w.to(device), **params, **inputs)
    return out


def stack_extra(
    key: str,
    param: str,
    shape: Sequence[int],
    values: Sequence[Tensor | None],
    device: torch.device | str,
    who: Sequence[str] | None = None,
) -> Tensor:
    """The per-expert input ``key`` of ``param`` stacked as (K, *shape) float32; missing or misshaped ones refused.

    ``who`` names the experts in messages (default: their positions).
    """
    for i, v in enumerate(values):
        expert = who[i] if who is not None else f"expert #{i}"
        if v is None:
            raise DmoError(
                f"the {key} weights of {expert} have no tensor {param}: they were computed for another model or "
                "another set of parameters; recompute them"
            )
        if tuple(v.shape) != tuple(shape):
            raise DmoError(
                f"the {key} weights of {expert} give {param} the shape {list(v.shape)}, but it has shape "
                f"{list(shape)}: they were computed for another model; recompute them"
            )
    return torch.stack([v.to(device=device, dtype=torch.float32) for v in values if v is not None])


def coefficients(weights: Tensor, weighted: bool) -> Tensor:
    """Each expert's coefficient: its mixture weight, or (``weighted=False``, the DMO paper's unweighted methods)
    1 for every expert present in the mixture (weight != 0) and 0 for the others."""
    w = weights.to(torch.float32)
    return w if weighted else (w != 0).to(torch.float32)


def weighted_mean(deltas: Tensor, coef: Tensor) -> Tensor:
    """``sum_i c_i delta_i / sum_i c_i``: the plain mean of the present experts when every ``c_i`` is 0 or 1."""
    total = float(coef.sum())
    if total == 0:
        raise DmoError(f"the mixture weights {coef.tolist()} sum to 0: their weighted mean is undefined")
    out = torch.tensordot(coef.to(device=deltas.device, dtype=deltas.dtype), deltas, dims=1)
    return out.div_(total)


def _scaled(weights: Mapping[str, float], params: Mapping[str, Any]) -> dict[str, float]:
    scale = float(params["scale"])
    return {k: scale * w for k, w in weights.items()}


def _renormalised(weights: Mapping[str, float], params: Mapping[str, Any]) -> dict[str, float]:
    names = list(weights)
    coef = coefficients(torch.tensor([float(weights[k]) for k in names], dtype=torch.float64), params["weighted"])
    if float(coef.sum()) == 0:
        raise DmoError(f"weight_average: the weights {dict(weights)} sum to 0 and cannot be renormalised")
    return {k: float(c) for k, c in zip(names, (coef / coef.sum()).tolist())}


@merge_method("linear", adapter_coefficients=_scaled)
def linear(deltas: Tensor, weights: Tensor, scale: float = 1.0) -> Tensor:
    """Task arithmetic: scale * sum_i w_i * delta_i (weights are used as given, not renormalised)."""
    out = torch.tensordot(weights.to(deltas.dtype), deltas, dims=1)
    return out if scale == 1.0 else out.mul_(scale)


merge_method(
    "task_arithmetic", adapter_coefficients=_scaled, description="Alias of linear: scale * sum_i w_i * delta_i."
)(linear)


class WeightAverageChunks(Chunked):
    """``weight_average`` in chunks: a linear merge with the renormalised weights (no statistics pass)."""

    def __init__(self, weights: Tensor, numel: int, name: str = "", *, weighted: bool):
        super().__init__(weights, numel, name)
        coef = coefficients(weights, weighted)
        total = float(coef.sum())
        if total == 0:
            raise DmoError(f"weight_average: the weights {weights.tolist()} sum to 0 and cannot be renormalised")
        self.coef = coef / total

    def merge(self, deltas: Tensor, lo: int) -> Tensor:
        return torch.tensordot(self.coef.to(device=deltas.device, dtype=deltas.dtype), deltas, dims=1)


@merge_method("weight_average", chunked=WeightAverageChunks, adapter_coefficients=_renormalised)
def weight_average(deltas: Tensor, weights: Tensor, weighted: bool = True) -> Tensor:
    """Weighted average: sum_i w_i delta_i / sum_i w_i (the paper's weight_average; weighted=False: plain mean)."""
    return WeightAverageChunks.whole(deltas.to(torch.float32), weights, weighted=weighted)
