"""Scoring a model on benchmarks: the :class:`~dmo.scoring.base.Scorer` interface and its registry (``base``), the
backends (``hf_backend``, the ``vllm`` package: ``backend``, ``engine``, ``worker``, ``lmms``; ``replay_backend``),
lmms-eval glue (``evaluate``, ``lmms_model``, ``plugin``, ``tasks``, ``paper_tasks``) and the metric map
(``metrics``). Nothing here knows Optuna.
"""

from dmo._lazy import lazy_exports

_EXPORTS = {
    "Evaluation": "dmo.scoring.base",
    "Scorer": "dmo.scoring.base",
    "Target": "dmo.scoring.base",
    "make_scorer": "dmo.scoring.base",
    "score_target": "dmo.scoring.base",
    "score_targets": "dmo.scoring.base",
    "scorer_names": "dmo.scoring.base",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
