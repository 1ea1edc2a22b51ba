"""LoRA experts and the exact linear proxy built from them.

The proxy for mixture weights ``w`` is ``theta_base + sum_i w_i * s_i * B_i @ A_i``. It is exactly one LoRA adapter
of rank ``sum_i r_i``: ``B = [w_1 s_1 B_1, ..., w_K s_K B_K]`` (side by side) and ``A = [A_1; ...; A_K]`` (stacked),
with ``lora_alpha = r`` and no rsLoRA so that PEFT's own scaling is 1. :func:`concat_adapter` builds that adapter,
:func:`lora_delta` the same sum as dense tensors.

File I/O (:func:`load_lora`, :func:`write_adapter`) is kept apart from the math, which only sees
:class:`LoraAdapter` objects. Supported: plain LoRA on linear layers, rsLoRA, ``rank_pattern``/``alpha_pattern``.
Refused with a :class:`~dmo.errors.DmoError` naming the folder: other PEFT types, DoRA and the other LoRA variants,
LoRA on embedding or convolution layers, ``fan_in_fan_out``, trained biases, and every non-LoRA trainable saved
alongside (``modules_to_save``, trainable tokens, saved embedding layers): such modules *replace* base weights, so
a weighted merge of them is not a low-rank merge, and dmo does not silently drop them either.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from torch import Tensor

from dmo.atomic import atomic_dir
from dmo.errors import DmoError
from dmo.merge.dense import applied_delta, merge_dense
from dmo.merge.names import KeyMap

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "KeyMap",
    "LoraAdapter",
    "LoraModule",
    "applied_delta",
    "concat_adapter",
    "expert_delta",
    "fingerprint",
    "load_lora",
    "lora_delta",
    "merge_dense",
    "write_adapter",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: PEFT prefixes every LoRA tensor name with this (the PeftModel's path to the wrapped base model).
PEFT_PREFIX = "base_model.model."
#: Weights are rounded to this many decimals in fingerprints, as in :attr:`dmo.mixture.Mixture.id`.
WEIGHT_DECIMALS = 6

_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")

# Config keys that carry metadata or only steer training / which modules get adapted (the tensors say that).
_IGNORED_KEYS = frozenset(
    {
        "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
        "peft_version", "lora_dropout", "target_modules", "exclude_modules", "layers_to_transform",
        "layers_pattern", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "init_lora_weights",
        "megatron_core", "qalora_group_size", "runtime_config", "eva_config",
    }
)  # fmt: skip
# Initialisations (besides true/false) that leave the base weights alone; PiSSA/OLoRA/CorDA/LoftQ/LoRA-GA change
# them and MiCA is a LoRA variant.
_PLAIN_INITS = ("gaussian", "orthogonal", "eva")
_REASONS = {
    "use_dora": "DoRA (use_dora=true) rescales weight columns by a learned magnitude, so it is not a low-rank delta",
    "bias": "trained biases (bias={value!r})",
    "lora_bias": "LoRA B biases (lora_bias=true)",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D/GPT-2-style layers)",
    "modules_to_save": "fully trained modules_to_save {value} (they replace base weights; not a LoRA delta)",
    "trainable_token_indices": "trainable tokens",
    "target_parameters": "LoRA on nn.Parameter (target_parameters)",
    "layer_replication": "layer replication",
    "alora_invocation_tokens": "Activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QA-LoRA",
    "megatron_config": "Megatron parallel layers",
}


@dataclass(frozen=True, eq=False)
class LoraModule:
    """One adapted linear layer: its delta is ``scale * b @ a``."""

    module: str  # module path as saved by PEFT (before any renaming), used to write the proxy back
    a: Tensor  # (r, in_features)
    b: Tensor  # (out_features, r)
    scale: float  # lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA, after rank_pattern / alpha_pattern

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of the base weight this module modifies: (out_features, in_features)."""
        return int(self.b.shape[0]), int(self.a.shape[1])


@dataclass(frozen=True, eq=False)
class LoraAdapter:
    """A validated PEFT LoRA adapter; ``modules`` is keyed by the base parameter name each module modifies."""

    folder: Path
    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules: list[str] | str | None
    base_model_name_or_path: str | None
    task_type: str | None
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    modules: dict[str, LoraModule]
    content_hash: str  # sha256 of the config (canonical JSON) and the weights file bytes
    #: non-LoRA trainables (``modules_to_save``) keyed by base parameter name; only with ``load_lora(non_lora=True)``
    extra: dict[str, Tensor] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------- I/O


def load_lora(
    folder: str | Path,
    names: Callable[[str], str] | None = None,
    *,
    non_lora: bool = False,
    allow_bin: bool = False,
) -> LoraAdapter:
    """Read and validate a PEFT LoRA folder (``adapter_config.json`` + ``adapter_model.safetensors``).

    ``non_lora=True`` accepts ``modules_to_save`` and saved embedding layers (full tensors saved alongside): they go
    into :attr:`LoraAdapter.extra`, for the streaming merge (:mod:`dmo.merge.stream`), which treats them as the
    expert's value of that parameter (plus its LoRA delta, if the module is adapted too); the LoRA-proxy functions
    here refuse such adapters. ``allow_bin=True`` reads an ``adapter_model.bin`` when there is
    no safetensors file, with ``torch.load(weights_only=True)``.

    Parameter names are those of the modules PEFT wrapped, plus ``.weight``. Adapters trained under an older
    transformers layout (e.g. Qwen2-VL before transformers 4.52: ``model.layers.*``, ``visual.*``) keep that layout
    unless ``names`` renames it, e.g. ``names=KeyMap.for_config(base_folder)`` gives the live transformers 5 names.
    Load all experts of one study with the same ``names``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DmoError(f"LoRA expert folder {folder} does not exist or is not a folder")
    config_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    config = _read_config(config_path)
    _check_config(config, folder, non_lora)
    bin_path = folder / "adapter_model.bin"
    if not weights_path.is_file() and allow_bin and bin_path.is_file():
        weights_path = bin_path
    elif not weights_path.is_file():
        has_bin = bin_path.exists()
        hint = " (there is only a .bin file: re-save it with safe_serialization=True)" if has_bin else ""
        raise DmoError(f"missing {weights_path}: a LoRA expert needs adapter_model.safetensors{hint}")
    try:
        data = weights_path.read_bytes()
    except OSError as exc:
        raise DmoError(f"cannot read {weights_path}: {exc.strerror or exc}") from exc
    try:
        if weights_path.suffix == ".bin":
            import io

            tensors = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        else:
            from safetensors.torch import load as load_safetensors

            tensors = load_safetensors(data)
    except Exception as exc:  # safetensors raises its own error types for truncated or garbled files
        raise DmoError(f"corrupt {weights_path}: {exc}; re-copy or re-save the expert") from exc
    digest = hashlib.sha256(b"dmo-lora-v1\0")
    digest.update(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())
    digest.update(b"\0")
    digest.update(data)

    r = _positive_int(config.get("r"), "r", config_path)
    alpha = _number(config.get("lora_alpha", 8), "lora_alpha", config_path)
    use_rslora = bool(config.get("use_rslora", False))
    rank_pattern = dict(config.get("rank_pattern") or {})
    alpha_pattern = dict(config.get("alpha_pattern") or {})
    extra: dict[str, Tensor] = {}
    if non_lora:
        tensors = dict(tensors)
        for key in [k for k in tensors if _is_saved_module(k)]:
            value = tensors.pop(key)
            # a saved embedding layer under LoRA is stored as <module>.base_layer.weight
            param = key[len(PEFT_PREFIX) :].replace(".base_layer.", ".")
            extra[names(param) if names is not None else param] = value
    modules = _parse_modules(tensors, weights_path, r, alpha, use_rslora, rank_pattern, alpha_pattern, names)
    return LoraAdapter(
        folder=folder,
        r=r,
        lora_alpha=alpha,
        use_rslora=use_rslora,
        target_modules=config.get("target_modules"),
        base_model_name_or_path=config.get("base_model_name_or_path"),
        task_type=config.get("task_type"),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        modules=modules,
        content_hash=digest.hexdigest(),
        extra=extra,
    )


def _is_saved_module(key: str) -> bool:
    """A full tensor of a ``modules_to_save`` module (``base_model.model.<param>``), not a LoRA/DoRA/token one."""
    return (
        key.startswith(PEFT_PREFIX)
        and _LORA_KEY.match(key) is None
        and ".lora_" not in key
        and "trainable_tokens" not in key
        and key.endswith((".weight", ".bias"))
    )


def write_adapter(
    folder: str | Path,
    config: Mapping[str, Any],
    tensors: Mapping[str, Tensor],
    *,
    overwrite: bool = False,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a PEFT-loadable adapter folder atomically; ``metadata`` goes into the safetensors header."""
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise DmoError(f"refusing to write {folder}: adapter config is not a LoRA config")
    from safetensors.torch import save_file

    header = {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}}
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
        save_file({k: t.contiguous() for k, t in tensors.items()}, str(tmp / ADAPTER_WEIGHTS), metadata=header)
    return Path(folder)


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DmoError(f"missing {path}: a LoRA expert folder needs adapter_config.json and adapter_model.safetensors")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DmoError(f"corrupt {path}: {exc}; re-copy or re-save the expert") from exc
    if not isinstance(config, dict):
        raise DmoError(f"corrupt {path}: expected a JSON object")
    return config


def _check_config(config: Mapping[str, Any], folder: Path, non_lora: bool = False) -> None:
    """Refuse everything that is not a plain LoRA delta; unknown settings are refused unless left at their default."""
    peft_type = str(config.get("peft_type", ""))
    if peft_type.upper() != "LORA":
        raise DmoError(f"cannot use expert {folder}: it is a {peft_type or 'unknown'} adapter, dmo merges only LoRA")
    init = config.get("init_lora_weights", True)
    if not (isinstance(init, bool) or init in _PLAIN_INITS):
        raise DmoError(
            f"cannot use expert {folder}: init_lora_weights={init!r} changes the base weights or is a LoRA variant; "
            "save it with path_initial_model_for_weight_conversion to get a plain LoRA"
        )
    for key, value in config.items():
        if key in _IGNORED_KEYS or _is_default(key, value) or (non_lora and key == "modules_to_save"):
            continue
        reason = _REASONS[key].format(value=value) if key in _REASONS else f"{key}={value!r}"
        raise DmoError(f"cannot use expert {folder}: {reason} is not supported; merge only plain LoRA experts")


def _is_default(key: str, value: Any) -> bool:
    if key == "bias":
        return value == "none"
    return value is None or value is False or value == {} or value == [] or value == ""


def _parse_modules(
    tensors: Mapping[str, Tensor],
    path: Path,
    r: int,
    alpha: float,
    use_rslora: bool,
    rank_pattern: Mapping[str, int],
    alpha_pattern: Mapping[str, float],
    names: Callable[[str], str] | None,
) -> dict[str, LoraModule]:
    parts: dict[str, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        m = _LORA_KEY.match(key)
        if m is None:
            raise DmoError(f"cannot use {path}: {_describe_foreign_key(key)} is not supported; keep only plain LoRA")
        parts.setdefault(m["module"], {})[m["part"]] = tensor
    if not parts:
        raise DmoError(f"{path} holds no LoRA tensors: it is empty or not a PEFT LoRA adapter")
    modules: dict[str, LoraModule] = {}
    for module, ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            raise DmoError(f"corrupt {path}: module {module} has lora_{''.join(ab)} but not both lora_A and lora_B")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2:
            raise DmoError(f"cannot use {path}: module {module} is not a linear layer (LoRA on convolutions)")
        if not (a.is_floating_point() and b.is_floating_point()):
            raise DmoError(f"corrupt {path}: module {module} has non-float LoRA tensors ({a.dtype}, {b.dtype})")
        rank_key, alpha_key = _pattern_key(rank_pattern, module), _pattern_key(alpha_pattern, module)
        rank = int(rank_pattern[rank_key]) if rank_key is not None else r
        mod_alpha = float(alpha_pattern[alpha_key]) if alpha_key is not None else alpha
        if a.shape[0] != rank or b.shape[1] != rank:
            raise DmoError(
                f"corrupt {path}: module {module} has rank {a.shape[0]}/{b.shape[1]} (A/B) but adapter_config.json "
                f"says {rank}; the config and weights do not belong together"
            )
        if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
            raise DmoError(f"cannot use {path}: module {module} holds NaN or infinite values (the training diverged)")
        scale = mod_alpha / math.sqrt(rank) if use_rslora else mod_alpha / rank
        param = f"{module}.weight"
        name = names(param) if names is not None else param
        if not name.endswith(".weight"):
            raise DmoError(f"cannot use {path}: renaming turned {param} into {name}, which is not a module weight")
        if name in modules:
            raise DmoError(f"cannot use {path}: modules {modules[name].module} and {module} both map to {name}")
        modules[name] = LoraModule(module=module, a=a, b=b, scale=scale)
    return modules


def _pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    """PEFT's ``get_pattern_key``: the first pattern that matches a dotted suffix of the module path."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def _describe_foreign_key(key: str) -> str:
    if "lora_embedding_" in key:
        return f"LoRA on an embedding layer ({key})"
    if "lora_magnitude_vector" in key:
        return f"a DoRA magnitude vector ({key})"
    if ".lora_" in key and key.endswith(".bias"):
        return f"a LoRA bias ({key})"
    return f"non-LoRA tensor {key} (modules_to_save, trainable tokens or saved embedding layers)"


def _positive_int(value: Any, what: str, path: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise DmoError(f"corrupt {path}: {what} must be a positive integer, got {value!r}")
    return value


def _number(value: Any, what: str, path: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DmoError(f"corrupt {path}: {what} must be a finite number, got {value!r}")
    return float(value)


# ---------------------------------------------------------------------------------------------------------- math


def concat_adapter(
    adapters: Mapping[str, LoraAdapter], weights: Mapping[str, float], *, dtype: torch.dtype | None = None
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The exact linear proxy as one LoRA adapter: ``(adapter_config, tensors)`` ready for :func:`write_adapter`.

    Experts with weight 0 are dropped. A module adapted by only some experts gets only their blocks (a smaller
    rank, recorded in ``rank_pattern`` with ``alpha_pattern`` equal to it), so PEFT's scaling is 1 everywhere.
    ``target_modules`` lists the exact module paths, so PEFT adapts nothing else. Weights missing from ``weights``
    count as 0. By default the proxy is exact: ``B`` (holding ``w * s``) is float32 and ``A`` keeps the experts'
    dtype, since copying is exact; a ``dtype`` casts both (smaller, no longer exact below float32).
    """
    terms = _terms(adapters, weights)
    if not terms:
        raise DmoError("all mixture weights are 0: the proxy is the base model itself; score the base model instead")
    tensors: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    for param, blocks in _blocks_by_param(terms).items():
        a, b = _stack(param, blocks, dtype)
        module = param.removesuffix(".weight")  # the (possibly renamed) path, not the one each expert was saved with
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b
        ranks[module] = int(a.shape[0])
    # the most common rank is r; the others go into rank_pattern (ties: the larger rank, usually all experts)
    r = max(Counter(ranks.values()).items(), key=lambda kv: (kv[1], kv[0]))[0]
    pattern = {re.escape(module): rank for module, rank in sorted(ranks.items()) if rank != r}
    config = {
        "peft_type": "LORA",
        "task_type": _common(adapter.task_type for _, adapter, _ in terms),
        "base_model_name_or_path": _common(adapter.base_model_name_or_path for _, adapter, _ in terms),
        "r": r,
        "lora_alpha": r,
        "use_rslora": False,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": False,
        "modules_to_save": None,
    }
    return config, tensors


def adapter_to(adapter: LoraAdapter, device: str | torch.device) -> LoraAdapter:
    """The adapter with its factors on ``device`` (deltas and concatenations are then computed there)."""
    modules = {k: dataclasses.replace(m, a=m.a.to(device), b=m.b.to(device)) for k, m in adapter.modules.items()}
    return dataclasses.replace(adapter, modules=modules)


def lora_delta(adapters: Mapping[str, LoraAdapter], weights: Mapping[str, float]) -> dict[str, Tensor]:
    """Dense float32 ``sum_i w_i s_i B_i @ A_i`` per base parameter (the same blocks as :func:`concat_adapter`)."""
    out: dict[str, Tensor] = {}
    for param, blocks in _blocks_by_param(_terms(adapters, weights)).items():
        a, b = _stack(param, blocks, torch.float32)
        out[param] = b @ a
    return out


def expert_delta(adapter: LoraAdapter) -> dict[str, Tensor]:
    """One expert's dense float32 task vector ``s * B @ A`` per base parameter (input to the merge registry)."""
    _terms({"expert": adapter}, {})  # refuses non-LoRA trainables
    return {
        param: (m.b.to(torch.float32) @ m.a.to(torch.float32)).mul_(m.scale) for param, m in adapter.modules.items()
    }


def fingerprint(
    adapters: Mapping[str, LoraAdapter],
    weights: Mapping[str, float],
    method: str = "linear",
    params: Mapping[str, Any] | None = None,
) -> str:
    """sha256 naming a proxy: the experts' content hashes with their rounded weights, the method and its params.

    Expert names and order do not enter (renaming a domain does not change the proxy), nor do zero-weight experts.
    """
    rounded = [(a.content_hash, round(w, WEIGHT_DECIMALS) + 0.0) for _, a, w in _terms(adapters, weights)]
    entries = sorted((h, f"{w:.{WEIGHT_DECIMALS}f}") for h, w in rounded if w != 0.0)
    payload = {"v": 1, "method": method, "params": dict(params or {}), "experts": entries}
    try:
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise DmoError(f"merge parameters {params!r} must be plain JSON values: {exc}") from exc
    return hashlib.sha256(text.encode()).hexdigest()


def base_name(ref: str | None) -> str:
    """The comparable part of a base model reference: a local folder and a hub id of the same model share it."""
    return PurePosixPath(str(ref).rstrip("/")).name.lower() if ref else ""


def check_same_base(adapters: Sequence[tuple[str, LoraAdapter]], expected: str | None = None) -> None:
    """Refuse experts trained on different base models (task vectors of different bases do not add up).

    Only the last component of ``base_model_name_or_path`` is compared, so ``Qwen/Qwen2-VL-2B-Instruct`` and
    ``/scratch/Qwen2-VL-2B-Instruct`` count as the same base; an adapter that records no base is not checked.
    """
    want = base_name(expected)
    for name, adapter in adapters:
        have = base_name(adapter.base_model_name_or_path)
        if not have:
            continue
        if not want:
            want, expected = have, adapter.base_model_name_or_path
        elif have != want:
            raise DmoError(
                f"expert {name!r} ({adapter.folder}) was trained on base {adapter.base_model_name_or_path!r}, "
                f"not {expected!r}: every expert must be fine-tuned from the same base model"
            )


def _terms(adapters: Mapping[str, LoraAdapter], weights: Mapping[str, float]) -> list[tuple[str, LoraAdapter, float]]:
    """(name, adapter, weight) for the experts with a non-zero weight, in the order of ``adapters``."""
    if not adapters:
        raise DmoError("no LoRA experts given")
    unknown = [k for k in weights if k not in adapters]
    if unknown:
        raise DmoError(f"weight given for unknown expert {unknown[0]!r}; the experts are {sorted(adapters)}")
    terms = []
    for name, adapter in adapters.items():
        if adapter.extra:
            raise DmoError(
                f"expert {name!r} ({adapter.folder}) has non-LoRA trainables ({next(iter(adapter.extra))}): it is not "
                "a low-rank delta; merge it with the streaming dense merge (dmo merge --as dense)"
            )
        w = weights.get(name, 0.0)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise DmoError(f"weight of expert {name!r} is {w!r}: weights must be finite numbers")
        if w != 0:
            terms.append((name, adapter, float(w)))
    check_same_base([(name, adapter) for name, adapter, _ in terms])
    return terms


def _blocks_by_param(terms: list[tuple[str, LoraAdapter, float]]) -> dict[str, list[tuple[float, LoraModule, str]]]:
    """Per base parameter, the (w_i * s_i, module, expert name) blocks of the experts that adapt it."""
    blocks: dict[str, list[tuple[float, LoraModule, str]]] = {}
    for name, adapter, w in terms:
        for param, module in adapter.modules.items():
            blocks.setdefault(param, []).append((w * module.scale, module, name))
    for param, items in blocks.items():
        shapes = {m.shape for _, m, _ in items}
        if len(shapes) > 1:
            seen = ", ".join(f"{n}: {m.shape}" for _, m, n in items)
            raise DmoError(f"experts disagree on the shape of {param} ({seen}): they were trained on different bases")
    return dict(sorted(blocks.items()))


def _stack(param: str, blocks: list[tuple[float, LoraModule, str]], dtype: torch.dtype | None) -> tuple[Tensor, Tensor]:
    """A = [A_1; ...; A_K] and B = [c_1 B_1, ..., c_K B_K] with c_i = w_i s_i, scaled in float32 before casting.

    With ``dtype=None``, A takes the experts' (promoted) dtype and B at least float32. Time here is mostly spent
    obtaining fresh memory for the outputs, so nothing is allocated twice.
    """
    out_features, in_features = blocks[0][1].shape
    rank = sum(m.rank for _, m, _ in blocks)
    a_dtype = dtype or functools.reduce(torch.promote_types, (m.a.dtype for _, m, _ in blocks))
    b_dtype = dtype or functools.reduce(torch.promote_types, (m.b.dtype for _, m, _ in blocks), torch.float32)
    device = blocks[0][1].a.device  # experts kept on a GPU are stacked there
    a = torch.empty(rank, in_features, dtype=a_dtype, device=device)
    b = torch.empty(out_features, rank, dtype=b_dtype, device=device)
    start = 0
    for coef, m, _ in blocks:
        stop = start + m.rank
        a[start:stop].copy_(m.a)
        if m.b.dtype == b_dtype:
            torch.mul(m.b, coef, out=b[:, start:stop])  # one pass: fresh-memory bandwidth is the cost here
        elif b_dtype in (torch.float32, torch.float64):
            b[:, start:stop].copy_(m.b).mul_(coef)  # copy_ upcasts exactly; the product is then taken in b's dtype
        else:
            b[:, start:stop].copy_(m.b.to(torch.float32).mul(coef))
        start = stop
    return a, b


def _common(values: Any) -> Any:
    distinct = set(values)
    return distinct.pop() if len(distinct) == 1 else None
