"""Every knob of the tiny world in one frozen, hashable object; its hash names the world's cache folder."""

from __future__ import annotations

import hashlib
import json

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dmo.errors import DmoError
from dmo.mixture import check_domain_name
from dmo.tinyworld.render import CELL, DOMAINS

#: Bump when rendering, tokenizer, model or training code changes what a config produces: it is part of the
#: cache key, so stale worlds built by older code are never reused.
FORMAT_VERSION = 6
#: The previous format: every domain pre-trained on an equal share. A config without ``pretrain_weights`` is that
#: world, with the key it had then (the knob stays out of its key), so format 5 stays buildable by name.
PREVIOUS_FORMAT = 5
_NEW_IN_FORMAT_6 = frozenset({"pretrain_weights"})
#: Knobs a small world keeps its own value of when built by name.
_SIZES = frozenset({"train_size", "test_size", "pretrain_samples", "budget"})

#: Knobs that change speed only, never a byte of the artifacts; they stay out of the cache key.
_NOT_IN_KEY = frozenset({"threads"})


class WorldConfig(BaseModel):
    """Knobs of a tiny world. ``WorldConfig()`` is the default one (format 6); ``WorldConfig.small()`` is for tests."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    seed: int = 0
    domains: tuple[str, ...] = DOMAINS
    image_size: int = 84

    # Data: per-domain pool sizes. The test split is the held-out benchmark: 1000 items give a standard error of
    # about 0.016 at 50% accuracy (200, format 5's, gave 0.035: more than the differences to be ranked).
    train_size: int = Field(8192, ge=1)
    test_size: int = Field(1000, ge=1)

    # Text tower (a Qwen2-VL decoder); head_dim = hidden / heads and sum(mrope_section) = head_dim / 2.
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 4
    text_intermediate: int = 256
    mrope_section: tuple[int, int, int] = (4, 6, 6)
    #: Qwen2-VL uses 1e6 for 32k-token contexts. Here sequences are ~30 tokens and M-RoPE hands the image-width
    #: axis the lowest frequencies: at 1e4 neighbouring columns differ by < 0.01 rad, at 10 by ~0.1 rad or more.
    #: (Not by itself what made OCR learnable - the vision init below was - but columns must be told apart.)
    rope_theta: float = 10.0
    # Vision tower (a Qwen2-VL ViT); the merger maps to text_hidden.
    vision_embed: int = 64
    vision_depth: int = 2
    vision_heads: int = 4
    vision_mlp_ratio: int = 4
    #: Std of the random init. Qwen2-VL's 0.02 suits wide towers; with a 64-wide vision tower it makes every
    #: image token nearly the same vector and reading digits stayed at chance for 512 steps; 0.2 learns it.
    text_init_std: float = 0.02
    vision_init_std: float = 0.2

    # Base pre-training: full fine-tune on a mix of all domains. lr >= 3e-3 learned to ignore the image.
    pretrain_samples: int = Field(10752, ge=1)
    #: Relative pre-training share of each of DOMAINS (general, counting, ocr, chart), used for the config's domains.
    #: Format 6 (the default): a small dose (512-1024 samples of the easy domains, 8192 of OCR) leaves every domain
    #: half-learned by the base, so that SFT data still moves its benchmark (benchmarks/results/world_candidates.md).
    #: None: an equal share each (format 5).
    pretrain_weights: tuple[float, float, float, float] | None = (1.0, 0.5, 8.0, 1.0)
    pretrain_lr: float = 6e-4
    pretrain_batch: int = Field(64, ge=1)
    pretrain_warmup: float = Field(0.05, ge=0, lt=1)

    # LoRA SFT of experts (one domain) and of mixtures: the same sample budget for both, as in the paper. Format 5's
    # 4096 left general VQA's training noise above its range across mixtures.
    budget: int = Field(8192, ge=1)
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_lr: float = 2e-3
    lora_batch: int = Field(32, ge=1)
    lora_warmup: float = Field(0.1, ge=0, lt=1)
    #: Seeds of each ground-truth mixture training (seed 0 also trains the experts).
    n_seeds: int = Field(2, ge=1)

    # Evaluation (greedy decoding on the test split).
    eval_batch: int = Field(100, ge=1)
    max_new_tokens: int = Field(6, ge=1)

    #: CPU cores to use: independent trainings run in this many processes with one thread each.
    threads: int = Field(2, ge=1)

    @field_validator("domains")
    @classmethod
    def _known_domains(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for d in v:
            check_domain_name(d)
            if d not in DOMAINS:
                raise DmoError(f"tiny-world domain {d!r} does not exist: choose from {list(DOMAINS)}")
        if len(set(v)) != len(v) or not v:
            raise DmoError(f"tiny-world domains must be distinct and non-empty, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> WorldConfig:
        if self.image_size % CELL or not 2 * CELL <= self.image_size <= 8 * CELL:
            raise DmoError(f"image_size {self.image_size} must be a multiple of {CELL} in [{2 * CELL}, {8 * CELL}]")
        if self.text_hidden % self.text_heads or self.text_heads % self.text_kv_heads:
            raise DmoError("text_hidden must be divisible by text_heads, and text_heads by text_kv_heads")
        if 2 * sum(self.mrope_section) != self.text_hidden // self.text_heads:
            raise DmoError(f"sum(mrope_section) must be half the head dim {self.text_hidden // self.text_heads}")
        if self.vision_embed % self.vision_heads:
            raise DmoError("vision_embed must be divisible by vision_heads")
        if self.pretrain_weights is not None and (
            min(self.pretrain_weights) < 0 or not sum(self.pretrain_weights[DOMAINS.index(d)] for d in self.domains)
        ):
            raise DmoError("pretrain_weights must be >= 0 with a positive weight on some domain of the world")
        if self.budget > self.train_size:
            raise DmoError(f"budget {self.budget} exceeds the per-domain train pool {self.train_size}")
        return self

    @classmethod
    def small(cls, **overrides) -> WorldConfig:
        """A world for tests: a smaller model, far fewer samples; builds with 2-d ground truth in seconds. It keeps
        format 5's equal pre-training shares (and its key), which the tests were written against."""
        values = dict(
            train_size=512,
            test_size=40,
            pretrain_samples=2048,
            pretrain_weights=None,
            budget=256,
            text_layers=2,
            vision_depth=1,
        )
        values.update(overrides)
        return cls(**values)

    @classmethod
    def named(cls, name: str, small: bool = False) -> WorldConfig:
        """A world by name: ``current`` (the default, ``WorldConfig()``: format 6), ``v6`` (the same world by its
        format's name) or ``v5`` (format 5, the default before it: same key as then)."""
        if name not in WORLDS:
            raise DmoError(f"unknown tiny world {name!r}: choose from {sorted(WORLDS)}")
        if small:  # a small world keeps its own sizes
            return cls.small(**{k: v for k, v in WORLDS[name].items() if k not in _SIZES})
        return cls(**WORLDS[name])

    @property
    def format_version(self) -> int:
        return PREVIOUS_FORMAT if self.pretrain_weights is None else FORMAT_VERSION

    def canonical_json(self) -> str:
        exclude = set(_NOT_IN_KEY) | (set(_NEW_IN_FORMAT_6) if self.format_version == PREVIOUS_FORMAT else set())
        data = self.model_dump(mode="json", exclude=exclude)
        data["format_version"] = self.format_version
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    def key(self) -> str:
        """Short content hash of every knob that changes an artifact: the world's cache folder name."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:16]


_V6 = {"pretrain_weights": (1.0, 0.5, 8.0, 1.0), "pretrain_samples": 10752, "test_size": 1000, "budget": 8192}
#: Named worlds, each spelling out the knobs that tell it apart (so that a small build by name keeps them). ``v6`` is
#: format 6, the default, issue 22's candidate G, frozen on its ground truth's properties alone (all 25 pass):
#: pre-training doses 1024 / 512 / 8192 / 1024 (general, counting, ocr, chart), 1000 test items, a training budget of
#: 8192 samples. ``v5`` is format 5, the default before it: equal pre-training shares of 8192 samples, 200 test items,
#: a budget of 4096.
WORLDS: dict[str, dict] = {
    "current": _V6,
    "v6": _V6,
    "v5": {"pretrain_weights": None, "pretrain_samples": 32768, "test_size": 200, "budget": 4096},
}
