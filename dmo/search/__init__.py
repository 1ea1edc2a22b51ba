"""Searching the simplex: samplers, Optuna studies shared by many workers, and their storages.

``simplex`` maps mixtures to Optuna's box, ``samplers`` names Optuna samplers, ``study`` opens a study (the protocol
that lets many workers share it is described there), ``storage`` its Optuna storage, ``trials`` the loop each worker
runs, ``ledger`` the shared budget, ``claims`` one evaluation per proxy, ``batcher`` several trials scored in one
backend call, ``launch`` local worker processes, ``history`` the studies as a table, ``optuna_private`` the few Optuna
internals dmo relies on.
"""

from typing import TYPE_CHECKING

from dmo._lazy import lazy_exports

if TYPE_CHECKING:  # the same names for a type checker; at run time each is imported on first use
    from dmo.search.history import study_history as study_history
    from dmo.search.launch import run_workers as run_workers
    from dmo.search.samplers import make_sampler as make_sampler
    from dmo.search.samplers import register_sampler as register_sampler
    from dmo.search.samplers import sampler_names as sampler_names
    from dmo.search.simplex import from_box as from_box
    from dmo.search.simplex import to_box as to_box
    from dmo.search.storage import Heartbeat as Heartbeat
    from dmo.search.storage import make_storage as make_storage
    from dmo.search.storage import redact as redact
    from dmo.search.study import StudyPaths as StudyPaths
    from dmo.search.study import StudyResult as StudyResult
    from dmo.search.study import open_study as open_study
    from dmo.search.study import study_paths as study_paths
    from dmo.search.study import summarize as summarize
    from dmo.search.trials import ScoreObjective as ScoreObjective
    from dmo.search.trials import preflight as preflight
    from dmo.search.trials import proxy_target as proxy_target
    from dmo.search.trials import run_study as run_study

_EXPORTS = {
    "run_study": "dmo.search.trials",
    "preflight": "dmo.search.trials",
    "proxy_target": "dmo.search.trials",
    "ScoreObjective": "dmo.search.trials",
    "run_workers": "dmo.search.launch",
    "open_study": "dmo.search.study",
    "study_paths": "dmo.search.study",
    "StudyPaths": "dmo.search.study",
    "StudyResult": "dmo.search.study",
    "summarize": "dmo.search.study",
    "make_storage": "dmo.search.storage",
    "Heartbeat": "dmo.search.storage",
    "redact": "dmo.search.storage",
    "make_sampler": "dmo.search.samplers",
    "sampler_names": "dmo.search.samplers",
    "register_sampler": "dmo.search.samplers",
    "from_box": "dmo.search.simplex",
    "to_box": "dmo.search.simplex",
    "study_history": "dmo.search.history",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
