"""The worker extension's packing rule without an engine: what a write must feed besides the tensors it changes."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch

from dmo.errors import DmoError
from dmo.scoring.vllm.worker import companions, packed_modules

QWEN2_PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
CHECKPOINT = [
    f"model.layers.0.{n}"
    for n in (
        "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight", "self_attn.k_proj.bias",
        "self_attn.v_proj.weight", "self_attn.v_proj.bias", "self_attn.o_proj.weight", "mlp.gate_proj.weight",
        "mlp.up_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight",
    )
]  # fmt: skip


class _LanguageModel(torch.nn.Module):
    packed_modules_mapping: ClassVar[dict[str, list[str]]] = QWEN2_PACKED


class _Multimodal(torch.nn.Module):
    """Like vLLM's Qwen2-VL: no packing of its own (the LoRA interface's empty default), its language model's."""

    packed_modules_mapping: ClassVar[dict[str, list[str]]] = {}

    def __init__(self) -> None:
        super().__init__()
        self.visual = torch.nn.Linear(2, 2)
        self.language_model = _LanguageModel()


def test_the_packing_of_a_multimodal_model_is_its_language_models() -> None:
    model = _Multimodal()
    assert packed_modules(model) == QWEN2_PACKED
    own = _LanguageModel()
    assert packed_modules(own) == QWEN2_PACKED
    # q_proj and v_proj changed: k_proj and every bias of qkv_proj go with them; down_proj is a layer of its own
    changed = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight",
               "model.layers.0.mlp.down_proj.weight"]  # fmt: skip
    assert companions(changed, CHECKPOINT, packed_modules(model)) == [
        "model.layers.0.self_attn.q_proj.bias",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.self_attn.k_proj.bias",
        "model.layers.0.self_attn.v_proj.bias",
    ]
    # gate_proj alone needs up_proj (gate_up_proj)
    assert companions(["model.layers.0.mlp.gate_proj.weight"], CHECKPOINT, QWEN2_PACKED) == [
        "model.layers.0.mlp.up_proj.weight"
    ]


def test_children_that_pack_one_layer_differently_are_refused() -> None:
    class Other(torch.nn.Module):
        packed_modules_mapping: ClassVar[dict[str, list[str]]] = {"qkv_proj": ["q_proj", "v_proj"]}

    model = _Multimodal()
    model.other = Other()
    with pytest.raises(DmoError, match="packs qkv_proj"):
        packed_modules(model)
