"""A storage's studies as one table (the report reads this table, never Optuna itself)."""

from __future__ import annotations

import logging
import math

import optuna
import pandas as pd

from dmo.search.storage import StorageError, make_storage, redact, storage_errors
from dmo.search.study import MIXTURE_ATTR
from dmo.search.tradeoffs import CONSTRAINED_ATTR, OBJECTIVES_ATTR, is_feasible

__all__ = ["FEASIBLE_COLUMN", "HISTORY_COLUMNS", "OBJECTIVE_PREFIX", "study_history"]

#: One row per completed trial, plus ``score:<benchmark>`` columns; ``domains`` is comma-joined. A multi-objective
#: study's rows have no ``value`` (NaN) and one ``objective:<name>`` column per objective; a constrained study's rows
#: say whether the trial is ``feasible``.
HISTORY_COLUMNS = ["study", "number", "value", "mixture", "domains"]
OBJECTIVE_PREFIX = "objective:"
FEASIBLE_COLUMN = "feasible"


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
            if t.values is not None and all(math.isfinite(v) for v in t.values) and t.user_attrs.get(MIXTURE_ATTR)
        ]
        if not done:
            rows.append({"study": name, "number": -1, "value": math.nan, "mixture": "", "domains": domains})
        # a multi-objective study: no single value, one column per objective instead
        objectives = study.user_attrs.get(OBJECTIVES_ATTR) if len(study.directions) > 1 else None
        constrained = bool(study.user_attrs.get(CONSTRAINED_ATTR))
        for t in done:
            scores = {k: v for k, v in t.user_attrs.items() if k.startswith("score:")}
            extra: dict[str, object] = {}
            if objectives:
                extra = {f"{OBJECTIVE_PREFIX}{o}": v for o, v in zip(objectives, t.values)}
            if constrained:
                extra[FEASIBLE_COLUMN] = is_feasible(t)
            rows.append(
                {"study": name, "number": t.number, "value": math.nan if objectives else t.values[0],
                 "mixture": t.user_attrs[MIXTURE_ATTR], "domains": domains, **scores, **extra}
            )  # fmt: skip
    return pd.DataFrame(rows, columns=None if rows else HISTORY_COLUMNS), None
