"""Batched greedy answers from a Qwen2-VL-style model, and the exact-match metric.

This is the one inference path of the tiny world: the builder's accuracy tables and dmo's scoring layer both
call it, so ground truth and proxy scores are measured the same way. Running the processor costs about as
much as a forward pass of the tiny model, so prompts can be encoded once with :func:`encode` and the result
reused for every model scored on the same benchmark (:func:`generate_encoded`); :func:`generate`, which the scoring
layer calls once per model with the same images and questions, does that reuse itself (:class:`EncodingCache`).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
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
    model: Any, processor: Any, batches: Sequence[Mapping[str, Any]], max_new_tokens: int = 8
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


Encoded = list[dict[str, torch.Tensor]]


class EncodingCache:
    """Processor outputs by content (the processor, the images' pixels, the questions, the batch size), bounded in
    bytes, least recently used out first.

    A study scores every proxy on the same benchmark items, and the processor's output depends on its inputs only,
    so each batch is encoded once per process. Keyed by a digest of the pixels, not by object identity: the
    evaluation harness hands over fresh image objects for every model. An entry holds its processor, so the
    processor's ``id`` in the key cannot be reused while the entry lives.
    """

    def __init__(self, max_bytes: int = 512 * 2**20) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[int, bytes], tuple[Any, Encoded, int]] = OrderedDict()
        self._bytes = 0

    @staticmethod
    def digest(images: Sequence[ImageLike] | np.ndarray, questions: Sequence[str], batch_size: int) -> bytes:
        h = hashlib.blake2b(digest_size=20)
        h.update(f"{batch_size}|{len(questions)}|".encode())
        for q in questions:
            h.update(q.encode() + b"\0")
        for image in images:
            t = _as_chw_uint8(image)
            h.update(f"{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.numpy().tobytes())
        return h.digest()

    def encode(
        self, processor: Any, images: Sequence[ImageLike] | np.ndarray, questions: Sequence[str], batch_size: int
    ) -> Encoded:
        key = (id(processor), self.digest(images, questions, batch_size))
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key][1]
        batches = encode(processor, images, questions, batch_size)
        size = sum(v.numel() * v.element_size() for b in batches for v in b.values() if isinstance(v, torch.Tensor))
        self._entries[key] = (processor, batches, size)
        self._bytes += size
        while self._bytes > self.max_bytes and len(self._entries) > 1:
            _, (_, _, old) = self._entries.popitem(last=False)
            self._bytes -= old
        return batches

    def __len__(self) -> int:
        return len(self._entries)


_CACHE = EncodingCache()


def generate(
    model: Any,
    processor: Any,
    images: Sequence[ImageLike],
    questions: Sequence[str],
    max_new_tokens: int = 8,
    batch_size: int = 64,
) -> list[str]:
    """Answer each question about its image by greedy decoding; returns one stripped string per question."""
    return generate_encoded(model, processor, _CACHE.encode(processor, images, questions, batch_size), max_new_tokens)


def normalize(text: str) -> str:
    return " ".join(text.split()).lower()


def exact_match(pred: str, answer: str) -> bool:
    """Case- and whitespace-insensitive equality (runs of whitespace count as one space; ends are stripped)."""
    return normalize(pred) == normalize(answer)


def accuracy(preds: Sequence[str], answers: Sequence[str]) -> float:
    if len(preds) != len(answers):
        raise ValueError(f"{len(preds)} predictions but {len(answers)} answers")
    return sum(exact_match(p, a) for p, a in zip(preds, answers)) / max(len(answers), 1)
