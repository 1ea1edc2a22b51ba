"""The ``vllm`` scoring backend: the scorer (``backend``), the engine's settings (``engine``), dmo's worker
extension that writes merged proxies into the live weights (``worker``) and lmms-eval's ``dmo_vllm`` model
(``lmms``). Nothing here imports vLLM until an engine is built.
"""

from typing import TYPE_CHECKING

from dmo._lazy import lazy_exports

if TYPE_CHECKING:  # the same names for a type checker; at run time each is imported on first use
    from dmo.scoring.vllm.backend import VLLMScorer as VLLMScorer
    from dmo.scoring.vllm.worker import DmoWorkerExtension as DmoWorkerExtension

_EXPORTS = {"VLLMScorer": "dmo.scoring.vllm.backend", "DmoWorkerExtension": "dmo.scoring.vllm.worker"}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
