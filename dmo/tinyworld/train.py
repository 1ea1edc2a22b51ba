"""Training of the tiny world: full pre-training of the base, LoRA SFT of experts and of data mixtures.

Both run on CPU. Token ids are built once per distinct question/answer (there are only a few dozen) and
images come from the uint8 pixel cache, so a training step costs what the model costs: the processor, which
would otherwise dominate, only normalises and patchifies each batch of pixels (one vectorised call).
Loss is on the answer tokens and the closing ``<|im_end|>`` only, as in SFT.

Two things a step would otherwise recompute are computed once: the M-RoPE position ids (a Python loop per row
in transformers, a tenth of a LoRA step; they depend on the token layout only) and, in LoRA runs, the frozen
vision tower's output (a sixth of a step; it depends on the base and the image only, so a worker computes it once
per domain and reuses it for every run). Both are the same numbers the model computes itself (a test compares the
trained adapters bit for bit), so they change the speed, not the world.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dmo.errors import DmoError
from dmo.tinyworld.config import WorldConfig
from dmo.tinyworld.data import load_pixels, read_split
from dmo.tinyworld.generate import chat_prompt, encoder_outputs, unwrapped
from dmo.tinyworld.render import DOMAINS

#: LoRA goes on the language model's linear layers (attention and MLP); the vision tower and the patch merger stay
#: frozen, as the DMO paper's LLaMA-Factory recipe freezes the tower. vLLM serves LoRA on the language model only,
#: so an adapter of this world is served the same by the vllm backend as by the hf backend.
LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_TARGET_REGEX = r"^.*language_model\..*\.(" + "|".join(LORA_TARGETS) + ")$"
IGNORE = -100


@dataclass
class Examples:
    """Encoded training items: token ids (prompt + answer + <|im_end|>) and their images."""

    pixels: np.ndarray | None  # (N, H, W, 3) uint8; None when ``features`` stand in for the images
    input_ids: list[list[int]]
    prompt_lens: list[int]
    domains: list[str]
    #: The frozen vision tower's output for each image, (N, image tokens, hidden), when it was computed beforehand
    #: (LoRA runs); None: the model runs its tower on the pixels at every step.
    features: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.input_ids)


class Encoder:
    """Token ids of chat-formatted (question, answer) pairs, identical to what the processor produces."""

    def __init__(self, processor: Any, image_tokens: int) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_tokens = image_tokens
        self.eos_id = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self._prompts: dict[str, list[int]] = {}
        self._answers: dict[str, list[int]] = {}

    def prompt_ids(self, question: str) -> list[int]:
        if question not in self._prompts:
            # The processor expands the single <|image_pad|> of the template to one per merged image token.
            pad = self.processor.image_token
            text = chat_prompt(self.processor, question).replace(pad, pad * self.image_tokens)
            self._prompts[question] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._prompts[question]

    def answer_ids(self, answer: str) -> list[int]:
        if answer not in self._answers:
            self._answers[answer] = self.tokenizer(answer, add_special_tokens=False)["input_ids"] + [self.eos_id]
        return self._answers[answer]

    def encode(self, question: str, answer: str) -> tuple[list[int], int]:
        prompt = self.prompt_ids(question)
        return prompt + self.answer_ids(answer), len(prompt)


def sft_indices(config: WorldConfig, domain: str, n: int) -> np.ndarray:
    """The SFT items of ``domain``: the first ``n`` of a fixed permutation of its train pool.

    Fixed per world (not per training seed), so mixtures differ only in how much of each domain they take and
    a mixture with more of a domain contains every item of one with less; seeds change init and order only.
    """
    if n > config.train_size:
        raise DmoError(f"{n} samples of {domain!r} requested but its train pool has {config.train_size}")
    perm = np.random.default_rng([config.seed, DOMAINS.index(domain), 101]).permutation(config.train_size)
    return perm[:n]


def pretrain_doses(config: WorldConfig) -> dict[str, int]:
    """Pre-training samples of each domain: ``pretrain_samples`` split in proportion to ``pretrain_weights`` (exact
    counts, the remainder to the largest fractions), or evenly over the domains when there are no weights."""
    k, total = len(config.domains), config.pretrain_samples
    if config.pretrain_weights is None:
        return {d: total // k + (j < total % k) for j, d in enumerate(config.domains)}
    w = np.array([config.pretrain_weights[DOMAINS.index(d)] for d in config.domains], dtype=float)
    exact = total * w / w.sum()
    counts = np.floor(exact).astype(int)
    for j in np.argsort(-(exact - counts), kind="stable")[: total - counts.sum()]:
        counts[j] += 1
    return {d: int(n) for d, n in zip(config.domains, counts)}


def pretrain_indices(config: WorldConfig) -> dict[str, np.ndarray]:
    """The base's mix: ``pretrain_doses`` samples of each domain, cycling through each pool."""
    out = {}
    for d, n in pretrain_doses(config).items():
        perm = np.random.default_rng([config.seed, DOMAINS.index(d), 102]).permutation(config.train_size)
        out[d] = np.resize(perm, n)
    return out


def gather(
    root, processor: Any, image_tokens: int, picks: Mapping[str, np.ndarray], features: FeatureSource | None = None
) -> Examples:
    """Encode the train items ``picks[domain]`` (indices into each domain's train split); with ``features``, also
    take each image's vision-tower output from it (``features(domain)``: the whole train pool's, in order)."""
    enc = Encoder(processor, image_tokens)
    pixels, ids, plens, doms, feats = [], [], [], [], []
    for domain, idx in picks.items():
        if len(idx) == 0:
            continue
        rows = read_split(root, domain, "train")
        if features is not None:
            feats.append(features(domain)[torch.as_tensor(np.asarray(idx))])
        else:
            pixels.append(np.asarray(load_pixels(root, domain, "train", rows))[np.asarray(idx)])
        for i in idx:
            seq, plen = enc.encode(rows[i]["question"], rows[i]["answer"])
            ids.append(seq)
            plens.append(plen)
            doms.append(domain)
    if not ids:
        raise DmoError("nothing to train on: every domain has zero samples")
    return Examples(np.concatenate(pixels) if pixels else None, ids, plens, doms, torch.cat(feats) if feats else None)


#: A domain's train-pool image features, ``(pool size, image tokens, hidden)``.
FeatureSource = Callable[[str], torch.Tensor]


def vision_features(model: Any, processor: Any, pixels: np.ndarray, batch: int = 256) -> torch.Tensor:
    """The vision tower's output (after the patch merger) for each ``(H, W, 3)`` uint8 image: (N, tokens, hidden).

    Each image's rows are computed independently of the others in its batch, so these are the numbers the model
    computes inside a training step, whatever the batching."""
    out = []
    with torch.no_grad():
        for start in range(0, len(pixels), batch):
            chunk = np.array(pixels[start : start + batch])  # a copy: a memory-mapped cache is read-only
            images = torch.from_numpy(chunk).permute(0, 3, 1, 2)
            vision = processor.image_processor(images=images, return_tensors="pt")
            feats = _vlm(model).get_image_features(vision["pixel_values"], vision["image_grid_thw"], return_dict=True)
            out.append(torch.stack(list(feats.pooler_output)))
    return torch.cat(out)


def _vlm(model: Any) -> Any:
    """The ``Qwen2VLModel`` inside a bare or PEFT-wrapped model."""
    return unwrapped(model).model


class Positions:
    """M-RoPE position ids of right-padded rows, from ``get_rope_index`` once per token layout.

    A row's ids depend only on where its image tokens sit and on its length (prompts differ in their questions
    only), so a handful of layouts cover a whole run; padding gets 0, as ``get_rope_index`` gives it."""

    def __init__(self, model: Any, processor: Any, grid_thw: torch.Tensor) -> None:
        self._vlm = _vlm(model)
        self._image = processor.image_token_id
        self._grid = grid_thw.reshape(1, 3)
        self._memo: dict[tuple[int, ...], torch.Tensor] = {}

    def row(self, seq: list[int]) -> torch.Tensor:
        types = tuple(int(t == self._image) for t in seq)
        if types not in self._memo:
            ids = torch.tensor([seq])
            with torch.no_grad():
                pos, _ = self._vlm.get_rope_index(ids, torch.tensor([types]), image_grid_thw=self._grid)
            self._memo[types] = pos[:, 0]
        return self._memo[types]

    def batch(self, seqs: list[list[int]], width: int) -> torch.Tensor:
        out = torch.zeros((3, len(seqs), width), dtype=torch.long)
        for r, seq in enumerate(seqs):
            out[:, r, : len(seq)] = self.row(seq)
        return out


def image_grid(processor: Any, image_size: int) -> torch.Tensor:
    """The ``image_grid_thw`` row of one image of the world's size (every image has it)."""
    blank = torch.zeros((1, 3, image_size, image_size), dtype=torch.uint8)
    return processor.image_processor(images=blank, return_tensors="pt")["image_grid_thw"][0]


def collate(
    processor: Any, ex: Examples, idx: np.ndarray, positions: Positions | None = None
) -> dict[str, torch.Tensor]:
    """Right-padded batch with labels on the answer tokens only.

    With ``positions``, the batch carries its position ids; with ``ex.features``, the vision tower's output in
    place of the pixels (the model then skips its tower)."""
    pad = processor.tokenizer.pad_token_id
    seqs = [ex.input_ids[i] for i in idx]
    width = max(map(len, seqs))
    input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, (i, seq) in enumerate(zip(idx, seqs)):
        input_ids[r, : len(seq)] = torch.tensor(seq)
        labels[r, ex.prompt_lens[i] : len(seq)] = input_ids[r, ex.prompt_lens[i] : len(seq)]
        mask[r, : len(seq)] = 1
    batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    if positions is not None:
        batch["position_ids"] = positions.batch(seqs, width)
    else:
        batch["mm_token_type_ids"] = (input_ids == processor.image_token_id).long()
    if ex.features is not None:
        batch["mm_encoder_outputs"] = encoder_outputs(ex.features[torch.as_tensor(np.asarray(idx))])
        if positions is None:
            raise DmoError("precomputed image features need precomputed position ids")
    else:
        assert ex.pixels is not None
        images = torch.from_numpy(np.ascontiguousarray(ex.pixels[idx])).permute(0, 3, 1, 2)
        vision = processor.image_processor(images=images, return_tensors="pt")
        batch["pixel_values"] = vision["pixel_values"]
        batch["image_grid_thw"] = vision["image_grid_thw"]
    return batch


def warmup_cosine(steps: int, warmup: float) -> Callable[[int], float]:
    n_warm = max(1, round(warmup * steps))

    def factor(step: int) -> float:
        if step < n_warm:
            return (step + 1) / n_warm
        progress = (step - n_warm) / max(1, steps - n_warm)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


@dataclass
class TrainResult:
    steps: int
    seconds: float
    first_loss: float
    final_loss: float  # mean over the last 10% of steps


def fit(
    model: torch.nn.Module,
    processor: Any,
    ex: Examples,
    *,
    lr: float,
    batch: int,
    warmup: float,
    seed: int,
    on_step: Callable[[int, int], None] | None = None,
    image_size: int,
) -> TrainResult:
    """One epoch over ``ex`` in a seeded random order, AdamW with warmup + cosine decay."""
    positions = Positions(model, processor, image_grid(processor, image_size))
    order = np.random.default_rng([seed, 7]).permutation(len(ex))
    batches = [order[i : i + batch] for i in range(0, len(order), batch)]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(len(batches), warmup))
    model.train()
    losses = []
    start = time.perf_counter()
    for step, idx in enumerate(batches):
        out = model(**collate(processor, ex, idx, positions))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        if on_step:
            on_step(step + 1, len(batches))
    tail = losses[-max(1, len(losses) // 10) :]
    return TrainResult(len(batches), time.perf_counter() - start, losses[0], float(np.mean(tail)))


def pretrain(
    model: torch.nn.Module,
    processor: Any,
    root,
    config: WorldConfig,
    image_tokens: int,
    on_step: Callable[[int, int], None] | None = None,
) -> TrainResult:
    """Full fine-tune of the randomly initialised model on a mix of all domains (in place, see pretrain_doses)."""
    ex = gather(root, processor, image_tokens, pretrain_indices(config))
    return fit(
        model,
        processor,
        ex,
        lr=config.pretrain_lr,
        batch=config.pretrain_batch,
        warmup=config.pretrain_warmup,
        seed=config.seed,
        on_step=on_step,
        image_size=config.image_size,
    )


def lora_config(config: WorldConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=0.0,
        target_modules=LORA_TARGET_REGEX,
        bias="none",
        task_type="CAUSAL_LM",
    )


def train_seed(config: WorldConfig, seed: int) -> int:
    """Seed of one LoRA training: derived from the world's seed, so two worlds never share a stream."""
    return int(np.random.default_rng([config.seed, 1000 + seed]).integers(2**31))


def train_lora(
    base: torch.nn.Module,
    processor: Any,
    root,
    config: WorldConfig,
    counts: Mapping[str, int],
    seed: int,
    image_tokens: int,
    features: FeatureSource | None = None,
) -> tuple[Any, TrainResult]:
    """LoRA SFT on ``counts[d]`` samples of each domain ``d``; returns the PEFT model and the run's stats.

    ``base`` is wrapped in place (PEFT injects its layers), so pass a fresh copy for every run. ``features``: the
    base's vision-tower output for each domain's train pool (see :func:`vision_features`), which a process running
    many trainings computes once; None: computed here for this run's images.
    """
    from peft import get_peft_model

    unknown = [d for d in counts if d not in config.domains]
    if unknown:
        raise DmoError(f"domain {unknown[0]!r} is not in this world ({list(config.domains)})")
    picks = {d: sft_indices(config, d, n) for d, n in counts.items() if n > 0}
    ex = gather(root, processor, image_tokens, picks, features)
    if ex.features is None:
        assert ex.pixels is not None
        ex.features, ex.pixels = vision_features(base, processor, ex.pixels), None
    s = train_seed(config, seed)
    torch.manual_seed(s)  # LoRA A matrices are drawn from torch's global generator
    model = get_peft_model(base, lora_config(config))
    result = fit(
        model,
        processor,
        ex,
        lr=config.lora_lr,
        batch=config.lora_batch,
        warmup=config.lora_warmup,
        seed=s,
        image_size=config.image_size,
    )
    return model, result
