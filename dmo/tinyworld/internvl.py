"""A tiny, randomly initialised, but entirely real InternVL in transformers' own layout (``-HF`` exports).

The DMO paper's second model family is InternVL3.5; the paper converts its checkpoints to the HF layout
(``InternVLForConditionalGeneration``: ``model.vision_tower``, ``model.multi_modal_projector``,
``model.language_model``, ``lm_head``) before merging. :func:`build_internvl_world` writes such a checkpoint
(config, safetensors, a word-level tokenizer with InternVL's special tokens and an ``InternVLProcessor``) plus one
LoRA expert (PEFT, on the language model's linear layers, the paper's recipe) and one full fine-tune (every tensor
perturbed, vision tower included, so that the paper's full-merge filter has something to keep out) per domain, and
one manifest per expert kind. Nothing is trained and nothing is downloaded: it builds in seconds and exists so that
dmo's merge, scoring and serving paths run on the real InternVL architecture.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    GotOcr2ImageProcessor,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    InternVLVideoProcessor,
    PreTrainedTokenizerFast,
)

from dmo.atomic import atomic_dir
from dmo.errors import DmoError
from dmo.tinyworld.model import special_token_ids
from dmo.tinyworld.render import vocabulary

#: InternVL3's chat tokens (its text tower is Qwen2's) and image tokens, plus an unknown-word token.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<video>",
    "<|unk|>",
)
#: The names InternVLProcessor reads from its tokenizer (``tokenizer.start_image_token`` and so on).
IMAGE_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
#: InternVL-HF's chat template without its default system turn (as the tiny Qwen2-VL world does): an image is
#: one ``<IMG_CONTEXT>`` line, which the processor expands to ``<img>`` + one context token per image token +
#: ``</img>``.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<IMG_CONTEXT>\n"
    "{% elif content['type'] == 'video' %}<video>\n"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CHAT_WORDS = ("system", "user", "assistant", ":", ".", ",")
#: LoRA targets: every linear layer of the language model (attention and MLP), none of the vision tower or
#: projector, as in the paper's LLaMA-Factory recipe.
LORA_TARGET_REGEX = r"^.*language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"


@dataclass(frozen=True)
class InternVLWorld:
    """Where :func:`build_internvl_world` put everything."""

    root: Path
    base: Path
    lora: dict[str, Path] = field(default_factory=dict)
    full: dict[str, Path] = field(default_factory=dict)
    lora_manifest: Path | None = None
    full_manifest: Path | None = None


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny world's words and single digits, with InternVL's special tokens.

    Unlike the Qwen2-VL world's it has no ``##`` continuation pieces: an answer that starts with one decodes
    differently in one piece (transformers) and incrementally after the prompt (vLLM), and this world is compared
    answer by answer across the two.
    """
    words = list(dict.fromkeys([*_CHAT_WORDS, *vocabulary()]))
    pieces = [*SPECIAL_TOKENS, *words, *(str(i) for i in range(10))]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(pieces)}, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|unk|>",
        padding_side="left",
        model_max_length=1024,
        extra_special_tokens=dict(IMAGE_TOKENS),
    )


def build_processor(image_size: int = 56, patch_size: int = 14) -> InternVLProcessor:
    """One tile per image at ``image_size`` (no dynamic tiling: tiny images), ``(side/patch)^2 / 4`` tokens each."""
    size = {"height": image_size, "width": image_size}
    return InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size=size, crop_to_patches=False, max_patches=1),
        tokenizer=build_tokenizer(),
        video_processor=InternVLVideoProcessor(size=size),
        image_seq_length=image_seq_length(image_size, patch_size),
        chat_template=CHAT_TEMPLATE,
    )


def image_seq_length(image_size: int, patch_size: int, downsample_ratio: float = 0.5) -> int:
    return int((image_size // patch_size) ** 2 * downsample_ratio**2)


def model_config(tokenizer: PreTrainedTokenizerFast, image_size: int = 56, patch_size: int = 14) -> InternVLConfig:
    """A 2-layer Qwen2 text tower (head dim 32, which vLLM's CPU attention accepts) and a 1-layer InternViT."""
    if image_size % (2 * patch_size):
        raise DmoError(f"image_size {image_size} must be a multiple of 2 x patch_size ({2 * patch_size})")
    ids = special_token_ids(tokenizer, {t: t for t in ("<|endoftext|>", "<|im_end|>", "<IMG_CONTEXT>")}, "InternVL")
    # no unused head room: a random model would otherwise answer in ids no tokenizer can decode
    vocab = len(tokenizer)
    text = dict(
        model_type="qwen2",
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )
    vision = dict(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=[image_size, image_size],
        patch_size=[patch_size, patch_size],
        attention_bias=True,
    )
    return InternVLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<IMG_CONTEXT>"],
        image_seq_length=image_seq_length(image_size, patch_size),
        tie_word_embeddings=False,
    )


def init_model(
    tokenizer: PreTrainedTokenizerFast, seed: int = 0, image_size: int = 56
) -> InternVLForConditionalGeneration:
    """Random float32 model; its weights depend only on ``seed``."""
    config = model_config(tokenizer, image_size)
    config._attn_implementation = "eager"  # no backend-dependent numerics between runs
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = InternVLForConditionalGeneration(config)
        # Larger than the 0.02 default init so that experts and proxies answer differently at this size.
        for p in model.parameters():
            p.data.add_(torch.randn_like(p) * 0.05)
    text = config.get_text_config()
    pad, eos = text.pad_token_id, text.eos_token_id
    model.generation_config.pad_token_id = pad
    model.generation_config.eos_token_id = [eos, pad]
    model.generation_config.do_sample = False
    return model.float().eval()


def _lora_expert(base: InternVLForConditionalGeneration, out: Path, seed: int, rank: int) -> None:
    """A PEFT adapter whose B factors are random too (PEFT initialises B = 0, which would be no expert at all)."""
    import copy

    import peft

    cfg = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGET_REGEX, lora_dropout=0.0)
    model = peft.get_peft_model(copy.deepcopy(base), cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(str(out))


def _full_expert(base: InternVLForConditionalGeneration, processor: InternVLProcessor, out: Path, seed: int) -> None:
    """Every floating tensor moved a little: vision tower, projector, language model, embeddings and head."""
    import copy

    model = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_pretrained(str(out))
    processor.save_pretrained(str(out))


def build_internvl_world(
    root: str | Path,
    domains: tuple[str, ...] = ("general", "ocr"),
    *,
    seed: int = 0,
    lora_rank: int = 4,
    image_size: int = 56,
) -> InternVLWorld:
    """Write ``root/{base, lora/<domain>, full/<domain>, internvl-lora.yaml, internvl-full.yaml}`` (atomically)."""
    root = Path(root)
    if not domains or len(set(domains)) != len(domains):
        raise DmoError(f"domains must be distinct and non-empty, got {list(domains)}")
    processor = build_processor(image_size)
    model = init_model(processor.tokenizer, seed, image_size)
    with atomic_dir(root) as tmp:
        model.save_pretrained(str(tmp / "base"))
        processor.save_pretrained(str(tmp / "base"))
        for i, domain in enumerate(domains):
            _lora_expert(model, tmp / "lora" / domain, seed * 1000 + 2 * i + 1, lora_rank)
            _full_expert(model, processor, tmp / "full" / domain, seed * 1000 + 2 * i + 2)
        for kind in ("lora", "full"):
            lines = [f"name: tiny-internvl-{kind}", "base: ./base", f"kind: {kind}", "experts:"]
            lines += [f"  {d}: ./{kind}/{d}" for d in domains]
            (tmp / f"internvl-{kind}.yaml").write_text("\n".join(lines) + "\n")
    return InternVLWorld(
        root=root,
        base=root / "base",
        lora={d: root / "lora" / d for d in domains},
        full={d: root / "full" / d for d in domains},
        lora_manifest=root / "internvl-lora.yaml",
        full_manifest=root / "internvl-full.yaml",
    )
