"""Model families whose checkpoint layout dmo knows: where the vision tower and the projector live.

The DMO paper's parameter filters (:data:`dmo.merge.stream.PAPER_EXCLUDE`) and vLLM's rule that adapters of the
vision tower or projector cannot be served name these parts by the names of the paper's two families: Qwen2-VL /
Qwen2.5-VL (``visual.blocks``, ``visual.patch_embed``, ``visual.merger``) and InternVL in transformers' layout
(``vision_tower``, ``multi_modal_projector``). A multimodal checkpoint of any other family would have its vision
tower merged or served silently, against the paper's recipe, so dmo refuses it by default instead of guessing.

Custom InternVL checkpoints (``InternVLChatModel``, loaded through ``trust_remote_code``: ``vision_model``,
``mlp1``, a fused ``qkv`` in every vision block) are refused with the way to the HF layout: converting needs the
tokenizer, processor and config rebuilt too, per language-model family, which transformers' own script does.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dmo.errors import DmoError


@dataclass(frozen=True)
class Family:
    """A model family: its config ``model_type`` values and the name patterns of its vision parts."""

    name: str
    model_types: tuple[str, ...]
    #: regular expressions (searched, as PAPER_EXCLUDE's are) of the vision tower's parameters
    vision: tuple[str, ...]
    #: and of the projector that maps vision features into the language model
    projector: tuple[str, ...]


FAMILIES: tuple[Family, ...] = (
    Family("Qwen2-VL", ("qwen2_vl", "qwen2_5_vl"), (r"visual\.blocks", r"visual\.patch_embed"), (r"visual\.merger",)),
    Family("InternVL", ("internvl",), ("vision_tower",), ("multi_modal_projector",)),
)
#: A language model without vision parts (no ``vision_config``): every filter is family-neutral for it.
TEXT_ONLY = Family("text-only", (), (), ())

#: The custom (remote-code) InternVL classes, before the conversion to transformers' layout.
_CUSTOM_INTERNVL = ("InternVLChatModel", "internvl_chat")


def _read_config(folder: Path) -> dict[str, Any] | None:
    path = folder / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DmoError(f"cannot read {path}: {exc}") from None
    return config if isinstance(config, dict) else None


def _custom_internvl(config: dict[str, Any]) -> bool:
    auto_map = config.get("auto_map") or {}
    names = [
        *(config.get("architectures") or []),
        str(config.get("model_type", "")),
        *(str(v) for v in (auto_map.values() if isinstance(auto_map, dict) else [])),
    ]
    return any(c in n for n in names for c in _CUSTOM_INTERNVL)


class CustomInternVL(DmoError):
    """A checkpoint in InternVL's own remote-code layout, which nothing in dmo loads."""


def family_of(folder: str | os.PathLike[str]) -> Family | None:
    """The family of the model in ``folder`` (``None`` when it has no config.json: nothing to tell it by).

    Raises a one-line :class:`DmoError` for a custom InternVL checkpoint (with how to convert it) and for a
    multimodal or remote-code model whose layout dmo does not know.
    """
    folder = Path(folder)
    config = _read_config(folder)
    if config is None:
        return None
    archs = config.get("architectures") or []
    if _custom_internvl(config):
        raise CustomInternVL(
            f"{folder} is a custom InternVL checkpoint ({', '.join(map(str, archs)) or config.get('model_type')}, "
            "loaded with trust_remote_code); dmo reads InternVL in transformers' layout only "
            "(InternVLForConditionalGeneration): use the model's -HF export (e.g. OpenGVLab/InternVL3_5-2B-HF, as "
            "the DMO paper does) or convert it with transformers' "
            "src/transformers/models/internvl/convert_internvl_weights_to_hf.py --input_dir "
            f"{folder} --output_dir {folder}-HF (in the transformers source tree, not the pip package)"
        )
    model_type = str(config.get("model_type", ""))
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    if "vision_config" in config or config.get("auto_map"):
        known = ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES)
        raise DmoError(
            f"dmo does not know the layout of {folder} (model_type {model_type!r}, "
            f"{', '.join(map(str, archs)) or 'no architectures'}): it knows {known} and text-only models; "
            "with dmo merge, name the parameters to keep at the base value yourself (--exclude PATTERN)"
        )
    return TEXT_ONLY


def check_family(folder: str | os.PathLike[str], *, paper_filter: bool = True) -> Family | None:
    """:func:`family_of`, except that a layout dmo does not know passes when no paper filter depends on it.

    A custom InternVL checkpoint is refused either way: nothing in dmo loads it.
    """
    try:
        return family_of(folder)
    except DmoError as exc:
        if paper_filter or isinstance(exc, CustomInternVL):
            raise
        return None
