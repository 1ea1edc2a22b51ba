"""The Optuna internals dmo relies on (dmo/search/optuna_private.py) still behave so in the installed Optuna."""

from __future__ import annotations

import inspect
import time

import optuna
import pytest
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from dmo.search.optuna_private import (
    BaseHeartbeat,
    FrozenStudy,
    HeartbeatStorage,
    cached,
    is_schema_race,
    quiet_experimental,
    rdb_engine,
    study_storage,
    told_a_finished_trial,
    trial_id,
)
from dmo.search.storage import Heartbeat, HeartbeatJournalStorage, OneCallAtATime, make_storage


@pytest.mark.parametrize("storage_class", [HeartbeatJournalStorage, OneCallAtATime])
def test_base_heartbeat_still_asks_for_what_dmo_storages_implement(storage_class: type) -> None:
    abstract = set(getattr(BaseHeartbeat, "__abstractmethods__", ()))
    assert abstract, "BaseHeartbeat lost its abstract methods: check Optuna's heartbeat protocol"
    implemented = {n for cls in (storage_class, HeartbeatStorage) for n in vars(cls) if not n.startswith("__")}
    assert abstract <= implemented, f"Optuna's BaseHeartbeat now needs {sorted(abstract - implemented)}"
    assert not storage_class.__abstractmethods__, f"{storage_class.__name__} misses {storage_class.__abstractmethods__}"


def test_one_call_at_a_time_passes_on_every_storage_method() -> None:
    """A BaseStorage method left to the base class would go around the wrapped storage's own (its cache)."""
    public = {n for n, v in inspect.getmembers(optuna.storages.BaseStorage, inspect.isfunction) if n[0] != "_"}
    missing = sorted(public - set(vars(OneCallAtATime)))
    assert not missing, f"Optuna's BaseStorage has methods OneCallAtATime does not pass on: {missing}"
    signatures = {n: inspect.signature(getattr(optuna.storages.BaseStorage, n)) for n in public}
    for name, sig in signatures.items():
        ours = inspect.signature(getattr(OneCallAtATime, name))
        assert list(ours.parameters) == list(sig.parameters), f"{name}{sig} is {name}{ours} in OneCallAtATime"


def test_get_all_studies_returns_frozen_studies(tmp_path) -> None:
    storage = make_storage(f"sqlite:///{tmp_path / 's.db'}", threads=True)
    optuna.create_study(storage=storage, study_name="a")
    (study,) = storage.get_all_studies()
    assert isinstance(study, FrozenStudy) and study.study_name == "a"


def test_cached_is_the_layer_optuna_puts_in_front_of_an_rdb_storage(tmp_path) -> None:
    rdb = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 's.db'}")
    study = optuna.create_study(storage=rdb, study_name="s")
    front = cached(rdb)
    assert type(front) is type(study_storage(study)) and front is not rdb
    assert isinstance(front, BaseHeartbeat)  # the cache passes heartbeats through


def test_rdb_engine_is_the_storage_sqlalchemy_engine(tmp_path) -> None:
    import sqlalchemy

    rdb = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 's.db'}")
    engine = rdb_engine(rdb)
    assert isinstance(engine, sqlalchemy.engine.Engine)
    assert str(engine.url) == f"sqlite:///{tmp_path / 's.db'}"
    with engine.connect() as conn:
        assert "studies" in {r[0] for r in conn.exec_driver_sql("SELECT name FROM sqlite_master")}


@pytest.mark.parametrize("threads", [False, True])
@pytest.mark.parametrize("then", ["set_user_attr", "prune"])
def test_telling_a_trial_another_worker_failed_is_recognised(tmp_path, threads: bool, then: str) -> None:
    """What a worker meets when another worker failed its trial as stale while the objective ran: dmo's objective
    then records a score on the trial (Optuna refuses: the trial is finished) or prunes it."""
    storage = make_storage(f"sqlite:///{tmp_path / 's.db'}", threads=threads)
    study = optuna.create_study(storage=storage, study_name="s")

    def objective(trial: optuna.Trial) -> float:
        study_storage(study).set_trial_state_values(trial._trial_id, state=TrialState.FAIL)  # the other worker
        if then == "prune":
            raise optuna.TrialPruned("benchmarks failed")
        trial.set_user_attr("score:b", 1.0)
        return 1.0

    with pytest.raises(ValueError) as caught:
        study.optimize(objective, n_trials=1)
    assert told_a_finished_trial(caught.value)
    assert not told_a_finished_trial(ValueError("Cannot tell whether x"))
    assert not told_a_finished_trial(RuntimeError(str(caught.value)))


def test_schema_races_are_told_from_other_database_errors(tmp_path) -> None:
    import sqlalchemy

    engine = sqlalchemy.create_engine(f"sqlite:///{tmp_path / 'r.db'}")
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE studies (id INTEGER PRIMARY KEY)")
        conn.exec_driver_sql("INSERT INTO studies VALUES (1)")

    def error(sql: str) -> BaseException:
        with pytest.raises(sqlalchemy.exc.SQLAlchemyError) as caught, engine.begin() as conn:
            conn.exec_driver_sql(sql)
        return caught.value

    assert is_schema_race(error("CREATE TABLE studies (id INTEGER)"))  # created by another worker just now
    assert is_schema_race(error("INSERT INTO studies VALUES (1)"))  # a version row inserted twice
    assert not is_schema_race(error("SELECT * FROM no_such_table"))
    try:
        raise RuntimeError("opening failed") from error("CREATE TABLE studies (id INTEGER)")
    except RuntimeError as wrapped:
        assert is_schema_race(wrapped)  # the database's error may be the cause of another
    assert not is_schema_race(ValueError("table studies already exists"))


def test_heartbeats_pass_through_one_call_at_a_time(tmp_path) -> None:
    storage = make_storage(f"sqlite:///{tmp_path / 's.db'}", Heartbeat(interval=1.0, grace=2.0), threads=True)
    assert isinstance(storage, OneCallAtATime) and storage.get_heartbeat_interval() == 1.0
    study = optuna.create_study(storage=storage, study_name="s")
    trial = study.ask()
    storage.record_heartbeat(trial._trial_id)
    with quiet_experimental():
        optuna.storages.fail_stale_trials(study)
    assert study.get_trials(deepcopy=False)[0].state == TrialState.RUNNING  # beating: alive
    time.sleep(3.0)
    with quiet_experimental():
        optuna.storages.fail_stale_trials(study)
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]  # failed, and queued again once


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
