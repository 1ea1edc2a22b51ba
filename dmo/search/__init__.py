"""Searching the simplex: samplers, Optuna studies shared by many workers, and their storages.

``simplex`` maps mixtures to Optuna's box, ``samplers`` names Optuna samplers, ``study`` opens a study (the protocol
that lets many workers share it is described there), ``storage`` its Optuna storage, ``trials`` the loop each worker
runs, ``ledger`` the shared budget, ``claims`` one evaluation per proxy, ``batcher`` several trials scored in one
backend call, ``launch`` local worker processes, ``history`` the studies as a table, ``optuna_private`` the few Optuna
internals dmo relies on.
"""

from dmo._lazy import lazy_exports

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
