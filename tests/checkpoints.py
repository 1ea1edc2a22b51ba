"""Shared helpers of the merge tests: tiny Qwen2-shaped checkpoints written as real safetensors files, a naive
linear reference, and comparisons. Test modules import these; the fixtures built on them are in conftest.py.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

HIDDEN, INTER, LAYERS, HEADS, KV, VOCAB = 16, 48, 2, 4, 2, 40
VISUAL = {
    "visual.patch_embed.proj.weight": (16, 12),
    "visual.blocks.0.attn.qkv.weight": (48, 16),
    "visual.merger.mlp.0.weight": (16, 16),
}


def qwen2_config(tied: bool = False) -> dict:
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV, "vocab_size": VOCAB, "max_position_embeddings": 64, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": tied, "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2,
    }  # fmt: skip


def qwen2_shapes(visual: bool = False) -> dict[str, tuple[int, ...]]:
    head = HIDDEN // HEADS
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (HIDDEN,),
            p + "self_attn.q_proj.weight": (HEADS * head, HIDDEN), p + "self_attn.q_proj.bias": (HEADS * head,),
            p + "self_attn.k_proj.weight": (KV * head, HIDDEN), p + "self_attn.k_proj.bias": (KV * head,),
            p + "self_attn.v_proj.weight": (KV * head, HIDDEN), p + "self_attn.v_proj.bias": (KV * head,),
            p + "self_attn.o_proj.weight": (HIDDEN, HEADS * head),
            p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "mlp.gate_proj.weight": (INTER, HIDDEN), p + "mlp.up_proj.weight": (INTER, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTER),
        }  # fmt: skip
    shapes |= {"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)}
    if visual:
        shapes |= VISUAL
    return shapes


def write_model(folder: Path, tensors: Mapping[str, torch.Tensor], *, shards: int = 1, side_files: bool = True) -> Path:
    """A model folder as transformers writes it: one file, or ``shards`` files plus the index."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    if shards == 1:
        save_file(dict(tensors), str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        per = math.ceil(len(names) / shards)
        weight_map = {}
        for i in range(shards):
            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[i * per : (i + 1) * per]}
            save_file(part, str(folder / file), metadata={"format": "pt"})
            weight_map |= dict.fromkeys(part, file)
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    if side_files:
        (folder / "config.json").write_text(json.dumps(qwen2_config()))
        (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
        (folder / "preprocessor_config.json").write_text(json.dumps({"patch_size": 2}))
    return folder


def make_set(
    root: Path, dtype: torch.dtype = torch.bfloat16, *, n: int = 3, shards: int = 2, visual: bool = False, seed: int = 0
) -> tuple[Path, dict[str, Path]]:
    """A base and ``n`` experts (base + noise in every tensor), all non-zero."""
    g = torch.Generator().manual_seed(seed)
    shapes = qwen2_shapes(visual)
    base = {k: (torch.randn(s, generator=g) * 0.5 + 0.1).to(dtype) for k, s in shapes.items()}
    base_folder = write_model(root / "base", base, shards=shards)
    experts = {}
    for i in range(n):
        tensors = {k: (v.float() + 0.05 * torch.randn(v.shape, generator=g)).to(dtype) for k, v in base.items()}
        experts[f"e{i}"] = write_model(root / f"e{i}", tensors, shards=shards)
    return base_folder, experts


def load_model(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out |= load_file(str(f))
    return out


def assert_same_model(actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    """Equal up to float32 rounding (fp32), or up to one rounding step of the output dtype (bf16/fp16).

    dmo sums ``c * base + sum w_i theta_i`` where the references sum ``base + sum w_i (theta_i - base)``; in float32
    they agree to ~1e-7, which rounds to the same bf16 value except at rounding boundaries (one ulp, rarely).
    """
    assert set(actual) == set(expected)
    exact = total = 0
    for k, e in expected.items():
        a = actual[k]
        assert a.dtype == e.dtype and a.shape == e.shape, k
        if e.dtype == torch.float32:
            torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6, msg=k)
        else:
            torch.testing.assert_close(a.float(), e.float(), rtol=2**-7, atol=1e-6, msg=k)
            exact += int((a == e).sum())
            total += e.numel()
    assert exact >= 0.97 * total, f"only {exact}/{total} low-precision entries identical"


def linear_reference(
    base: Path, experts: Mapping[str, Path], weights: Mapping[str, float], *, scale: float = 1.0, keep=lambda n: True
) -> dict[str, torch.Tensor]:
    b = load_model(base)
    xs = {e: load_model(p) for e, p in experts.items() if weights.get(e, 0)}
    out = {}
    for k, v in b.items():
        if not keep(k):
            out[k] = v
            continue
        acc = v.float().clone()
        for e, x in xs.items():
            acc += scale * weights[e] * (x[k].float() - v.float())
        out[k] = acc.to(v.dtype)
    return out


def assert_nothing_left(parent: Path, out: Path) -> None:
    assert not out.exists()
    leftovers = [p.name for p in parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert not leftovers, leftovers


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and message
    return message


# ------------------------------------------------------------------------------------------------------- linear
