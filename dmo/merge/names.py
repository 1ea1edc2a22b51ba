"""Parameter names: the checkpoint layout on disk versus the live model's ``state_dict()``.

transformers 5 renames weights while loading (e.g. Qwen2-VL's ``model.layers.0...`` on disk becomes
``model.language_model.layers.0...`` in the module, ``visual.*`` becomes ``model.visual.*``) and renames them
back on ``save_pretrained``. LoRA adapters trained under transformers < 4.52 also use the old layout, while
adapters saved by PEFT under transformers 5 use the live module paths. dmo keys every delta by the *live* name;
a :class:`KeyMap` turns any checkpoint-layout name into it, using transformers' own renaming rules so that dmo
never keeps a hand-written copy of them. Renaming a live name is a no-op.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dmo.errors import DmoError


class KeyMap:
    """Maps a checkpoint-layout parameter name to the live model's name (the identity when built empty)."""

    def __init__(self, renamings: Sequence[Any] = (), converters: Sequence[Any] = (), *, source: str = "identity"):
        self._renamings = list(renamings)
        self._converters = list(converters)
        self.source = source

    @classmethod
    def identity(cls) -> KeyMap:
        return cls()

    @classmethod
    def for_model(cls, model: torch.nn.Module) -> KeyMap:
        """The renaming transformers applies when loading a checkpoint into ``model`` (identity for plain modules)."""
        name = type(model).__name__
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightConverter, WeightRenaming
            from transformers.modeling_utils import PreTrainedModel
        except ImportError:  # transformers 4.x: the rules live on the model as a regex dict
            mapping = getattr(model, "_checkpoint_conversion_mapping", None) or {}
            return cls([_RegexRenaming(p, r) for p, r in mapping.items()], source=name)
        if not isinstance(model, PreTrainedModel):
            return cls(source=name)
        # deepcopy: some renamings (GroupWeightRename) keep state between calls
        transforms = copy.deepcopy(get_model_conversion_mapping(model))
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        return cls(renamings, converters, source=name)

    @classmethod
    def for_config(cls, config: Any) -> KeyMap:
        """Like :meth:`for_model`, from a transformers config or a local model folder, without loading weights.

        The model class named in ``config.architectures`` is built on the meta device, which costs no memory.
        """
        try:
            import transformers
        except ImportError as exc:
            raise DmoError("transformers is not installed: install it to map checkpoint names") from exc
        if isinstance(config, (str, os.PathLike)):
            folder = Path(config)
            if not (folder / "config.json").is_file():
                raise DmoError(f"no config.json in {folder}: point to the base model's folder")
            try:
                config = transformers.AutoConfig.from_pretrained(str(folder))
            except Exception as exc:  # transformers raises many types for a bad config
                raise DmoError(f"cannot read {folder / 'config.json'}: {exc}") from exc
        archs = getattr(config, "architectures", None) or []
        model_cls = getattr(transformers, archs[0], None) if archs else None
        if model_cls is None:
            raise DmoError(
                f"config of model type {getattr(config, 'model_type', '?')!r} names no known architecture "
                f"({archs}); build the model and use KeyMap.for_model instead"
            )
        with torch.device("meta"):
            model = model_cls(config)
        return cls.for_model(model)

    def __call__(self, name: str) -> str:
        renamed = name
        for renaming in self._renamings:
            renamed, _ = renaming.rename_source_key(renamed)
        for converter in self._converters:
            _, pattern = converter.rename_source_key(renamed)
            if pattern is not None:
                # fused/split weights (MoE experts, packed qkv) cannot be addressed one LoRA module at a time
                raise DmoError(
                    f"parameter {name} is fused or split when {self.source} loads it; dmo cannot merge LoRA "
                    "deltas into converted weights"
                )
        return renamed

    def __repr__(self) -> str:
        return f"KeyMap({self.source}, {len(self._renamings)} renamings)"


class _RegexRenaming:
    """transformers 4.x ``_checkpoint_conversion_mapping`` entry, with the same call shape as ``WeightRenaming``."""

    def __init__(self, pattern: str, replacement: str):
        self._pattern = re.compile(pattern)
        self._replacement = replacement

    def rename_source_key(self, key: str) -> tuple[str, None]:
        return self._pattern.sub(self._replacement, key, count=1), None
