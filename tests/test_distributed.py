"""Many workers, one study: real worker processes on real storages (PostgreSQL, SQLite, Optuna's journal file).

Scores come from the ``replay`` backend (a recorded lattice), so a trial costs milliseconds and the tests
measure the coordination, not a model. Where a test must catch a worker *in the middle of* a scoring call, the
worker runs a replay scorer that sleeps and writes a marker file when a scoring starts and when it ends; all
else (study loop, storages, heartbeats, retries, claims, the CLI and ``--workers``) is the production code.

PostgreSQL: ``DMO_TEST_POSTGRES_URL`` (``.ci/run`` starts a throw-away server on 127.0.0.1 and sets it). Without
it the PostgreSQL cases are skipped, except under ``CI=true``, where they fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest

from dmo.config import load_space
from dmo.errors import DmoError
from dmo.mixture import Mixture, lattice
from dmo.results import ResultsTable, ScoreRow
from dmo.search.claims import scoring_claim
from dmo.search.storage import Heartbeat, make_storage
from dmo.search.study import CLAIM_WAIT_ATTR, INIT_ATTR, MIXTURE_ATTR, SURPLUS_ATTR, study_paths, worker_seed
from dmo.search.trials import run_study

pytestmark = pytest.mark.slow

DOMAINS = ["a", "b", "c"]
OPT = {"a": 0.2, "b": 0.3, "c": 0.5}
BENCHMARKS = ["b1", "b2"]
#: Short heartbeats so a dead worker is noticed in seconds; the defaults (30 s / 120 s) are for clusters.
FAST = {"DMO_HEARTBEAT_INTERVAL": "0.5", "DMO_HEARTBEAT_GRACE": "2"}
COMPLETE = optuna.trial.TrialState.COMPLETE


# ------------------------------------------------------------------------------------------------- fixtures


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.fixture(scope="module")
def postgres() -> str:
    """A fresh database on the test server, dropped afterwards."""
    url = os.environ.get("DMO_TEST_POSTGRES_URL")
    if not url:
        if _in_ci():
            pytest.fail("CI=true but DMO_TEST_POSTGRES_URL is unset: .ci/run starts PostgreSQL and exports it")
        pytest.skip("no PostgreSQL server: set DMO_TEST_POSTGRES_URL (.ci/run starts one)")
    import psycopg2
    from sqlalchemy.engine import make_url

    u = make_url(url)
    conn = psycopg2.connect(
        host=u.host, port=u.port, user=u.username, password=u.password, dbname=u.database or "postgres"
    )
    conn.autocommit = True
    name = f"dmo_test_{uuid.uuid4().hex[:10]}"
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    yield u.set(database=name).render_as_string(hide_password=False)
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    conn.close()


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Path:
    """A dense lattice (resolution 20, 231 mixtures) scored once: the table the replay backend answers from."""
    path = tmp_path_factory.mktemp("recorded") / "scores.jsonl"
    rows = []
    for m in lattice(DOMAINS, 20):
        value = 1 - sum((m[d] - OPT[d]) ** 2 for d in DOMAINS)
        for i, b in enumerate(BENCHMARKS):
            rows.append(
                ScoreRow("proxy", m.id, b, value + 0.01 * i, weights=m.as_dict(), method="linear", metric="acc")
            )
    ResultsTable(path).append(rows)
    return path


@pytest.fixture
def world(tmp_path, recorded, replay_space) -> Path:
    """A working folder with a manifest (empty expert folders: replay needs no weights) and a replay space."""
    replay_space(tmp_path, recorded)
    (tmp_path / "marks").mkdir()
    (tmp_path / "worker.py").write_text(WORKER)
    return tmp_path


def storage_url(kind: str, world: Path, postgres_url: str | None = None) -> str:
    if kind == "postgres":
        assert postgres_url
        return postgres_url
    if kind == "sqlite":
        return f"sqlite:///{world / 'results' / 'rp' / 'study.db'}"
    return f"journal:{world / 'results' / 'rp' / 'journal.log'}"


@pytest.fixture(params=[pytest.param("postgres", marks=pytest.mark.postgres), "sqlite", "journal"])
def storage(request, world) -> str:
    url = request.getfixturevalue("postgres") if request.param == "postgres" else None
    return storage_url(request.param, world, url)


def env(world: Path, **extra: str) -> dict[str, str]:
    out = {**os.environ, **FAST, "DMO_RESULTS": str(world / "results"), "MARKS": str(world / "marks")}
    out.pop("DMO_WORKER_NAME", None)
    out.pop("DMO_WORKER_INDEX", None)
    return {**out, **extra}


def dmo(world: Path, *args: str, **extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dmo.cli", *args], cwd=world, env=env(world, **extra), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


# A worker of the same study loop as `dmo study`, whose scorer takes SCORE_SECONDS and leaves marker files, so
# that a test can kill it in the middle of a scoring call and count evaluations afterwards.
WORKER = textwrap.dedent("""\
    import os, sys, time
    from pathlib import Path
    from dmo.config import load_space
    from dmo.scoring.replay_backend import ReplayScorer
    from dmo.search.study import study_paths
    from dmo.search.trials import run_study

    class SlowReplay(ReplayScorer):
        def evaluate(self, target, benchmarks):
            marks = Path(os.environ["MARKS"])
            tag = f"{os.getpid()}@{target.label}"
            (marks / f"start-{tag}").write_text(target.label)
            time.sleep(float(os.environ.get("SCORE_SECONDS", "0.5")))
            out = super().evaluate(target, benchmarks)
            (marks / f"end-{tag}").write_text(target.label)
            return out

    space_file, storage, name, n_trials, index = sys.argv[1:6]
    space = load_space(space_file)
    if len(sys.argv) > 6:
        space = space.model_copy(update={"sampler": space.sampler.model_copy(update={"name": sys.argv[6]})})
    own = space.scoring.backend_options()
    scorer = SlowReplay(own.table, nearest=own.nearest)
    res = run_study(space, scorer, study_paths(space, storage, name), n_trials=int(n_trials), progress=False,
                    worker_index=int(index))
    print("evaluated", res.evaluated)
    """)


def worker(world: Path, storage: str, name: str, n_trials: int, index: int, *extra: str, **env_extra: str):
    return subprocess.Popen(
        [sys.executable, str(world / "worker.py"), str(world / "space.yaml"), storage, name, str(n_trials),
         str(index), *extra],
        cwd=world, env=env(world, **env_extra), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def finish(procs: list[subprocess.Popen], timeout: float = 120) -> list[tuple[int, str, str]]:
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        out.append((p.returncode, stdout, stderr))
    return out


def marks(world: Path, kind: str) -> list[tuple[int, str]]:
    """(pid, mixture) of every scoring call that started (``start``) or ended (``end``)."""
    out = []
    for f in (world / "marks").glob(f"{kind}-*"):
        pid, _, label = f.name.removeprefix(f"{kind}-").partition("@")
        out.append((int(pid), label))
    return out


def _started_at(world: Path, mark: tuple[int, str]) -> float:
    try:
        return (world / "marks" / f"start-{mark[0]}@{mark[1]}").stat().st_mtime
    except FileNotFoundError:
        return 0.0


# ---------------------------------------------------------------------------------------------------- audit


@dataclass
class Audit:
    study: optuna.Study
    complete: list[optuna.trial.FrozenTrial]
    rows: list[dict]

    @property
    def mixtures(self) -> list[str]:
        return [t.user_attrs[MIXTURE_ATTR] for t in self.complete]


def audit(url: str, name: str, world: Path, n: int) -> Audit:
    """Exactly ``n`` completed trials, no mixture twice, and every score in the results table exactly once."""
    study = optuna.load_study(study_name=name, storage=make_storage(url))
    trials = study.get_trials()
    complete = [t for t in trials if t.state == COMPLETE]
    table = world / "results" / "rp" / "scores.jsonl"
    rows = [json.loads(line) for line in table.read_text().splitlines() if line.strip()]
    a = Audit(study, complete, rows)
    assert len(complete) == n, Counter(t.state.name for t in trials)
    assert len(set(a.mixtures)) == n, "a mixture was completed twice"
    keys = Counter(r["key"] for r in rows)
    assert max(keys.values()) == 1, "a score was recorded twice"
    mine = {r["mixture"] for r in rows}
    assert set(a.mixtures) <= mine, "a completed trial's score is missing from the results table"
    per_mixture = Counter(r["mixture"] for r in rows)
    assert all(per_mixture[m] == len(BENCHMARKS) for m in a.mixtures)
    for t in complete:  # the trial's value is the objective of the recorded scores
        scores = {r["benchmark"]: r["score"] for r in rows if r["mixture"] == t.user_attrs[MIXTURE_ATTR]}
        assert t.value == pytest.approx(sum(scores.values()) / len(scores))
    # surplus trials (a race for the last budget slot lost) are failed, never scored
    for t in trials:
        if t.user_attrs.get(SURPLUS_ATTR):
            assert t.state == optuna.trial.TrialState.FAIL and not any(k.startswith("score:") for k in t.user_attrs)
    return a


# ---------------------------------------------------------------------------------------------------- tests


WORKERS = {"postgres": 4, "sqlite": 2, "journal": 2}


# Imported by every Python process started with this folder on PYTHONPATH, the spawned workers of
# `dmo study --workers` included: each process's first scoring call waits until BARRIER processes have started
# one. Replay scoring costs milliseconds and a worker's start (spawn, imports) costs seconds, so without it the
# first worker up may finish the whole budget before the next one asks for a trial, and whether the budget is
# shared would be left to the scheduler. With it, every worker holds a trial before any finishes one.
BARRIER = textwrap.dedent("""\
    import os, time
    from pathlib import Path
    from dmo.scoring.replay_backend import ReplayScorer

    _evaluate = ReplayScorer.evaluate
    _waited = []

    def evaluate(self, target, benchmarks):
        if not _waited:
            _waited.append(True)
            marks = Path(os.environ["MARKS"])
            (marks / f"barrier-{os.getpid()}").touch()
            deadline = time.monotonic() + float(os.environ.get("BARRIER_SECONDS", "90"))
            while len(list(marks.glob("barrier-*"))) < int(os.environ["BARRIER"]) and time.monotonic() < deadline:
                time.sleep(0.02)
        return _evaluate(self, target, benchmarks)

    ReplayScorer.evaluate = evaluate
    """)


def with_barrier(world: Path, n: int) -> dict[str, str]:
    """Environment that makes the next ``n`` scoring processes start their first scoring together."""
    folder = world / "barrier"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(BARRIER)
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "BARRIER": str(n)}


def test_workers_share_one_budget_and_score_each_mixture_once(world, storage, request):
    """`dmo study --workers N`: exactly N trials over all workers, each mixture and score once."""
    kind = request.node.callspec.params["storage"]
    n_workers, n = WORKERS[kind], 12
    name = f"budget-{kind}"
    code, out, err = finish([dmo(world, "study", "space.yaml", "--workers", str(n_workers), "--storage", storage,
                                 "--study-name", name, "--n-trials", str(n),
                                 **with_barrier(world, n_workers))])[0]  # fmt: skip
    assert code == 0, err
    assert len(list((world / "marks").glob("barrier-*"))) == n_workers, "not every worker started a scoring"
    a = audit(storage, name, world, n)
    workers = Counter(t.user_attrs["worker"] for t in a.complete)
    assert len(workers) == n_workers, f"a worker ran no trial: {workers}"
    assert f"{n} new evaluations" in out.replace("\n", " ")
    if kind != "sqlite":
        return
    # resuming the finished study runs nothing and scores nothing
    code, out, err = finish([dmo(world, "study", "space.yaml", "--storage", storage, "--study-name", name,
                                 "--n-trials", str(n))])[0]  # fmt: skip
    assert code == 0, err
    assert "0 new evaluations" in out.replace("\n", " ")
    audit(storage, name, world, n)


def test_grid_started_by_simultaneous_processes_is_enqueued_once(world, storage, request):
    """N independent `dmo study --sampler grid` processes (as SLURM array tasks) started at the same moment."""
    kind = request.node.callspec.params["storage"]
    name = f"grid-{kind}"
    cands = [m.id for m in load_space(world / "space.yaml").candidates()]
    procs = [
        dmo(world, "study", "space.yaml", "--sampler", "grid", "--storage", storage, "--study-name", name,
            DMO_WORKER_INDEX=str(i))
        for i in range(WORKERS[kind])
    ]  # fmt: skip
    for code, _, err in finish(procs):
        assert code == 0, err
    a = audit(storage, name, world, len(cands))
    assert sorted(a.mixtures) == sorted(cands)
    enqueued = Counter(
        t.user_attrs.get(MIXTURE_ATTR) for t in a.study.get_trials() if "fixed_params" in t.system_attrs
        and "failed_trial" not in t.system_attrs
    )  # fmt: skip
    assert enqueued == Counter(cands), "a candidate was enqueued twice (or not at all)"


KILL_CASES = [
    pytest.param("postgres", "heartbeat", marks=pytest.mark.postgres),
    ("sqlite", "heartbeat"),
    ("journal", "heartbeat"),
    ("sqlite", "pid"),
]


@pytest.mark.parametrize(("kind", "detect"), KILL_CASES)
def test_killed_worker_loses_nothing_and_its_trial_is_rerun_once(world, request, kind, detect):
    """kill -9 a worker in the middle of a scoring call, start another: nothing lost, the trial re-run once.

    ``heartbeat``: workers carry explicit names (as on a cluster), so only the missing heartbeats reveal the
    dead one. ``pid``: local names, so the dead process is noticed at once (the same code on every storage).
    """
    storage = storage_url(kind, world, request.getfixturevalue("postgres") if kind == "postgres" else None)
    n, name = 6, f"kill-{kind}-{detect}"
    names = (lambda i: {"DMO_WORKER_NAME": f"node{i}"}) if detect == "heartbeat" else (lambda i: {})
    procs = {i: worker(world, storage, name, n, i, SCORE_SECONDS="1.0", **names(i)) for i in range(2)}
    by_pid = {p.pid: i for i, p in procs.items()}
    t0 = time.monotonic()
    victim = None
    while victim is None:  # wait for two finished scorings, then for one that has just started
        assert time.monotonic() - t0 < 60, "workers made no progress"
        started = marks(world, "start")
        ended = marks(world, "end")
        if len(ended) >= 2:
            fresh = [
                s for s in started
                if s not in ended and s[0] in by_pid and time.time() - _started_at(world, s) < 0.3
            ]  # fmt: skip
            if fresh:
                victim = fresh[0]
        time.sleep(0.02)
    table = world / "results" / "rp" / "scores.jsonl"
    os.kill(victim[0], signal.SIGKILL)
    procs[by_pid[victim[0]]].wait()
    assert victim not in marks(world, "end"), "the victim finished its scoring before the kill"
    before = table.read_bytes()
    study = optuna.load_study(study_name=name, storage=make_storage(storage))
    done_before = {t.number: t.value for t in study.get_trials() if t.state == COMPLETE}
    assert done_before, "no trial had completed before the kill"
    (killed,) = [
        t for t in study.get_trials()
        if t.user_attrs.get(MIXTURE_ATTR) == victim[1] and "failed_trial" not in t.system_attrs
    ]  # fmt: skip
    # still running for the heartbeat case; already failed (and queued again) when the dead pid was noticed
    assert killed.state in (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.FAIL)

    procs[2] = worker(world, storage, name, n, 2, SCORE_SECONDS="0.1", **names(2))  # the restart
    results = finish([p for i, p in procs.items() if p.pid != victim[0]])
    for code, _, err in results:
        assert code == 0, err

    a = audit(storage, name, world, n)
    assert table.read_bytes().startswith(before), "a score recorded before the kill changed or vanished"
    after = {t.number: t for t in a.study.get_trials()}
    assert all(after[k].state == COMPLETE and after[k].value == v for k, v in done_before.items())
    assert after[killed.number].state == optuna.trial.TrialState.FAIL
    retries = [t for t in after.values() if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1 and retries[0].state == COMPLETE
    assert retries[0].user_attrs[MIXTURE_ATTR] == victim[1]
    # the interrupted scoring was run once more, to the end; no scoring was ever run twice to the end
    ends = Counter(label for _, label in marks(world, "end"))
    assert ends[victim[1]] == 1 and max(ends.values()) == 1
    assert Counter(label for _, label in marks(world, "start"))[victim[1]] == 2


def test_cli_reports_a_crashed_worker_and_the_others_finish(world):
    """`dmo study --workers 2`, one worker killed mid-study: a warning line, and the budget is still met."""
    url = storage_url("sqlite", world)
    n, name = 12, "crash"
    parent = dmo(world, "study", "space.yaml", "--workers", "2", "--storage", url, "--study-name", name,
                 "--n-trials", str(n))  # fmt: skip
    t0 = time.monotonic()
    victim = None
    while victim is None:  # both workers up and 3 trials done (polled gently: 2 cores are shared with them)
        assert time.monotonic() - t0 < 60 and parent.poll() is None, "the study ended before a worker was killed"
        time.sleep(0.2)
        kids = _children(parent.pid)
        if len(kids) >= 2 and _count_complete(world / "results" / "rp" / "study.db", name) >= 3:
            victim = kids[0]
    os.kill(victim, signal.SIGKILL)
    code, _, err = finish([parent])[0]
    assert code == 0, err
    assert f"(pid {victim}) was killed by SIGKILL" in " ".join(err.split())
    audit(url, name, world, n)


def _count_complete(db: Path, study_name: str) -> int:
    """Completed trials of a study, read straight from the SQLite file (cheaper than opening an Optuna storage)."""
    import sqlite3

    if not db.exists():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(db, timeout=10)) as conn:
            (count,) = conn.execute(
                "SELECT COUNT(*) FROM trials JOIN studies USING (study_id) WHERE study_name = ? AND state = 'COMPLETE'",
                (study_name,),
            ).fetchone()
            return int(count)
    except sqlite3.OperationalError:  # tables not created yet
        return 0


def _children(pid: int) -> list[int]:
    """Worker processes of ``pid`` (the spawn machinery also starts a resource tracker: skip it)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(text.rsplit(")", 1)[1].split()[1]) == pid and b"resource_tracker" not in cmdline:
            kids.append(int(stat.parent.name))
    return sorted(kids)


def test_two_workers_drawing_the_same_point_score_it_once(world):
    """Two grid studies on one space, started together, want the same candidates: each is scored once."""
    url = storage_url("sqlite", world)
    cands = [m.id for m in load_space(world / "space.yaml").candidates()][:4]
    explicit = json.dumps([Mixture.parse(m, DOMAINS).as_dict() for m in cands])
    space = (world / "space.yaml").read_text().replace("{lattice: {resolution: 4}}", explicit)
    (world / "space.yaml").write_text(space)
    procs = [worker(world, url, f"twin{i}", 4, i, "grid", SCORE_SECONDS="0.4") for i in range(2)]
    for code, _, err in finish(procs):
        assert code == 0, err
    ends = Counter(label for _, label in marks(world, "end"))
    assert sorted(ends) == sorted(cands) and max(ends.values()) == 1, ends
    waited = 0
    for i in range(2):
        a = audit(url, f"twin{i}", world, len(cands))
        waited += sum(bool(t.user_attrs.get(CLAIM_WAIT_ATTR)) for t in a.complete)
    assert waited >= 1, "the second worker never waited for the first one's claim"


def test_claim_of_a_killed_scorer_is_taken_over_at_once(tmp_path):
    """A second scorer waits on the claim while its holder lives, and gets it as soon as the holder is killed."""
    import threading

    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""\
            import time
            from pathlib import Path
            from dmo.search.claims import scoring_claim
            with scoring_claim(Path({str(tmp_path)!r}), "k"):
                print("held", flush=True)
                time.sleep(60)
            """)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    waits, got = [], []

    def second() -> None:
        with scoring_claim(tmp_path, "k", on_wait=lambda: waits.append(time.monotonic())):
            got.append(time.monotonic())

    thread = threading.Thread(target=second)
    thread.start()
    time.sleep(0.5)
    assert waits and not got, "the second scorer did not wait for the live holder"
    killed = time.monotonic()
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    thread.join(timeout=10)
    assert got and got[0] - killed < 1, "the claim of the killed holder was not taken over"


def test_creator_dying_mid_enqueue_is_taken_over_and_nothing_is_enqueued_twice(world, monkeypatch):
    """The process that created a grid study died after enqueueing part of it: another finishes the job."""
    monkeypatch.setenv("DMO_RESULTS", str(world / "results"))
    space = load_space(world / "space.yaml")
    space = space.model_copy(update={"sampler": space.sampler.model_copy(update={"name": "grid"})})
    paths = study_paths(space, storage_url("sqlite", world), "orphan")
    storage = make_storage(paths.storage)
    storage.create_new_study([optuna.study.StudyDirection.MAXIMIZE], "orphan")
    study = optuna.load_study(study_name="orphan", storage=storage)
    study.set_user_attr(INIT_ATTR, "started")  # the creator's first step...
    from dmo.search.simplex import param_names, to_box

    for m in space.candidates()[:5]:  # ...and part of its grid, then it died
        study.enqueue_trial(dict(zip(param_names(DOMAINS), to_box(m))), user_attrs={MIXTURE_ATTR: m.id})
    from dmo.scoring.replay_backend import ReplayScorer

    table = space.scoring.backend_options().table
    t0 = time.monotonic()
    res = run_study(space, ReplayScorer(table, nearest=True), paths, progress=False,
                    heartbeat=Heartbeat(0.2, 1.0))  # fmt: skip
    assert time.monotonic() - t0 < 30
    a = audit(paths.storage, "orphan", world, len(space.candidates()))
    assert sorted(a.mixtures) == sorted(m.id for m in space.candidates())
    assert len(res.study.trials) == len(space.candidates())


def test_a_trial_whose_worker_died_before_claiming_it_is_retried(world, monkeypatch, caplog):
    """A worker killed inside Optuna's ask (trial created, sampled, no heartbeat, no worker name yet) leaves a RUNNING
    trial no heartbeat check sees; after a grace period another worker fails it, queues it again, and finishes."""
    monkeypatch.setenv("DMO_RESULTS", str(world / "results"))
    space = load_space(world / "space.yaml")
    paths = study_paths(space, storage_url("sqlite", world), "unclaimed")
    hb = Heartbeat(0.2, 1.0)
    from dmo.scoring.replay_backend import ReplayScorer
    from dmo.search.study import open_study

    study = open_study(space, paths, heartbeat=hb)
    orphan = study.ask()  # what the dead worker left: RUNNING, never claimed
    assert study.get_trials(deepcopy=False)[0].state == optuna.trial.TrialState.RUNNING
    time.sleep(1.2)
    table = space.scoring.backend_options().table
    t0 = time.monotonic()
    with caplog.at_level("WARNING", logger="dmo.study"):
        run_study(space, ReplayScorer(table, nearest=True), paths, n_trials=4, progress=False,
                  heartbeat=hb)  # fmt: skip
    assert time.monotonic() - t0 < 30
    trials = optuna.load_study(study_name="unclaimed", storage=make_storage(paths.storage)).get_trials()
    assert trials[orphan.number].state == optuna.trial.TrialState.FAIL
    assert f"trial {orphan.number}: no worker claimed it" in caplog.text
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials) == 4
    assert any(t.system_attrs.get("failed_trial") == orphan.number for t in trials)  # queued again, once


def test_each_worker_gets_its_own_sampler_seed(monkeypatch):
    monkeypatch.delenv("DMO_WORKER_INDEX", raising=False)
    assert [worker_seed(7, i, False) for i in range(3)] == [7, 8, 9]
    assert worker_seed(7, None, True) == 7  # the creator (a single `dmo study`) keeps the space's seed
    assert len({worker_seed(7, None, False) for _ in range(5)}) > 1  # joiners without an index differ
    monkeypatch.setenv("DMO_WORKER_INDEX", "3")
    assert worker_seed(7, None, False) == 10


def test_heartbeat_settings_come_from_the_environment(monkeypatch):
    monkeypatch.delenv("DMO_HEARTBEAT_INTERVAL", raising=False)
    monkeypatch.delenv("DMO_HEARTBEAT_GRACE", raising=False)
    assert Heartbeat.from_env() == Heartbeat(30.0, 120.0)
    monkeypatch.setenv("DMO_HEARTBEAT_INTERVAL", "2")
    assert Heartbeat.from_env() == Heartbeat(2.0, 8.0)
    monkeypatch.setenv("DMO_HEARTBEAT_GRACE", "1")
    with pytest.raises(DmoError, match="must be longer"):
        Heartbeat.from_env()


@pytest.mark.parametrize("kind", [pytest.param("postgres", marks=pytest.mark.postgres), "sqlite"])
def test_a_constrained_two_objective_study_on_two_workers_resumes(world, request, kind):
    """`objective: {pareto: ...}` with `constraints` through `dmo study --workers 2`, then resumed: every trial has both
    objectives and its feasibility, the budget is shared and nothing is scored twice."""
    space = world / "space.yaml"
    text = space.read_text().replace("sampler: {name: random", "sampler: {name: tpe")
    space.write_text(text + "objective: {pareto: [b1, b2]}\nconstraints: [{benchmark: b2, min: 0.9}]\n")
    storage = storage_url(kind, world, request.getfixturevalue("postgres") if kind == "postgres" else None)
    name = f"mo-{kind}"

    def run(n: int, workers: int, **extra: str) -> str:
        code, out, err = finish([dmo(world, "study", "space.yaml", "--workers", str(workers), "--storage", storage,
                                     "--study-name", name, "--n-trials", str(n), **extra)], timeout=300)[0]  # fmt: skip
        assert code == 0, err
        return " ".join(out.split())

    out = run(10, 2, **with_barrier(world, 2))
    assert "constraint: b2 >= 0.9000" in out and "front of study" in out and "10 new evaluations" in out, out
    study = optuna.load_study(study_name=name, storage=make_storage(storage))
    rows = [json.loads(line) for line in (world / "results" / "rp" / "scores.jsonl").read_text().splitlines()]
    assert Counter(r["key"] for r in rows).most_common(1)[0][1] == 1, "a score was recorded twice"
    done = [t for t in study.get_trials() if t.state == COMPLETE]
    assert len(done) == 10 and len({t.user_attrs[MIXTURE_ATTR] for t in done}) == 10
    assert len({t.user_attrs["worker"] for t in done}) == 2
    for t in done:
        scores = {r["benchmark"]: r["score"] for r in rows if r["mixture"] == t.user_attrs[MIXTURE_ATTR]}
        assert t.values == pytest.approx([scores["b1"], scores["b2"]])
        assert t.user_attrs["dmo_feasible"] == (scores["b2"] >= 0.9)
    out = run(14, 1)
    assert "4 new evaluations" in out
    done = [t for t in study.get_trials() if t.state == COMPLETE]
    assert len(done) == 14 and len({t.user_attrs[MIXTURE_ATTR] for t in done}) == 14
    feasible = [t for t in done if t.user_attrs["dmo_feasible"]]
    front = {t.number for t in feasible if not any(
        all(b >= a for a, b in zip(t.values, o.values)) and o.values != t.values for o in feasible)}  # fmt: skip
    assert {t.number for t in study.best_trials} == front
    for number in front:
        assert f" {number} " in f" {out} "
