"""A storage's studies as one table (the report reads this table, never Optuna itself)."""

from __future__ import annotations

import logging
import math

import optuna
import pandas as pd

from dmo.search.storage import StorageError, make_storage, redact, storage_errors
from dmo.search.study import MIXTURE_ATTR

__all__ = ["HISTORY_COLUMNS", "study_history"]

#: One row per completed trial, plus ``score:<benchmark>`` columns; ``domains`` is comma-joined.
HISTORY_COLUMNS = ["study", "number", "value", "mixture", "domains"]


def study_history(storage: str) -> tuple[pd.DataFrame, str | None]:
    """Every completed trial of every study in ``storage``; on a storage that cannot be read, an empty table and why.

    A study without a completed trial has one row with a NaN value, so that the report can name it.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("optuna").setLevel(logging.WARNING)
    try:
        with storage_errors(storage):
            store = make_storage(storage)
            names = optuna.get_all_study_names(storage=store)
    except StorageError as exc:  # the report goes on without the studies
        return pd.DataFrame(columns=HISTORY_COLUMNS), f"cannot read the studies in {redact(storage)}: {exc}"
    rows: list[dict[str, object]] = []
    for name in sorted(names):
        study = optuna.load_study(study_name=name, storage=store)
        domains = ",".join(study.user_attrs.get("domains") or [])
        done = [
            t
            for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if t.value is not None and math.isfinite(t.value) and t.user_attrs.get(MIXTURE_ATTR)
        ]
        if not done:
            rows.append({"study": name, "number": -1, "value": math.nan, "mixture": "", "domains": domains})
        for t in done:
            scores = {k: v for k, v in t.user_attrs.items() if k.startswith("score:")}
            rows.append(
                {"study": name, "number": t.number, "value": t.value, "mixture": t.user_attrs[MIXTURE_ATTR],
                 "domains": domains, **scores}
            )  # fmt: skip
    return pd.DataFrame(rows, columns=None if rows else HISTORY_COLUMNS), None
