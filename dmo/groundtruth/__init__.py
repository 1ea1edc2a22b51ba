"""The ground truth: models actually trained on mixtures. ``data_mix`` materialises each mixture's training set,
``llamafactory`` plans and runs LLaMA-Factory training, ``ingest`` reads lmms-eval result folders into a results
table, ``fisher_weights`` computes the experts' Fisher weights on their domain data.
"""

from typing import TYPE_CHECKING

from dmo._lazy import lazy_exports

if TYPE_CHECKING:  # the same names for a type checker; at run time each is imported on first use
    from dmo.groundtruth.data_mix import mix as mix
    from dmo.groundtruth.fisher_weights import compute_fisher as compute_fisher
    from dmo.groundtruth.ingest import ingest as ingest
    from dmo.groundtruth.llamafactory import Recipe as Recipe
    from dmo.groundtruth.llamafactory import plan_runs as plan_runs
    from dmo.groundtruth.llamafactory import train_runs as train_runs

_EXPORTS = {
    "mix": "dmo.groundtruth.data_mix",
    "plan_runs": "dmo.groundtruth.llamafactory",
    "train_runs": "dmo.groundtruth.llamafactory",
    "Recipe": "dmo.groundtruth.llamafactory",
    "ingest": "dmo.groundtruth.ingest",
    "compute_fisher": "dmo.groundtruth.fisher_weights",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
