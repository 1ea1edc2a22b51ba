"""Merged experts as proxies for models trained on data mixtures.

``lora`` reads LoRA experts and builds the exact linear proxy in memory (as one LoRA adapter or as dense deltas),
``dense`` applies deltas to weights, ``names`` reconciles checkpoint and live parameter names, ``registry`` holds the
merge methods by name (``linear``/``task_arithmetic`` and ``weight_average`` there, ``ties``, ``dare``/``dare_ties``,
``robustmerge``, ``spectral`` (``svd``, ``iso``), ``wudi`` (``wudi``, ``wudi2``) and ``fisher_merge`` (``fisher``,
``fisher_nn``) in their own modules). At checkpoint scale, ``checkpoint`` reads and writes safetensors tensor by
tensor, ``stream`` merges whole checkpoints (full fine-tunes and/or LoRA adapters) into a dense model with bounded
memory, ``live`` merges experts held on a device for any mixture, and ``proxy`` writes a proxy as a dense model or one
PEFT adapter from an expert manifest (``dmo merge``). ``families`` knows model layouts, ``inputs`` per-expert input
files (Fisher weights). The names below are imported on first use, so importing this package stays cheap.
"""

from typing import TYPE_CHECKING

from dmo._lazy import lazy_exports

if TYPE_CHECKING:  # the same names for a type checker; at run time each is imported on first use
    from dmo.merge.proxy import merge_manifest as merge_manifest
    from dmo.merge.registry import MergeMethod as MergeMethod
    from dmo.merge.registry import get_method as get_method
    from dmo.merge.registry import merge_method as merge_method
    from dmo.merge.registry import method_names as method_names
    from dmo.merge.stream import merge_checkpoints as merge_checkpoints

_EXPORTS = {
    "MergeMethod": "dmo.merge.registry",
    "get_method": "dmo.merge.registry",
    "merge_checkpoints": "dmo.merge.stream",
    "merge_manifest": "dmo.merge.proxy",
    "merge_method": "dmo.merge.registry",
    "method_names": "dmo.merge.registry",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
