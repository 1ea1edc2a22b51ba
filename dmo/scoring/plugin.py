"""lmms-eval's entry points for the ``dmo`` and ``dmo_vllm`` models (``[project.entry-points."lmms_eval.models"]``).

lmms-eval loads every entry point of that group whenever it imports its model registry, and one failing entry
point stops the others from loading; so this module only names the class and imports nothing heavy.
"""

from __future__ import annotations

from lmms_eval.models.registry_v2 import ModelManifest

MANIFEST = ModelManifest(model_id="dmo", simple_class_path="dmo.scoring.lmms_model.DmoLMM")
MANIFEST_VLLM = ModelManifest(model_id="dmo_vllm", simple_class_path="dmo.scoring.vllm.lmms.DmoVLLM")
