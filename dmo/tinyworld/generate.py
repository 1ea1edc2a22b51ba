"""Batched greedy answers from a Qwen2-VL-style model, and the exact-match metric.

This is the one inference path of the tiny world: the builder's accuracy tables and dmo's scoring layer both
call it, so ground truth and proxy scores are measured the same way. Running the processor costs about as
much as a forward pass of the tiny model, so prompts can be encoded once with :func:`encode` and the result
reused for every model scored on the same benchmark (:func:`generate_encoded`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

ImageLike = Image.Image | np.ndarray | torch.Tensor


def chat_prompt(processor: Any, question: str) -> str:
    """The chat-template text of one user turn (one image + ``question``), with the generation prompt."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _as_chw_uint8(image: ImageLike) -> torch.Tensor:
    # The image processor takes CHW tensors in one vectorised pass; PIL images go through a slower path.
    if isinstance(image, Image.Image):
        image = np.array(image.convert("RGB"))
    t = torch.from_numpy(np.array(image)) if isinstance(image, np.ndarray) else image
    if t.ndim != 3:
        raise ValueError(f"expected one HWC or CHW image, got shape {tuple(t.shape)}")
    return t.permute(2, 0, 1).contiguous() if t.shape[-1] in (1, 3) and t.shape[0] not in (1, 3) else t


def encode(
    processor: Any, images: Sequence[ImageLike] | np.ndarray, questions: Sequence[str], batch_size: int = 64
) -> list[dict[str, torch.Tensor]]:
    """Processor outputs for ``(image, question)`` pairs, in left-padded batches of ``batch_size``.

    ``images`` may be PIL images, HWC uint8 arrays, or one ``(N, H, W, 3)`` uint8 array.
    """
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions")
    prompts: dict[str, str] = {}
    batches = []
    for start in range(0, len(questions), batch_size):
        qs = questions[start : start + batch_size]
        texts = [prompts.setdefault(q, chat_prompt(processor, q)) for q in qs]
        imgs = [_as_chw_uint8(im) for im in images[start : start + batch_size]]
        batch = processor(text=texts, images=imgs, padding=True, padding_side="left", return_tensors="pt")
        batches.append(dict(batch))
    return batches


@torch.inference_mode()
def generate_encoded(
    model: Any, processor: Any, batches: Sequence[dict[str, torch.Tensor]], max_new_tokens: int = 8
) -> list[str]:
    """Greedy answers for batches made by :func:`encode` (stripped, special tokens removed)."""
    tokenizer = processor.tokenizer
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.pad_token_id]
    was_training = model.training
    model.eval()
    answers: list[str] = []
    try:
        for batch in batches:
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id,
            )
            new = out[:, batch["input_ids"].shape[1] :]
            answers += [a.strip() for a in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        model.train(was_training)
    return answers


def generate(
    model: Any,
    processor: Any,
    images: Sequence[ImageLike],
    questions: Sequence[str],
    max_new_tokens: int = 8,
    batch_size: int = 64,
) -> list[str]:
    """Answer each question about its image by greedy decoding; returns one stripped string per question."""
    return generate_encoded(model, processor, encode(processor, images, questions, batch_size), max_new_tokens)


def normalize(text: str) -> str:
    return " ".join(text.split()).lower()


def exact_match(pred: str, answer: str) -> bool:
    """Case- and whitespace-insensitive equality (runs of whitespace count as one space; ends are stripped)."""
    return normalize(pred) == normalize(answer)


def accuracy(preds: Sequence[str], answers: Sequence[str]) -> float:
    if len(preds) != len(answers):
        raise ValueError(f"{len(preds)} predictions but {len(answers)} answers")
    return sum(exact_match(p, a) for p, a in zip(preds, answers)) / max(len(answers), 1)
