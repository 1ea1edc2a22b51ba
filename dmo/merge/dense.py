"""Adding a dense delta to base weights: into a state dict (a new one) or into a live module (reversibly).

Deltas are keyed by parameter name, normally the live model's (see :mod:`dmo.merge.names`); a base given in the
checkpoint layout is matched through a :class:`~dmo.merge.names.KeyMap`. Sums are taken in float32 and cast back
to each base tensor's dtype, like PEFT's ``merge_and_unload``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping

import torch
from torch import Tensor

from dmo.errors import DmoError
from dmo.merge.names import KeyMap

Rename = Callable[[str], str]


def merge_dense(
    base_state: Mapping[str, Tensor], delta: Mapping[str, Tensor], *, names: Rename | None = None
) -> dict[str, Tensor]:
    """Return ``base_state`` with ``delta`` added; untouched tensors are shared, not copied.

    ``names`` maps a checkpoint-layout name to the delta's naming (e.g. ``KeyMap.for_config(base_folder)`` when
    ``base_state`` was read from the base model's safetensors files).
    """
    targets = resolve_names(delta, base_state.keys(), names, what="the base state")
    refuse_tied({k: base_state[k] for k in targets.values()}, base_state)
    out = dict(base_state)
    for key, target in targets.items():
        base = base_state[target]
        change = delta[key]
        _check_shape(key, change, base)
        out[target] = (base.to(torch.float32) + change.to(device=base.device, dtype=torch.float32)).to(base.dtype)
    return out


@contextlib.contextmanager
def applied_delta(
    model: torch.nn.Module, delta: Mapping[str, Tensor], *, names: Rename | None = None
) -> Iterator[torch.nn.Module]:
    """Add ``delta`` to ``model``'s parameters in place for the duration of the block, then restore them exactly.

    The originals are copied (not recomputed by subtraction, which is inexact in low precision), so the model is
    bit-identical to the base afterwards, also when the block raises. ``names`` defaults to the renaming
    transformers applies when loading checkpoints into ``model``.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    targets = resolve_names(delta, params.keys(), names, what=f"{type(model).__name__}", model=model)
    refuse_tied({k: params[k] for k in targets.values()}, params)
    for key, target in targets.items():
        _check_shape(key, delta[key], params[target])
    saved: dict[str, Tensor] = {}
    try:
        with torch.no_grad():
            for key, target in targets.items():
                param = params[target]
                saved[target] = param.detach().clone()
                change = delta[key].to(device=param.device, dtype=torch.float32)
                param.copy_((param.to(torch.float32) + change).to(param.dtype))
        yield model
    finally:
        with torch.no_grad():
            for target, original in saved.items():
                params[target].copy_(original)


def resolve_names(
    delta_keys: Collection[str],
    available: Iterable[str],
    names: Rename | None,
    *,
    what: str,
    model: torch.nn.Module | None = None,
) -> dict[str, str]:
    """Delta key (a delta mapping's keys will do) -> name in ``available``; exact names first, then both sides renamed
    to the live layout."""
    available = list(available)
    present = set(available)
    out: dict[str, str] = {}
    missing = [k for k in delta_keys if k not in present]
    for k in delta_keys:
        if k in present:
            out[k] = k
    if not missing:
        return out
    if names is None:
        names = KeyMap.for_model(model) if model is not None else KeyMap.identity()
    canonical: dict[str, str | None] = {}
    for name in available:
        try:
            c = names(name)
        except DmoError:  # a fused/split checkpoint weight: no delta can target it, so it matches nothing
            continue
        canonical[c] = None if c in canonical and canonical[c] != name else name  # None marks an ambiguous name
    for k in missing:
        c = names(k)
        if c not in canonical:
            example = next(iter(available), "<none>")
            raise DmoError(
                f"delta names parameter {k} but {what} has no such parameter (its names look like {example}); "
                "check the experts were trained on this base model, or pass names=KeyMap.for_config(<base folder>)"
            )
        match = canonical[c]
        if match is None:
            raise DmoError(f"delta parameter {k} matches several parameters of {what} after renaming; cannot merge")
        out[k] = match
    if len(set(out.values())) != len(out):
        raise DmoError(f"two delta entries name the same parameter of {what} (in two name layouts); merge them first")
    return out


def refuse_tied(targets: Mapping[str, Tensor], everything: Mapping[str, Tensor]) -> None:
    """A delta on a tied weight (e.g. lm_head tied to embed_tokens) would change both, unlike the LoRA adapter."""
    wanted = {key: k for k, t in targets.items() if (key := _storage_key(t)) is not None}
    if not wanted:
        return
    for name, tensor in everything.items():
        key = _storage_key(tensor)
        owner = wanted.get(key) if key is not None else None
        if owner is not None and owner != name:
            raise DmoError(
                f"parameter {owner} shares its storage with {name} (tied weights): a merged delta would change both, "
                "unlike the LoRA adapter; retrain without targeting it or untie the weights"
            )


def _storage_key(t: Tensor) -> tuple[int, tuple[int, ...]] | None:
    if t.device.type == "meta" or t.numel() == 0:
        return None
    return (t.data_ptr(), tuple(t.shape))


def _check_shape(key: str, change: Tensor, base: Tensor) -> None:
    if tuple(change.shape) != tuple(base.shape):
        raise DmoError(
            f"delta for {key} has shape {tuple(change.shape)} but the base parameter has {tuple(base.shape)}: "
            "the experts were trained on a different base model"
        )
