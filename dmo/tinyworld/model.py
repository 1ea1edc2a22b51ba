"""A tiny, randomly initialised, but entirely real ``Qwen2VLForConditionalGeneration``.

Real architecture (M-RoPE decoder + ViT with 2x2 patch merger), real config, real save format: whatever dmo
does to it (load, attach LoRA, merge adapters, generate) is what it would do to Qwen2-VL-7B, only smaller.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase, Qwen2VLConfig, Qwen2VLForConditionalGeneration

from dmo.errors import DmoError
from dmo.tinyworld.config import WorldConfig


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def special_token_ids(tokenizer: PreTrainedTokenizerBase, tokens: Mapping[str, str], family: str) -> dict[str, int]:
    """``name -> id`` of each special token; refuses a token the tokenizer does not know."""
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in tokens.items()}
    out = {name: i for name, i in ids.items() if isinstance(i, int) and i != tokenizer.unk_token_id}
    if len(out) < len(ids):
        raise DmoError(f"tokenizer lacks a {family} special token: {ids}")
    return out


def model_config(config: WorldConfig, tokenizer: PreTrainedTokenizerBase) -> Qwen2VLConfig:
    """The HF config; every special-token id is taken from ``tokenizer`` so the two can never disagree."""
    ids = special_token_ids(
        tokenizer,
        {
            "pad": "<|endoftext|>",
            "eos": "<|im_end|>",
            "image": "<|image_pad|>",
            "video": "<|video_pad|>",
            "vision_start": "<|vision_start|>",
            "vision_end": "<|vision_end|>",
        },
        "Qwen2-VL",
    )
    vocab_size = _round_up(len(tokenizer), 64)  # a little head room, as real checkpoints have
    head_dim = config.text_hidden // config.text_heads
    text = dict(
        vocab_size=vocab_size,
        hidden_size=config.text_hidden,
        intermediate_size=config.text_intermediate,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        num_key_value_heads=config.text_kv_heads,
        max_position_embeddings=512,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": config.rope_theta,
            "mrope_section": list(config.mrope_section),
        },
        bos_token_id=ids["pad"],  # as in Qwen2-VL: <|endoftext|> doubles as bos and pad
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
        initializer_range=config.text_init_std,
    )
    assert head_dim == 2 * sum(config.mrope_section)
    vision = dict(
        depth=config.vision_depth,
        embed_dim=config.vision_embed,
        hidden_size=config.text_hidden,  # the merger's output feeds the text tower
        num_heads=config.vision_heads,
        mlp_ratio=config.vision_mlp_ratio,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        initializer_range=config.vision_init_std,
    )
    return Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["image"],
        video_token_id=ids["video"],
        vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"],
        tie_word_embeddings=False,
    )


def init_model(config: WorldConfig, tokenizer: PreTrainedTokenizerBase) -> Qwen2VLForConditionalGeneration:
    """Randomly initialised model; the weights depend only on ``config.seed``."""
    hf_config = model_config(config, tokenizer)
    # "eager" attention: at these sizes it is as fast as SDPA on CPU and has no backend-dependent numerics.
    hf_config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = Qwen2VLForConditionalGeneration(hf_config)
    text = hf_config.get_text_config()
    model.generation_config.pad_token_id = text.pad_token_id
    model.generation_config.eos_token_id = [text.eos_token_id, text.pad_token_id]
    model.generation_config.bos_token_id = text.bos_token_id
    model.generation_config.do_sample = False
    return model.float()


def n_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_base(root: str | Path) -> tuple[Any, Any]:
    """``(model, processor)`` of a world's ``base/`` folder, loaded offline with the stock HF classes."""
    from transformers import AutoProcessor

    folder = Path(root) / "base"
    if not (folder / "config.json").exists():
        raise DmoError(f"no tiny-world base model in {folder}: run build_world() first")
    model = Qwen2VLForConditionalGeneration.from_pretrained(str(folder), local_files_only=True)
    processor = AutoProcessor.from_pretrained(str(folder), local_files_only=True)
    return model.eval(), processor
