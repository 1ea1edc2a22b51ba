"""The Optuna internals dmo relies on (dmo/search/optuna_private.py) still behave so in the installed Optuna."""

from __future__ import annotations

import time

import optuna
import pytest
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from dmo.search.optuna_private import BaseHeartbeat, quiet_experimental, study_storage, trial_id
from dmo.search.storage import HeartbeatJournalStorage, make_storage


def test_base_heartbeat_still_asks_for_what_the_journal_storage_implements() -> None:
    abstract = set(getattr(BaseHeartbeat, "__abstractmethods__", ()))
    implemented = {n for n in vars(HeartbeatJournalStorage) if not n.startswith("__")}
    assert abstract, "BaseHeartbeat lost its abstract methods: check Optuna's heartbeat protocol"
    assert abstract <= implemented, f"Optuna's BaseHeartbeat now needs {sorted(abstract - implemented)}"


def test_trial_id_and_study_storage_are_the_storage_handles(tmp_path) -> None:
    storage = make_storage(f"sqlite:///{tmp_path / 's.db'}")
    study = optuna.create_study(storage=storage, study_name="s")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    inner = study_storage(study)  # Optuna may wrap the storage (a cache layer in front of RDB)
    assert isinstance(inner, optuna.storages.BaseStorage)
    for t in study.get_trials(deepcopy=False):
        assert inner.get_trial(trial_id(t)).number == t.number == storage.get_trial(trial_id(t)).number


def test_fail_stale_trials_works_on_dmo_journal_storage(tmp_path) -> None:
    """Optuna fails a stale trial only on storages it recognises as heartbeat storages."""
    with quiet_experimental():
        storage = HeartbeatJournalStorage(JournalFileBackend(str(tmp_path / "j.log")), 1.0, 2.0)
    study = optuna.create_study(storage=storage, study_name="j")
    trial = study.ask()
    storage.record_heartbeat(trial._trial_id)
    beat = storage.get_trial(trial._trial_id).system_attrs["dmo:heartbeat"]
    # a heartbeat from long ago: the trial is stale
    storage.set_trial_system_attr(trial._trial_id, "dmo:heartbeat", beat - 60)
    with quiet_experimental():
        optuna.storages.fail_stale_trials(study)
    assert study.get_trials(deepcopy=False)[0].state == TrialState.FAIL
    assert time.time() - beat < 60


def test_quiet_experimental_leaves_global_filters_alone() -> None:
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        before = list(warnings.filters)
        with quiet_experimental():
            warnings.warn("hidden", optuna.exceptions.ExperimentalWarning, stacklevel=1)
        assert list(warnings.filters) == before
        warnings.warn("shown", optuna.exceptions.ExperimentalWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["shown"]


@pytest.mark.parametrize("name", ["_trial_id"])
def test_frozen_trial_keeps_its_private_id(name: str) -> None:
    assert hasattr(optuna.trial.create_trial(value=1.0), name)
