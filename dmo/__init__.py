"""dmo: find the best SFT data mixture by scoring merged expert proxies instead of training one model per mixture.

The package reads as the pipeline: ``merge`` (experts -> proxy), ``scoring`` (proxy -> benchmark scores), ``search``
(Optuna studies over the simplex), ``analysis`` (rank correlations, reports), ``groundtruth`` (models trained on
mixtures), ``cli`` (the ``dmo`` command); at the top the shared pieces (``mixture``, ``config``, ``results``,
``errors``, ``paths``, ``atomic``, ``session``). The names below are imported on first use.
"""

from dmo._lazy import lazy_exports

_EXPORTS = {
    "DmoError": "dmo.errors",
    "ExpertManifest": "dmo.manifest",
    "Mixture": "dmo.mixture",
    "ResultsTable": "dmo.results",
    "SearchSpace": "dmo.config",
    "Session": "dmo.session",
    "load_manifest": "dmo.manifest",
    "load_space": "dmo.config",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
