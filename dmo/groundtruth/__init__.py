"""The ground truth: models actually trained on mixtures. ``data_mix`` materialises each mixture's training set,
``llamafactory`` plans and runs LLaMA-Factory training, ``ingest`` reads lmms-eval result folders into a results
table, ``fisher`` computes the experts' Fisher weights on their domain data.
"""

from dmo._lazy import lazy_exports

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
