"""Expert task vectors kept on one device and merged there for any mixture: the weight-write path.

A study scores dozens of proxies of the same experts. Reading the experts again for every proxy (what
``dmo merge`` does for one proxy) would make IO the cost, so :class:`ExpertBank` reads once what the experts
change (the base values of those parameters, each LoRA expert's factors, each full expert's changed tensors),
keeps it on a device (the GPU, or pinned host memory when it does not fit), and computes any proxy's parameters
there: ``base + merge(deltas, weights)`` with any registered merge method. What a merge keeps at the base value
is left out by the same parameter filter as ``dmo merge``'s (:func:`dmo.merge.experts.merge_filter`).

Every registered method works here, the whole-matrix ones (``svd``, ``iso``, ``wudi``, ``wudi2``) one parameter at
a time on the device; methods with per-expert inputs (Fisher merging) get them from ``extra`` at :meth:`open`.

Names are the base checkpoint's, so the output can go straight into a serving engine's ``load_weights`` (vLLM
maps checkpoint names and packs q/k/v and gate/up itself) or into a live transformers model
(:class:`ModuleWriter`). Values are absolute (not increments), so writing proxy after proxy never accumulates
rounding error, and :meth:`ExpertBank.base` restores the base exactly.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from dmo.errors import DmoError
from dmo.manifest import FinetuneKind
from dmo.merge.checkpoint import Checkpoint
from dmo.merge.experts import check_weights, close_experts, expert_kind, map_names, merge_filter, open_experts
from dmo.merge.plans import open_input_checkpoint
from dmo.merge.registry import MergeMethod, get_method, stack_extra

Store = Literal["device", "host"]


@dataclass(frozen=True)
class _Factors:
    a: Tensor  # (r, in)
    b: Tensor  # (out, r)
    scale: float


class ExpertBank:
    """What K experts change in a base model, resident on ``device``; see the module docstring.

    Build it with :meth:`open`. ``store="host"`` keeps the tensors in pinned host memory and moves one parameter at
    a time to ``device`` to merge it (for full fine-tuned experts of models too large to hold K + 1 times).
    """

    def __init__(
        self,
        experts: tuple[str, ...],
        base: dict[str, Tensor],
        lora: dict[str, dict[str, _Factors]],
        full: dict[str, dict[str, Tensor]],
        device: torch.device,
        extra: dict[str, dict[str, dict[str, Tensor]]] | None = None,
    ) -> None:
        self.experts = experts
        self.device = device
        self._base = base
        self._lora = lora
        self._full = full
        #: per-expert inputs: key -> expert -> parameter -> tensor (e.g. Fisher weights)
        self._extra = extra or {}
        self._prepared: dict[tuple[str, tuple[str, ...]], dict[str, Any]] = {}

    # ---------------------------------------------------------------------------------------------- building

    @classmethod
    def open(
        cls,
        base: str | os.PathLike[str],
        experts: Mapping[str, str | os.PathLike[str]],
        *,
        device: str | torch.device = "cpu",
        store: Store = "device",
        allow_bin: bool = False,
        extra: Mapping[str, Mapping[str, str | os.PathLike[str]]] | None = None,
        kind: FinetuneKind | None = None,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
    ) -> ExpertBank:
        """Read every expert (LoRA adapter or full checkpoint) against the base checkpoint folder ``base``.

        ``extra``: per-expert inputs of methods that need them, e.g. ``{"fisher": {expert: folder or file}}`` (the
        tensors of the parameters the experts change are kept, like the experts' own). ``kind``, ``include`` and
        ``exclude`` choose the tensors a merge changes as in ``dmo merge`` (:func:`dmo.merge.experts.merge_filter`:
        the paper's filter by default; ``exclude=[]`` keeps every change, e.g. for a trained model).
        """
        if not experts:
            raise DmoError("no experts given")
        if store not in ("device", "host"):
            raise DmoError(f"store must be 'device' or 'host', not {store!r}")
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise DmoError(f"device {device} asked for but CUDA is not available: use device='cpu'")
        pin = store == "host" and dev.type == "cuda"
        keep_on = torch.device("cpu") if store == "host" else dev

        def keep(t: Tensor) -> Tensor:
            t = t.to(keep_on, copy=True)
            return t.pin_memory() if pin else t

        names = tuple(experts)
        kind = kind or ("lora" if all(expert_kind(p) == "lora" for p in experts.values()) else "full")
        merged = merge_filter(base, kind, include, exclude)

        def keeps(param: str, value: Tensor) -> bool:
            return value.is_floating_point() and merged(param)

        base_values: dict[str, Tensor] = {}
        lora: dict[str, dict[str, _Factors]] = {}
        full: dict[str, dict[str, Tensor]] = {}
        with Checkpoint.open(base, what="base model", allow_bin=allow_bin) as ckpt:
            opened = open_experts(ckpt, experts, dict.fromkeys(names, 1.0), allow_bin)
            try:
                for e in opened:
                    for param, m in e.modules.items():
                        if merged(param):
                            lora.setdefault(param, {})[e.name] = _Factors(keep(m.a), keep(m.b), float(m.scale))
                    changed: Iterable[tuple[str, Tensor]] = e.extra.items()
                    if e.checkpoint is not None:
                        changed = changed_tensors(e.checkpoint, ckpt)
                    for param, value in changed:
                        if keeps(param, value):
                            full.setdefault(param, {})[e.name] = keep(value)
                for param in sorted(set(lora) | set(full)):
                    base_values[param] = keep(ckpt.view(param))
                inputs = {key: _read_extra(key, paths, names, ckpt, base_values, keep) for key, paths in
                          (extra or {}).items()}  # fmt: skip
            finally:
                close_experts(opened)
        return cls(names, base_values, lora, full, dev, inputs)

    # ----------------------------------------------------------------------------------------------- reading

    @property
    def names(self) -> tuple[str, ...]:
        """Base checkpoint names of the parameters some expert changes (the only ones a proxy writes)."""
        return tuple(self._base)

    @property
    def nbytes(self) -> int:
        tensors = list(self._base.values()) + [t for per in self._full.values() for t in per.values()]
        tensors += [t for per in self._lora.values() for f in per.values() for t in (f.a, f.b)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def base(self) -> Iterator[tuple[str, Tensor]]:
        """The base values of :attr:`names` (on ``device``), to restore the base model."""
        for name, value in self._base.items():
            yield name, value.to(self.device, non_blocking=True)

    def merged(
        self, weights: Mapping[str, float], method: str = "linear", params: Mapping[str, Any] | None = None
    ) -> Iterator[tuple[str, Tensor]]:
        """``(name, base + merged delta)`` for every parameter in :attr:`names`, in the base's dtype, on ``device``.

        Weights of experts left out count as 0. Parameters are produced one at a time, so a consumer that writes
        each into a model holds one merged parameter at a time.
        """
        for name, base, delta in self._deltas(weights, method, params):
            yield name, (base.to(torch.float32) + delta).to(base.dtype)

    def deltas(
        self, weights: Mapping[str, float], method: str = "linear", params: Mapping[str, Any] | None = None
    ) -> Iterator[tuple[str, Tensor]]:
        """``(name, merged delta)`` in float32 for every parameter in :attr:`names` (what :meth:`merged` adds to the
        base), to add into a live model in place; parameters no expert of the mixture changes are left out."""
        for name, base, delta in self._deltas(weights, method, params):
            if delta.shape == base.shape:
                yield name, delta

    def _deltas(
        self, weights: Mapping[str, float], method: str, params: Mapping[str, Any] | None
    ) -> Iterator[tuple[str, Tensor, Tensor]]:
        spec = get_method(method)
        params = spec.check_params(dict(params or {}))
        active = check_weights(list(self.experts), weights)
        # Only experts with a non-zero weight take part, in the bank's order, as in the streaming merge: DARE's
        # masks are seeded by the expert's position and TIES elects signs among the experts it is given.
        order = list(active)
        w = torch.tensor([active[n] for n in order], dtype=torch.float32, device=self.device)
        with torch.no_grad():
            prepared = self._prepare(spec, order)
            for name, base in self._base.items():
                base = base.to(self.device, non_blocking=True)
                yield name, base, self._delta(name, base, spec, w, order, {**params, **prepared})

    def _changes(self, name: str, order: list[str]) -> bool:
        return any(n in self._lora.get(name, {}) or n in self._full.get(name, {}) for n in order)

    def _prepare(self, spec: MergeMethod, order: list[str]) -> dict[str, Any]:
        """The method's model-wide statistics (Fisher norms) over the parameters this mixture changes (cached)."""
        for key in spec.extra:
            missing = [n for n in order if n not in self._extra.get(key, {})]
            if missing:
                raise DmoError(
                    f"merge method {spec.name!r} needs the {key} weights of every expert in the mixture; the bank "
                    f"has none for expert {missing[0]!r}: open it with extra={{{key!r}: {{expert: folder}}}}"
                )
        if spec.prepare is None:
            return {}
        cache = (spec.name, tuple(order))
        if cache not in self._prepared:
            names = [p for p in self._base if self._changes(p, order)]
            data = {key: [{p: self._extra[key][n][p] for p in names if p in self._extra[key][n]} for n in order]
                    for key in spec.extra}  # fmt: skip
            self._prepared[cache] = dict(spec.prepare(data))
        return self._prepared[cache]

    def _delta(
        self, name: str, base: Tensor, spec: MergeMethod, w: Tensor, order: list[str], params: Mapping[str, Any]
    ) -> Tensor:
        lora = {n: f for n, f in self._lora.get(name, {}).items() if n in order}
        full = {n: t for n, t in self._full.get(name, {}).items() if n in order}
        if not lora and not full:  # no expert of this mixture changes it: back to the base value
            return torch.zeros((), dtype=torch.float32, device=self.device)
        if spec.inputs == "lora":
            missing = [n for n in order if n not in lora]
            if full or missing:
                raise DmoError(
                    f"merge method {spec.name!r} merges LoRA factors, but {name} is "
                    f"{'changed outside LoRA' if full else f'not adapted by expert {missing[0]!r}'}: it needs every "
                    "expert to adapt the same modules with LoRA"
                )
            fs = [lora[n] for n in order]
            if len({f.a.shape for f in fs}) > 1 or len({f.scale for f in fs}) > 1:
                raise DmoError(f"the experts adapt {name} with different ranks or scalings: {spec.name} needs equal")
            a, b = spec.fn(
                torch.stack([self._dev(f.a) for f in fs]).float(), torch.stack([self._dev(f.b) for f in fs]).float(),
                w, **params,
            )  # fmt: skip
            return (b @ a).mul_(fs[0].scale)
        if spec.lora_exact and not full:
            # linear over LoRA experts: one matmul of the concatenated factors, no K dense deltas
            coef = spec.linear_coefficients(dict(zip(order, w.tolist())), params)
            assert coef is not None
            blocks = [(n, lora[n]) for n in order if n in lora]
            a = torch.cat([self._dev(f.a).float() for _, f in blocks])
            b = torch.cat([self._dev(f.b).float() * (coef[n] * f.scale) for n, f in blocks], dim=1)
            return b @ a
        stacked = torch.zeros((len(order), *base.shape), dtype=torch.float32, device=self.device)
        for i, n in enumerate(order):
            if n in full:
                stacked[i] = self._dev(full[n]).float() - base.float()
            elif n in lora:
                f = lora[n]
                torch.matmul(self._dev(f.b).float(), self._dev(f.a).float(), out=stacked[i]).mul_(f.scale)
        inputs: dict[str, Any] = {"name": name} if spec.takes_name else {}
        for key in spec.extra:
            values = [self._extra[key][n].get(name) for n in order]
            inputs[key] = stack_extra(key, name, base.shape, [None if v is None else self._dev(v) for v in values],
                                      self.device, [f"expert {n!r}" for n in order])  # fmt: skip
        return spec.fn(stacked, w, **params, **inputs)

    def _dev(self, t: Tensor) -> Tensor:
        return t.to(self.device, non_blocking=True)


def _read_extra(
    key: str,
    paths: Mapping[str, str | os.PathLike[str]],
    experts: tuple[str, ...],
    base: Checkpoint,
    params: Mapping[str, Tensor],
    keep: Callable[[Tensor], Tensor],
) -> dict[str, dict[str, Tensor]]:
    """Expert -> parameter -> tensor of the per-expert input ``key``, for the parameters in ``params``."""
    unknown = [n for n in paths if n not in experts]
    if unknown:
        raise DmoError(f"{key} weights given for unknown expert {unknown[0]!r}; the experts are {list(experts)}")
    out: dict[str, dict[str, Tensor]] = {}
    for expert, path in paths.items():
        what = f"the {key} weights of expert {expert!r}"
        with open_input_checkpoint(path, what) as ckpt:
            mapped = map_names(ckpt.tensors, base, what)  # their name -> base name
            out[expert] = {}
            for theirs, param in mapped.items():
                if param not in params:
                    continue
                value = ckpt.view(theirs)
                if tuple(value.shape) != tuple(params[param].shape):
                    raise DmoError(f"{what} give {param} the shape {list(value.shape)} in {ckpt.tensors[theirs].file}, "
                                   f"but the base has {list(params[param].shape)}: they were computed for another "
                                   "model; recompute them")  # fmt: skip
                out[expert][param] = keep(value)
    return out


def changed_tensors(expert: Checkpoint, base: Checkpoint) -> Iterator[tuple[str, Tensor]]:
    """The tensors of a full fine-tune that differ from the base (frozen towers are not kept, nor rewritten)."""
    for name in base.tensors:
        value = expert.view(name)
        if not torch.equal(value, base.view(name)):
            yield name, value


class ModuleWriter:
    """Writes ``(checkpoint name, value)`` pairs into a live transformers model's parameters, in place.

    The plain-transformers counterpart of vLLM's ``model.load_weights``: names are resolved once through
    transformers' own checkpoint renaming (:meth:`dmo.merge.names.KeyMap.for_model`).
    """

    def __init__(self, model: torch.nn.Module, names: Iterable[str]) -> None:
        from dmo.merge.dense import refuse_tied, resolve_names

        params = dict(model.named_parameters(remove_duplicate=False))
        wanted = dict.fromkeys(names)
        self._target = resolve_names(wanted, params.keys(), None, what=type(model).__name__, model=model)
        refuse_tied({t: params[t] for t in self._target.values()}, params)
        self._params = {k: params[t] for k, t in self._target.items()}

    def __call__(self, named: Iterable[tuple[str, Tensor]]) -> int:
        count = 0
        with torch.no_grad():
            for name, value in named:
                param = self._params.get(name)
                if param is None:
                    raise DmoError(f"{name} is not a parameter this writer was built for")
                if param.shape != value.shape:
                    raise DmoError(f"{name}: value of shape {tuple(value.shape)} for a {tuple(param.shape)} parameter")
                param.copy_(value)
                count += 1
        return count
