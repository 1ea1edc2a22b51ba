"""Writing a merged proxy to disk: a dense model (:mod:`dmo.merge.stream`) or one PEFT LoRA adapter.

:func:`write_lora_proxy` writes the *exact* linear proxy of LoRA experts as a single adapter of rank
``sum_i r_i`` (see :func:`dmo.merge.lora.concat_adapter`), or RobustMerge's merged adapter (rank ``r``). PEFT and
vLLM load it; vLLM's ``--max-lora-rank`` must be at least its rank (vLLM accepts up to
:data:`VLLM_MAX_LORA_RANK`). :func:`merge_manifest` is what ``dmo merge`` runs: an expert manifest and a mixture in,
a proxy folder out.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from dmo.errors import DmoError
from dmo.manifest import FinetuneKind
from dmo.merge.checkpoint import Checkpoint
from dmo.merge.experts import ParamFilter, check_weights, expert_kind, map_names, merge_filter
from dmo.merge.lora import ADAPTER_WEIGHTS, LoraAdapter, LoraModule, concat_adapter, load_lora, write_adapter
from dmo.merge.registry import get_method, method_names
from dmo.merge.stream import DEFAULT_SHARD_SIZE, MergeOptions, MergeStats, Progress, merge_checkpoints

#: The largest ``max_lora_rank`` vLLM accepts.
VLLM_MAX_LORA_RANK = 512


@dataclass(frozen=True)
class AdapterStats:
    out: Path
    method: str
    rank: int
    modules: int
    bytes_written: int
    seconds: float
    excluded_adapted: tuple[str, ...] = ()

    def summary(self) -> str:
        return (
            f"wrote a rank-{self.rank} LoRA adapter ({self.modules} modules, {self.bytes_written / 1e6:.1f} MB) in "
            f"{self.seconds:.2f} s; serve it with vLLM --max-lora-rank >= {self.rank}"
        )


def _adapter_refusal(reason: str) -> DmoError:
    exact = ", ".join(m for m in method_names() if get_method(m).lora_exact)
    return DmoError(
        f"--as adapter writes the exact concatenated LoRA proxy (its rank is the sum of the experts' ranks, and vLLM's "
        f"max_lora_rank must be >= it), which exists only for the linear methods ({exact}) and "
        f"robustmerge on LoRA experts: {reason}; use --as dense instead"
    )


def write_lora_proxy(
    experts: Mapping[str, str | os.PathLike[str]],
    weights: Mapping[str, float],
    out: str | os.PathLike[str],
    *,
    method: str = "linear",
    params: Mapping[str, Any] | None = None,
    base: str | os.PathLike[str] | None = None,
    kind: FinetuneKind = "lora",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    overwrite: bool = False,
    allow_bin: bool = False,
) -> AdapterStats:
    """Write the linear proxy (or RobustMerge's merge) of LoRA ``experts`` as one PEFT adapter folder.

    ``include``/``exclude`` drop adapted modules exactly as the dense merge keeps their base value (patterns are
    matched against the base checkpoint's names when ``base`` is a local model folder, else against the adapters'
    parameter names), so the adapter and ``--as dense`` give the same model.
    """
    start = time.perf_counter()
    spec = get_method(method)
    params = spec.check_params(dict(params or {}))
    if not spec.lora_exact and spec.inputs != "lora":
        raise _adapter_refusal(
            f"method {spec.name!r} is not linear: its merged delta is not a weighted sum of the experts' B·A products"
        )
    out = Path(out)
    if out.exists() and not overwrite:
        raise DmoError(f"output folder {out} already exists: remove it or pass --overwrite")
    active = check_weights(list(experts), weights)
    for name in active:
        if expert_kind(experts[name]) != "lora":
            raise _adapter_refusal(f"expert {name!r} ({experts[name]}) is a full checkpoint")
    keep = merge_filter(base, kind, include, exclude) if base is not None else ParamFilter(kind, include, exclude)
    base_ckpt = None
    if base is not None and Path(base).is_dir():
        base_ckpt = Checkpoint.open(base, what="base model", allow_bin=allow_bin)
    adapters: dict[str, LoraAdapter] = {}
    excluded: set[str] = set()
    try:
        for name in active:
            adapter = load_lora(Path(experts[name]), allow_bin=allow_bin)
            if base_ckpt is not None:
                mapped = map_names(adapter.modules, base_ckpt, f"expert {name!r} ({experts[name]})")
            else:
                mapped = {k: k for k in adapter.modules}
            kept = {k: m for k, m in adapter.modules.items() if keep(mapped[k])}
            excluded.update(mapped[k] for k in adapter.modules if k not in kept)
            adapters[name] = dataclasses.replace(adapter, modules=kept)
    finally:
        if base_ckpt is not None:
            base_ckpt.close()
    if not any(a.modules for a in adapters.values()):
        raise DmoError("include/exclude leave no adapted module: the proxy is the base model itself")
    config, tensors = adapter_proxy(adapters, active, spec, params)
    ranks = [int(t.shape[0]) for k, t in tensors.items() if k.endswith("lora_A.weight")]
    rank = max(ranks)
    if rank > VLLM_MAX_LORA_RANK:
        raise DmoError(
            f"the proxy adapter would have rank {rank}, above the largest max_lora_rank vLLM accepts "
            f"({VLLM_MAX_LORA_RANK}; vLLM's max_lora_rank must be >= the concatenated rank): use --as dense instead"
        )
    metadata = {"dmo_method": spec.name, "dmo_weights": json.dumps(active, sort_keys=True)}
    write_adapter(out, config, tensors, overwrite=overwrite, metadata=metadata)
    return AdapterStats(
        out=out,
        method=spec.name,
        rank=rank,
        modules=len(ranks),
        bytes_written=(out / ADAPTER_WEIGHTS).stat().st_size,
        seconds=time.perf_counter() - start,
        excluded_adapted=tuple(sorted(excluded)),
    )


def adapter_proxy(
    adapters: Mapping[str, LoraAdapter], weights: Mapping[str, float], spec: Any, params: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(adapter_config, tensors)`` of the linear proxy (the exact concatenation) or of RobustMerge's adapter."""
    linear = spec.linear_coefficients(weights, params)
    if linear is not None:
        return concat_adapter(adapters, linear)
    merged = robust_adapter(adapters, weights, spec.fn, params)
    return concat_adapter({"merged": merged}, {"merged": 1.0})


def robust_adapter(
    adapters: Mapping[str, LoraAdapter], weights: Mapping[str, float], fn: Any, params: Mapping[str, Any]
) -> LoraAdapter:
    """RobustMerge's merged adapter, with each module's LoRA scaling folded into B (so PEFT's scaling is 1)."""
    names = list(adapters)
    params_all = sorted(set().union(*(a.modules for a in adapters.values())))
    w = torch.tensor([weights[n] for n in names], dtype=torch.float32)
    modules: dict[str, LoraModule] = {}
    for param in params_all:
        missing = [n for n in names if param not in adapters[n].modules]
        if missing:
            raise DmoError(f"expert {missing[0]!r} does not adapt {param} although other experts do: robustmerge "
                           "needs every expert to adapt the same modules with the same rank")  # fmt: skip
        mods = [adapters[n].modules[param] for n in names]
        if len({m.rank for m in mods}) > 1 or len({m.scale for m in mods}) > 1:
            raise DmoError(f"the experts adapt {param} with different ranks or scalings: robustmerge needs LoRA "
                           "experts trained with the same r and lora_alpha")  # fmt: skip
        a, b = fn(torch.stack([m.a for m in mods]), torch.stack([m.b for m in mods]), w, **params)
        modules[param] = LoraModule(module=mods[0].module, a=a, b=b.mul_(mods[0].scale), scale=1.0)
    first = next(iter(adapters.values()))
    return dataclasses.replace(first, modules=modules, content_hash="robustmerge", extra={})


# ------------------------------------------------------------------------------------------------------ manifest


def mixture_weights(
    manifest: Any, weights: str | Mapping[str, float], *, paper_rounding: bool = False
) -> dict[str, float]:
    """Merge coefficients for a manifest: the mixture's weights, or the paper's round(w * budget) / budget."""
    from dmo.mixture import Mixture

    mixture = (
        Mixture.parse(weights, manifest.domains)
        if isinstance(weights, str)
        else Mixture.from_mapping(dict(weights), manifest.domains)
    )
    if paper_rounding:
        if manifest.budget is None:
            raise DmoError(
                f"--paper-rounding needs the training budget: add 'budget: <samples per expert>' to manifest "
                f"{manifest.name!r}"
            )
        return mixture.rounded_to_budget(manifest.budget)
    return {d: w for d, w in mixture.as_dict().items() if w != 0}


def _local(ref: Any, what: str, manifest: Any) -> Path:
    return Path(ref.local(f"{what} of manifest {manifest.name!r}"))


def merge_manifest(
    manifest: Any,
    weights: str | Mapping[str, float],
    out: str | os.PathLike[str],
    *,
    method: str = "linear",
    params: Mapping[str, Any] | None = None,
    as_: Literal["dense", "adapter"] = "dense",
    paper_rounding: bool = False,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int = DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
    device: str | None = None,
    threads: int | None = None,
    allow_bin: bool = False,
    progress: Progress | None = None,
) -> MergeStats | AdapterStats:
    """Merge an expert manifest's experts for a mixture (``"general=0.25,ocr=0.75"`` or a mapping) into ``out``."""
    from dmo.manifest import ExpertManifest, load_manifest
    from dmo.merge.inputs import method_inputs

    manifest_file = None
    if not isinstance(manifest, ExpertManifest):
        manifest_file = manifest
        manifest = load_manifest(manifest)
    coefficients = mixture_weights(manifest, weights, paper_rounding=paper_rounding)
    experts = {d: _local(ref, f"expert {d!r}", manifest) for d, ref in manifest.experts.items() if d in coefficients}
    if as_ == "adapter":
        base = manifest.base.path
        return write_lora_proxy(
            experts, coefficients, out, method=method, params=params, base=base, kind=manifest.kind,
            include=include, exclude=exclude, overwrite=overwrite, allow_bin=allow_bin,
        )  # fmt: skip
    if as_ != "dense":
        raise DmoError(f"--as must be 'dense' or 'adapter', not {as_!r}")
    get_method(method).check_params(dict(params or {}))  # a misspelt parameter before a missing Fisher file
    extra = method_inputs(manifest, experts, method, manifest_file)  # the Fisher files of fisher / fisher_nn
    return merge_checkpoints(
        _local(manifest.base, "base", manifest), experts, coefficients, out,
        MergeOptions(
            method=method, params=dict(params or {}), kind=manifest.kind, include=include, exclude=exclude,
            dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite, device=device, threads=threads,
            allow_bin=allow_bin, metadata={"manifest": manifest.name, "paper_rounding": paper_rounding},
            extra=extra or None,
        ),
        progress=progress,
    )  # fmt: skip


def parse_params(items: Sequence[str] | None) -> dict[str, Any]:
    """``["density=0.5", "consensus=sum"]`` -> ``{"density": 0.5, "consensus": "sum"}`` (values read as YAML)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise DmoError(f"cannot parse --param {item!r}: write name=value, e.g. --param density=0.5")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def parse_size(text: str) -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"`` or a number of bytes."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)b?\s*", text.lower())
    if m is None:
        raise DmoError(f"cannot read size {text!r}: write e.g. 5GB, 500MB or 2GiB")
    base = 1024 if m[3] else 1000
    return int(float(m[1]) * base ** "_kmgt".index(m[2] or "_"))
