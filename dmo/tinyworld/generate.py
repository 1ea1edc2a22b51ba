"""Batched greedy answers from a Qwen2-VL-style model, and the exact-match metric.

This is the one inference path of the tiny world: the builder's accuracy tables and dmo's scoring layer both
call it, so ground truth and proxy scores are measured the same way. Running the processor costs about as
much as a forward pass of the tiny model, so prompts can be encoded once with :func:`encode` and the result
reused for every model scored on the same benchmark (:func:`generate_encoded`); :func:`generate`, which the scoring
layer calls once per model with the same images and questions, does that reuse itself (:class:`EncodingCache`).
"""

from __future__ import annotations

import hashlib
import inspect
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
        t = torch.from_numpy(np.array(image if image.mode == "RGB" else image.convert("RGB")))
    else:
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

    # The default world's four benchmarks (1000 items each) hold ~680 MB of pixel values. A study cycles through
    # its benchmarks for every proxy, and least-recently-used on a cycle longer than the cache misses every time:
    # at 512 MB a 4d study re-encoded every benchmark for every proxy (its scoring more than twice as slow).
    def __init__(self, max_bytes: int = 1024 * 2**20) -> None:
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
            if isinstance(image, Image.Image) and image.mode == "RGB":  # its bytes as they are: no copy to a tensor
                h.update(f"pil{image.size}".encode())
                h.update(image.tobytes())
                continue
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


def unwrapped(model: Any) -> Any:
    """The transformers model inside a bare or PEFT-wrapped one."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def encoder_outputs(features: torch.Tensor) -> dict[str, Any]:
    """``mm_encoder_outputs`` for a model's forward or ``generate``: the vision tower's output for a batch's images
    (``(images, tokens, hidden)``, in the batch's order), which the model then takes instead of running its tower."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    # a tuple of tensors, as get_image_features returns it (the annotation says Tensor)
    pooled = (features.flatten(0, 1),)
    return {"image": BaseModelOutputWithPooling(pooler_output=pooled)}  # type: ignore[arg-type]


#: Vision towers up to this many parameters are fingerprinted by content (a fraction of a millisecond for the tiny
#: world's), so that their output can be reused; a larger tower runs on every call.
MAX_FINGERPRINTED = 5_000_000


def vision_fingerprint(model: Any) -> bytes | None:
    """A digest of the weights of ``model``'s vision tower, or None when it has none that a forward can skip
    (transformers' ``mm_encoder_outputs``) or it is too large to digest on every call."""
    inner = unwrapped(model)
    vlm = getattr(inner, "model", None)
    tower = getattr(vlm, "visual", None)
    if not isinstance(tower, torch.nn.Module) or not hasattr(vlm, "get_image_features"):
        return None
    if "mm_encoder_outputs" not in inspect.signature(inner.forward).parameters:
        return None
    params = list(tower.state_dict().items())
    if sum(t.numel() for _, t in params) > MAX_FINGERPRINTED:
        return None
    h = hashlib.blake2b(digest_size=20)
    for name, t in params:
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.digest()


class VisionCache:
    """Encoded batches with the vision tower's output in place of their pixels, by (batches, tower weights).

    Every proxy of a study whose experts adapt the language model only (LoRA on it, as in the DMO paper's recipe)
    has the base's vision tower, so its output on a benchmark's images is computed once per process instead of
    once per proxy, and so are the batches' M-RoPE position ids (they depend on the tokens only): the answers are the
    same (the model takes the same numbers through ``mm_encoder_outputs`` and ``position_ids``), an evaluation about
    half as long on the tiny world. Keyed by the content of the tower's weights, so a proxy that does change the
    tower gets its own entry; bounded in bytes, least recently used out first.
    """

    def __init__(self, max_bytes: int = 256 * 2**20) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[int, bytes], tuple[Encoded, list[dict[str, Any]], int]] = OrderedDict()
        self._bytes = 0

    def batches(self, model: Any, encoded: Encoded) -> Sequence[Mapping[str, Any]]:
        digest = vision_fingerprint(model)
        if digest is None or not all("pixel_values" in b and "image_grid_thw" in b for b in encoded):
            return encoded
        key = (id(encoded), digest)  # the entry holds ``encoded``, so its id cannot be reused while it lives
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key][1]
        inner = unwrapped(model)
        out, size = [], 0
        with torch.inference_mode():
            for b in encoded:
                feats = inner.model.get_image_features(b["pixel_values"], b["image_grid_thw"], return_dict=True)
                pooled = torch.stack(list(feats.pooler_output))  # what the forward reads; nothing else is kept
                size += pooled.numel() * pooled.element_size()
                rest: dict[str, Any] = {k: v for k, v in b.items() if k != "pixel_values"}
                rest["mm_encoder_outputs"] = encoder_outputs(pooled)
                if hasattr(inner, "_prepare_position_ids_for_generation"):
                    # generate() would compute these M-RoPE ids (a Python loop per row) for every model again
                    kw = {k: rest[k] for k in ("attention_mask", "mm_token_type_ids", "image_grid_thw") if k in rest}
                    rest["position_ids"] = inner._prepare_position_ids_for_generation(rest["input_ids"], kw)
                out.append(rest)
        self._entries[key] = (encoded, out, size)
        self._bytes += size
        while self._bytes > self.max_bytes and len(self._entries) > 1:
            _, (_, _, old) = self._entries.popitem(last=False)
            self._bytes -= old
        return out

    def __len__(self) -> int:
        return len(self._entries)


_VISION = VisionCache()


def with_vision_outputs(model: Any, encoded: Encoded) -> Sequence[Mapping[str, Any]]:
    """``encoded`` with ``model``'s vision-tower output in place of the pixels, from the process-wide cache (see
    :class:`VisionCache`); ``encoded`` itself when the model's tower cannot be skipped."""
    return _VISION.batches(model, encoded)


def generate(
    model: Any,
    processor: Any,
    images: Sequence[ImageLike],
    questions: Sequence[str],
    max_new_tokens: int = 8,
    batch_size: int = 64,
) -> list[str]:
    """Answer each question about its image by greedy decoding; returns one stripped string per question."""
    encoded = _CACHE.encode(processor, images, questions, batch_size)
    return generate_encoded(model, processor, with_vision_outputs(model, encoded), max_new_tokens)


def normalize(text: str) -> str:
    return " ".join(text.split()).lower()


def exact_match(pred: str, answer: str) -> bool:
    """Case- and whitespace-insensitive equality (runs of whitespace count as one space; ends are stripped)."""
    return normalize(pred) == normalize(answer)


def accuracy(preds: Sequence[str], answers: Sequence[str]) -> float:
    if len(preds) != len(answers):
        raise ValueError(f"{len(preds)} predictions but {len(answers)} answers")
    return sum(exact_match(p, a) for p, a in zip(preds, answers)) / max(len(answers), 1)
