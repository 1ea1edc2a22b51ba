"""A word-level tokenizer with Qwen2-VL's special tokens, wrapped as a real ``Qwen2VLProcessor``.

Built locally with the ``tokenizers`` library (no hub download). It is a WordPiece model over a closed word
list, so every question word is one token and a number splits into one token per digit (``472`` ->
``4 ##7 ##2``, decoded back to ``472``), like Qwen's own digit splitting.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoProcessor, PreTrainedTokenizerFast, Qwen2VLProcessor
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

from dmo.tinyworld.config import WorldConfig
from dmo.tinyworld.render import vocabulary

#: Qwen2-VL's special tokens, in Qwen's order, plus an unknown-word token (a closed vocabulary needs one).
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|unk|>",
)
PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
UNK_TOKEN = "<|unk|>"

#: Qwen2-VL's chat template, minus the default "You are a helpful assistant." system turn (it would make
#: every CPU training sequence a third longer and carries no information here); an explicit system message is
#: still rendered. The image placeholder is one <|image_pad|>, which the processor expands per image.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: Words of the chat scaffolding (roles and the add_vision_id prefix), besides the domains' own words.
_CHAT_WORDS = ("system", "user", "assistant", "Picture", ":", ".", ",")


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The tokenizer: special tokens first (ids 0..14), then words, then digits and digit continuations."""
    words = list(dict.fromkeys([*_CHAT_WORDS, *vocabulary()]))
    digits = [str(i) for i in range(10)]
    pieces = [*SPECIAL_TOKENS, *words, *digits, *(f"##{d}" for d in digits)]
    vocab = {tok: i for i, tok in enumerate(pieces)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token=UNK_TOKEN, max_input_chars_per_word=64))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="left",  # generation pads on the left; training builds its own batches
        model_max_length=4096,
    )


def build_processor(config: WorldConfig) -> Qwen2VLProcessor:
    """Image processor pinned to ``image_size`` (min = max pixels: no resize) + tokenizer + chat template."""
    pixels = config.image_size * config.image_size
    size = {"shortest_edge": pixels, "longest_edge": pixels}
    # transformers 5 requires a video processor in Qwen2VLProcessor; it is never used here.
    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size),
        tokenizer=build_tokenizer(),
        video_processor=Qwen2VLVideoProcessor(size=size),
        chat_template=CHAT_TEMPLATE,
    )


def load_processor(folder: Path) -> Qwen2VLProcessor:
    """Load a saved processor offline (never touches a model hub)."""
    return AutoProcessor.from_pretrained(str(folder), local_files_only=True)


def image_tokens(config: WorldConfig) -> int:
    """Number of ``<|image_pad|>`` tokens per image: (side / 14)^2 patches, merged 2x2."""
    return (config.image_size // 28) ** 2
