"""The scoring backends dmo ships, each as a registry entry (:class:`dmo.scoring.base.Backend`): where its scorer
class lives and the model of its own options. Entry points (``dmo.scorers`` in ``pyproject.toml``) name these objects,
so listing the backends and validating a space's options imports no backend (they pull in torch, transformers,
lmms-eval, vLLM).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from dmo.scoring.base import Backend, BackendOptions

__all__ = ["HF", "REPLAY", "VLLM", "ReplayOptions", "VLLMOptions"]


class ReplayOptions(BackendOptions):
    """``scoring: {backend: replay, replay: {table: PATH, nearest: true}}``."""

    #: the recorded results table to answer from (``scores.jsonl`` or its folder; relative to the space file)
    table: Path | None = None
    #: whether the nearest recorded mixture may answer for one that was not recorded
    nearest: bool = False


class VLLMOptions(BackendOptions):
    """``scoring: {backend: vllm, vllm: {...}}``: the engine; LoRA serving of exact linear proxies, weight writes for
    the rest."""

    lora: bool | None = Field(
        default=None,
        description="serve linear/RobustMerge proxies of LoRA experts as adapters (default: on a GPU, not on a CPU)",
    )
    max_lora_rank: int | None = Field(default=None, description="default: the smallest vLLM rank >= sum of ranks")
    max_loras: int = Field(default=4, gt=0, description="adapters (proxies) in flight together")
    gpu_memory_utilization: float | None = Field(
        default=None, gt=0, le=1, description="default: 0.85 of a GPU; on a CPU a fixed 1 GiB KV cache instead"
    )
    max_model_len: int | None = Field(default=None, gt=0, description="the engine's context length (default: vLLM's)")
    dtype: str = Field(default="auto", description="auto: the checkpoint's dtype (not vLLM's own auto)")
    store: Literal["device", "host"] = Field(default="device", description="where the expert bank lives")
    engine: dict[str, Any] = Field(default_factory=dict, description="extra vllm.LLM keyword arguments")


#: the hf backend has no options of its own (limit, batch size and device are common to all: ScoringContext)
HF = Backend("dmo.scoring.hf_backend:HFScorer")
REPLAY = Backend("dmo.scoring.replay_backend:ReplayScorer", ReplayOptions)
VLLM = Backend("dmo.scoring.vllm.backend:VLLMScorer", VLLMOptions)
