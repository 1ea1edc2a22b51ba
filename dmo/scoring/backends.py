"""The scoring backends dmo ships, each as a registry entry: where its scorer class lives and the options model of
its space section. Entry points (``dmo.scorers`` in ``pyproject.toml``) name these objects, so listing the backends
and validating a space's options imports no backend (they pull in torch, transformers, lmms-eval, vLLM).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field

from dmo.configfile import Strict

__all__ = ["HF", "REPLAY", "VLLM", "Backend", "HFOptions", "ReplayOptions", "VLLMOptions", "VLLMSection"]


class BackendOptions(Strict):
    """A backend's own keys in a space's ``scoring`` section; ``to_kwargs`` turns them into factory arguments."""

    def to_kwargs(self) -> dict[str, Any]:
        return self.model_dump()


class HFOptions(BackendOptions):
    """The hf backend has no options of its own (limit, batch size and device are common to all)."""


class ReplayOptions(BackendOptions):
    #: the recorded results table to answer from (``scores.jsonl`` or its folder)
    table: str | None = None
    #: whether the nearest recorded mixture may answer for one that was not recorded
    nearest: bool = False


class VLLMOptions(Strict):
    """The vllm backend's engine: LoRA serving of exact linear proxies, weight writes for the rest."""

    lora: bool | None = Field(
        default=None,
        description="serve linear/RobustMerge proxies of LoRA experts as adapters (default: on a GPU, not on a CPU)",
    )
    max_lora_rank: int | None = Field(default=None, description="default: the smallest vLLM rank >= sum of ranks")
    max_loras: int = Field(default=4, gt=0, description="adapters (proxies) in flight together")
    gpu_memory_utilization: float | None = Field(
        default=None, gt=0, le=1, description="default: 0.85 of a GPU; on a CPU a fixed 1 GiB KV cache instead"
    )
    max_model_len: int | None = Field(default=None, gt=0)
    dtype: str = "auto"
    store: Literal["device", "host"] = Field(default="device", description="where the expert bank lives")
    engine: dict[str, Any] = Field(default_factory=dict, description="extra vllm.LLM keyword arguments")


class VLLMSection(BackendOptions):
    """``scoring: {backend: vllm, vllm: {...}}``: the engine options sit under their own key."""

    vllm: VLLMOptions | None = None

    def to_kwargs(self) -> dict[str, Any]:
        return (self.vllm or VLLMOptions()).model_dump()


@dataclass(frozen=True)
class Backend:
    #: ``module:Class`` of the scorer, imported only when one is made
    factory: str
    options: type[BackendOptions]

    def load(self) -> Any:
        module, _, name = self.factory.partition(":")
        return getattr(importlib.import_module(module), name)


HF = Backend("dmo.scoring.hf_backend:HFScorer", HFOptions)
REPLAY = Backend("dmo.scoring.replay_backend:ReplayScorer", ReplayOptions)
VLLM = Backend("dmo.scoring.vllm.backend:VLLMScorer", VLLMSection)
