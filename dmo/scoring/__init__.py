"""Scoring a model on benchmarks: the :class:`~dmo.scoring.base.Scorer` interface and its registry (``base``), the
backends (``hf_backend``, the ``vllm`` package: ``backend``, ``engine``, ``worker``, ``lmms``; ``replay_backend``),
lmms-eval glue (``evaluate``, ``lmms_model``, ``plugin``, ``tasks``, ``paper_tasks``) and the metric map
(``metrics``). Nothing here knows Optuna.
"""

from typing import TYPE_CHECKING

from dmo._lazy import lazy_exports

if TYPE_CHECKING:  # the same names for a type checker; at run time each is imported on first use
    from dmo.scoring.base import Backend as Backend
    from dmo.scoring.base import BackendOptions as BackendOptions
    from dmo.scoring.base import Evaluation as Evaluation
    from dmo.scoring.base import Scorer as Scorer
    from dmo.scoring.base import ScoringContext as ScoringContext
    from dmo.scoring.base import Target as Target
    from dmo.scoring.base import TargetRefused as TargetRefused
    from dmo.scoring.base import make_scorer as make_scorer
    from dmo.scoring.base import score_target as score_target
    from dmo.scoring.base import score_targets as score_targets
    from dmo.scoring.base import scorer_names as scorer_names

_EXPORTS = {
    "Backend": "dmo.scoring.base",
    "BackendOptions": "dmo.scoring.base",
    "Evaluation": "dmo.scoring.base",
    "Scorer": "dmo.scoring.base",
    "ScoringContext": "dmo.scoring.base",
    "Target": "dmo.scoring.base",
    "TargetRefused": "dmo.scoring.base",
    "make_scorer": "dmo.scoring.base",
    "score_target": "dmo.scoring.base",
    "score_targets": "dmo.scoring.base",
    "scorer_names": "dmo.scoring.base",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
