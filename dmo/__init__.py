"""dmo: find the best SFT data mixture by scoring merged expert proxies instead of training one model per mixture.

The package reads as the pipeline: ``merge`` (experts -> proxy), ``scoring`` (proxy -> benchmark scores), ``search``
(Optuna studies over the simplex), ``analysis`` (rank correlations, reports), ``groundtruth`` (models trained on
mixtures), ``cli`` (the ``dmo`` command); at the top the shared pieces (``mixture``, ``config``, ``results``,
``errors``, ``paths``, ``atomic``, ``session``). The names below are imported on first use.
"""

from typing import TYPE_CHECKING

from dmo._lazy import lazy_exports

if TYPE_CHECKING:  # the same names for a type checker; at run time each is imported on first use
    from dmo.config import SearchSpace as SearchSpace
    from dmo.config import load_space as load_space
    from dmo.errors import DmoError as DmoError
    from dmo.manifest import ExpertManifest as ExpertManifest
    from dmo.manifest import load_manifest as load_manifest
    from dmo.mixture import Mixture as Mixture
    from dmo.results import ResultsTable as ResultsTable
    from dmo.session import Session as Session

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
