"""Cheaper studies (issue 24): item orders, per-item scores, partial rows, stagewise trials with pruners.

Most tests score through the ``replay`` backend over a recorded lattice with per-item scores (a real backend with
``evaluate_items``), so what is tested is the item table, the stage loop, Optuna's pruners and the study loop; the
last test runs a real ``dmo study`` with the ``hf`` backend on the small tiny world, resumed by two workers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
from test_distributed import postgres  # noqa: F401 (the fixture: a fresh database on the test server)

from dmo.config import load_space, parse_space
from dmo.errors import DmoError
from dmo.mixture import lattice
from dmo.paths import SpaceFolder
from dmo.results import ResultsTable, ScoreRow, partial_as_scores
from dmo.scoring.base import ItemEvaluation, Target
from dmo.scoring.items import ItemOrders, ItemStore, ItemTable, item_order, prefix_sizes, score_items
from dmo.scoring.replay_backend import ReplayScorer
from dmo.search.stages import ITEMS_ATTR, PARTIAL_ATTR, check_pruner_compatible, check_stages, item_weights
from dmo.search.storage import make_storage
from dmo.search.study import MIXTURE_ATTR, study_paths
from dmo.search.trials import run_study

DOMAINS = ["a", "b", "c"]
BENCHMARKS = ["b1", "b2"]
N_ITEMS = 80
OPT = {"a": 0.2, "b": 0.3, "c": 0.5}
COMPLETE, PRUNED = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED


class Counting(ReplayScorer):
    """The replay backend, counting every item it is asked to score."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.asked: Counter[tuple[str, str, int]] = Counter()

    def evaluate_items(self, target: Target, items: Mapping[str, Sequence[int]]) -> ItemEvaluation:
        for b, ids in items.items():
            self.asked.update((target.label, b, int(d)) for d in ids)
        return super().evaluate_items(target, items)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A lattice (1/8, 45 mixtures) with N_ITEMS 0/1 items per benchmark, each item right with a probability that
    peaks at OPT: the per-item table, item order and full rows a replay answers from."""
    folder = SpaceFolder(tmp_path_factory.mktemp("recorded"))
    rng = np.random.default_rng(7)
    ItemOrders(folder.item_order).orders(BENCHMARKS, lambda b: N_ITEMS)
    easy = rng.uniform(-1.5, 1.5, (len(BENCHMARKS), N_ITEMS))  # items differ in difficulty, as real ones do
    rows, items = [], []
    for m in lattice(DOMAINS, 8):
        skill = 3 - 12 * sum((m[d] - OPT[d]) ** 2 for d in DOMAINS)
        for j, b in enumerate(BENCHMARKS):
            p = 1 / (1 + np.exp(-(skill + easy[j])))
            got = {i: float(rng.random() < p[i]) for i in range(N_ITEMS)}
            row = {"kind": "proxy", "mixture": m.id, "benchmark": b, "method": "linear", "weights": m.as_dict()}
            items.append({**row, "items": {str(i): v for i, v in got.items()}, "key": f"{m.id}{b}"})
            rows.append(ScoreRow("proxy", m.id, b, float(np.mean(list(got.values()))), weights=m.as_dict(),
                                 method="linear", items=N_ITEMS, items_total=N_ITEMS))  # fmt: skip
    ResultsTable(folder.scores).append(rows)
    ItemTable(folder.items).append(items)
    return folder.scores


def staged_space(
    root: Path,
    recorded: Path,
    pruner: str = "wilcoxon",
    sampler: str = "random",
    n: int = 24,
    stages: str = "[0.125, 0.25, 0.5, 1]",
    params: str = "{p_threshold: 0.2, block: 4}",
) -> Path:
    for d in ("base", "ea", "eb", "ec"):
        (root / "models" / d).mkdir(parents=True, exist_ok=True)
    (root / "experts.yaml").write_text(
        "name: fake\nbase: ./models/base\nexperts: {a: ./models/ea, b: ./models/eb, c: ./models/ec}\n"
    )
    path = root / f"{pruner}.yaml"
    path.write_text(
        textwrap.dedent(f"""\
        name: st
        domains: [a, b, c]
        experts: experts.yaml
        mixtures: {{lattice: {{resolution: 4}}}}
        benchmarks: [b1, b2]
        sampler: {{name: {sampler}, n_trials: {n}, seed: 0}}
        pruner: {{name: {pruner}, params: {params}}}
        scoring: {{backend: replay, replay: {{table: {recorded}, nearest: true}}, stages: {stages}}}
        """)
    )
    return path


def study_of(paths) -> optuna.Study:
    return optuna.load_study(study_name=paths.study_name, storage=make_storage(paths.storage))


def item_rows(folder: Path) -> list[dict]:
    return ItemTable(SpaceFolder(folder).items).rows()


def scored_twice(folder: Path) -> list[tuple[str, str]]:
    seen = Counter((r["key"], d) for r in item_rows(folder) for d in r["items"])
    return [k for k, n in seen.items() if n > 1]


# ------------------------------------------------------------------------------------------ orders and items


def test_an_item_order_is_a_fixed_permutation_per_task_and_written_once(tmp_path: Path) -> None:
    a = item_order("dmo_tiny_ocr", 50)
    assert a == item_order("dmo_tiny_ocr", 50) and sorted(a) == list(range(50)) and a != list(range(50))
    assert a != item_order("dmo_tiny_general", 50)
    orders = ItemOrders(tmp_path / "item_order.json")
    first = orders.orders(["t1", "t1/sub", "t2"], lambda b: 30)
    assert first["t1"] == first["t1/sub"] == item_order("t1", 30)  # a sub-score reads its task's items

    def never(_: str) -> int:
        raise AssertionError("an order that is written is read, not drawn again")

    assert ItemOrders(tmp_path / "item_order.json").orders(["t2", "t1"], never) == {
        "t2": first["t2"],
        "t1": first["t1"],
    }


def test_prefix_sizes_cover_at_least_one_item_and_all_at_the_end() -> None:
    assert prefix_sizes(0.25, {"x": 200, "y": 7}) == {"x": 50, "y": 2}
    assert prefix_sizes(0.001, {"x": 200}) == {"x": 1} and prefix_sizes(1.0, {"x": 7}) == {"x": 7}


def test_a_promoted_proxy_continues_from_its_next_item_and_its_partial_row_is_never_a_score(
    tmp_path: Path, recorded: Path
) -> None:
    scorer = Counting(recorded)
    store = ItemStore.open(tmp_path, scorer, BENCHMARKS)
    table = ResultsTable(tmp_path / "scores.jsonl")
    m = lattice(DOMAINS, 8)[7]
    target = Target("proxy", mixture=m, method="linear")
    quarter = score_items(scorer, table, store, [target], prefix_sizes(0.25, store.totals))[0]
    assert quarter.covered() == {b: N_ITEMS // 4 for b in BENCHMARKS} and not quarter.complete
    df = table.frame()
    assert list(df["status"]) == ["partial", "partial"] and list(df["items"]) == [N_ITEMS // 4] * 2
    assert table.cached_keys() == {}  # a partial aggregate is never a cached (full) score
    whole = score_items(scorer, table, store, [target], store.totals)[0]
    assert whole.complete and max(scorer.asked.values()) == 1  # items 21.. only: none scored twice
    assert len(scorer.asked) == N_ITEMS * len(BENCHMARKS)
    recorded_items = {b: ReplayScorer(recorded)._proxies[("linear", m.id)].items[b] for b in BENCHMARKS}
    for b in BENCHMARKS:  # the full score is the mean of every item, as recorded
        assert whole.means[b] == pytest.approx(np.mean(list(recorded_items[b].values())), abs=1e-12)
        assert whole.values[b] == [recorded_items[b][d] for d in store.orders[b]]
    df = table.frame()
    assert set(df["status"]) == {"ok"} and list(df["items"]) == [N_ITEMS] * 2  # the full row hides the partial one
    again = score_items(scorer, table, store, [target], prefix_sizes(0.5, store.totals))[0]
    assert again.values == {b: whole.values[b][: N_ITEMS // 2] for b in BENCHMARKS} and max(scorer.asked.values()) == 1
    _, n = partial_as_scores(ResultsTable(tmp_path / "scores.jsonl").frame(latest=False))
    assert n == 0  # a partial row whose full row exists is not counted, even when asked for partial rows


def test_wilcoxon_reports_average_to_a_complete_trials_value(recorded: Path, tmp_path: Path) -> None:
    """The weights of per-item reports (two benchmarks of different sizes, a weighted objective): a fully scored
    trial's reports average to its objective, which the Wilcoxon test's safety check relies on."""
    space = parse_space(
        {
            "domains": DOMAINS,
            "mixtures": [{"a": 1, "b": 0, "c": 0}],
            "benchmarks": BENCHMARKS,
            "objective": {"aggregate": "weighted", "weights": {"b1": 3, "b2": 1}},
            "pruner": "wilcoxon",
        }
    )
    totals = {"b1": 30, "b2": 10}
    w = item_weights(space, totals)
    rng = np.random.default_rng(3)
    items = {b: rng.integers(0, 2, n).astype(float) for b, n in totals.items()}
    reports = [w[b] * v for b in totals for v in items[b]]
    assert np.mean(reports) == pytest.approx(space.objective({b: items[b].mean() for b in totals}), abs=1e-12)


# ------------------------------------------------------------------------------------------- staged studies


def test_a_wilcoxon_study_prunes_keeps_partial_rows_and_never_scores_an_item_twice(
    tmp_path: Path, recorded: Path
) -> None:
    space = load_space(staged_space(tmp_path, recorded, n=16))
    paths = study_paths(space, root=tmp_path / "results")
    scorer = Counting(recorded, nearest=True)
    result = run_study(space, scorer, paths, progress=False)
    study = study_of(paths)
    states = Counter(t.state for t in study.trials)
    assert states[PRUNED] >= 3 and states[COMPLETE] >= 2 and states[PRUNED] + states[COMPLETE] == 16, states
    assert max(scorer.asked.values()) == 1 and not scored_twice(paths.folder)
    df = ResultsTable(paths.table.path).frame()
    for t in study.get_trials(states=(PRUNED,)):
        covered = t.user_attrs[ITEMS_ATTR]
        assert all(n < N_ITEMS for n in covered.values()) and set(covered) == set(BENCHMARKS)
        rows = df[df["mixture"] == t.user_attrs[MIXTURE_ATTR]]
        if (rows["status"] == "ok").any():
            continue  # the same mixture was drawn again and completed by a later trial
        assert set(rows["status"]) == {"partial"} and set(rows["items"]) == set(covered.values())
        assert all(f"{PARTIAL_ATTR}{b}" in t.user_attrs for b in BENCHMARKS)
        assert not any(k.startswith("score:") for k in t.user_attrs)
    best = study.best_trial
    assert best.state == COMPLETE and result.best is not None and result.best.id == best.user_attrs[MIXTURE_ATTR]
    full = df[(df["mixture"] == result.best.id) & (df["status"] == "ok")]
    assert len(full) == len(BENCHMARKS) and set(full["items"]) == {N_ITEMS}  # the best trial is fully scored
    assert best.value == pytest.approx(np.mean(full["score"].astype(float)), abs=1e-12)
    # resumed to a larger budget: the earlier trials' items are read, never scored again
    scorer2 = Counting(recorded, nearest=True)
    run_study(space, scorer2, paths, n_trials=22, progress=False)
    assert len(study_of(paths).get_trials(states=(PRUNED, COMPLETE))) == 22
    assert not scored_twice(paths.folder) and not set(scorer2.asked) & set(scorer.asked)


@pytest.mark.parametrize("pruner", ["successive_halving", "hyperband", "median", "none"])
def test_every_pruner_runs_a_study_whose_best_trial_is_fully_scored(
    pruner: str, tmp_path: Path, recorded: Path
) -> None:
    space = load_space(staged_space(tmp_path, recorded, pruner, "tpe", 20, params="{}"))
    paths = study_paths(space, root=tmp_path / "results")
    scorer = Counting(recorded, nearest=True)
    run_study(space, scorer, paths, progress=False, batch=3 if pruner == "median" else 1)
    study = study_of(paths)
    assert len(study.get_trials(states=(PRUNED, COMPLETE))) == 20
    if pruner == "none":
        assert not study.get_trials(states=(PRUNED,))
    best = study.best_trial
    rows = ResultsTable(paths.table.path).frame()
    full = rows[(rows["mixture"] == best.user_attrs[MIXTURE_ATTR]) & (rows["status"] == "ok")]
    assert set(full["items"]) == {N_ITEMS} and len(full) == len(BENCHMARKS)
    assert max(scorer.asked.values()) == 1 and not scored_twice(paths.folder)
    steps = {s for t in study.trials for s in t.intermediate_values}
    assert steps <= {sum(prefix_sizes(f, dict.fromkeys(BENCHMARKS, N_ITEMS)).values()) for f in (0.125, 0.25, 0.5, 1)}


def test_rescore_scores_pruned_proxies_in_full_from_their_next_item(
    tmp_path: Path, recorded: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dmo.session import Session

    monkeypatch.setenv("DMO_RESULTS", str(tmp_path / "results"))
    session = Session.open(staged_space(tmp_path, recorded, n=16))
    scorer = Counting(recorded, nearest=True)
    session.scorer = scorer
    session.run_study(progress=False)
    pruned = {t.user_attrs[MIXTURE_ATTR] for t in study_of(study_paths(session.space)).get_trials(states=(PRUNED,))}
    assert pruned
    rows = session.rescore_pruned(progress=False)
    assert {label for label, _, _ in rows} == pruned
    assert max(scorer.asked.values()) == 1  # continued from the next item, never from the first
    df = session.table.frame()
    for label, _, full in rows:
        got = df[(df["mixture"] == label) & (df["status"] == "ok")]
        assert set(got["items"]) == {N_ITEMS} and full == pytest.approx(np.mean(got["score"].astype(float)))


def test_correlate_uses_full_scores_only_and_says_so(tmp_path: Path) -> None:
    table = ResultsTable(tmp_path / "scores.jsonl")
    table.append([
        ScoreRow("proxy", "a-0.5+b-0.5", "b1", 0.4, weights={"a": 0.5, "b": 0.5}, key="k1"),
        ScoreRow("proxy", "a-1+b-0", "b1", 0.9, weights={"a": 1.0, "b": 0.0}, key="k2", status="partial", items=5,
                 items_total=40),
    ])  # fmt: skip
    assert list(table.frame()["mixture"][table.frame()["status"] == "ok"]) == ["a-0.5+b-0.5"]
    env = {**os.environ}
    out = subprocess.run([sys.executable, "-m", "dmo.cli", "compare", str(tmp_path), "--all"], capture_output=True,
                         text=True, env=env)  # fmt: skip
    assert out.returncode == 0 and "full scores only; 1 partial scores" in out.stderr and "a-1+b-0" not in out.stdout
    out = subprocess.run([sys.executable, "-m", "dmo.cli", "compare", str(tmp_path), "--all", "--partial"],
                         capture_output=True, text=True, env=env)  # fmt: skip
    assert out.returncode == 0 and "counted as scores (--partial)" in out.stderr and "a-1+b-0" in out.stdout
    with pytest.raises(DmoError, match="must have status partial"):
        ScoreRow("proxy", "x", "b1", 0.5, items=3, items_total=40)


WORKER = textwrap.dedent("""\
    import sys
    from dmo.config import load_space
    from dmo.scoring.replay_backend import ReplayScorer
    from dmo.search.study import study_paths
    from dmo.search.trials import run_study

    space_file, storage, index = sys.argv[1:4]
    space = load_space(space_file)
    own = space.scoring.backend_options()
    run_study(space, ReplayScorer(own.table, nearest=True), study_paths(space, storage), progress=False,
              worker_index=int(index))
    """)


@pytest.mark.slow
@pytest.mark.parametrize("kind", [pytest.param("postgres", marks=pytest.mark.postgres), "sqlite"])
def test_two_workers_on_one_staged_study_score_no_item_twice(
    kind: str, tmp_path: Path, recorded: Path, request: pytest.FixtureRequest
) -> None:
    folder = tmp_path / "results" / "st"
    url = request.getfixturevalue("postgres") if kind == "postgres" else f"sqlite:///{folder / 'study.db'}"
    space = staged_space(tmp_path, recorded, n=20)
    (tmp_path / "worker.py").write_text(WORKER)
    env = {**os.environ, "DMO_RESULTS": str(tmp_path / "results")}
    folder.mkdir(parents=True)
    procs = [
        subprocess.Popen(
            [sys.executable, str(tmp_path / "worker.py"), str(space), url, str(i)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for p in procs:
        _, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr[-2000:]
    study = optuna.load_study(study_name="st.random", storage=make_storage(url))
    assert len(study.get_trials(states=(PRUNED, COMPLETE))) == 20 and study.get_trials(states=(PRUNED,))
    assert {t.user_attrs.get("worker") for t in study.trials} and not scored_twice(folder)
    assert study.best_trial.state == COMPLETE


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"scoring": {"stages": [0.5, 0.25, 1]}}, "is not increasing"),
        ({"scoring": {"stages": [0.25, 0.5]}}, "the last stage must be 1"),
        ({"scoring": {"stages": [0, 1]}}, "each stage is a fraction"),
        ({"pruner": "wilcox"}, "unknown pruner 'wilcox': choose one of none, wilcoxon"),
        ({"pruner": {"name": "hyperband", "params": {"eta": 3}}}, "pruner 'hyperband'.*check pruner.params"),
        ({"pruner": "wilcoxon", "objective": {"calibrate": "isotonic"}}, "calibrated objective is not a mean"),
        ({"pruner": {"name": "wilcoxon", "params": {"block": 0}}}, "pruner.params.block is 0"),
        ({"pruner": "median", "benchmarks": BENCHMARKS, "objective": {"pareto": BENCHMARKS}}, "multi-objective study"),
    ],
)
def test_bad_stages_and_pruners_are_one_line(extra: dict, message: str) -> None:
    with pytest.raises(DmoError, match=message) as err:
        parse_space({"domains": DOMAINS, "mixtures": {"lattice": {"resolution": 2}}, **extra})
    assert "\n" not in str(err.value)


def test_a_pruner_with_a_multi_objective_study_is_refused() -> None:
    """Written against the objective's shape (``objective: {pareto: [...]}``) so that it holds once studies have
    several objectives."""
    space = SimpleNamespace(
        pruner=SimpleNamespace(name="median", params={}), objective=SimpleNamespace(pareto=["b1", "b2"])
    )
    with pytest.raises(DmoError, match="multi-objective study"):
        check_pruner_compatible(space)  # type: ignore[arg-type]
    space.pruner.name = "none"
    check_pruner_compatible(space)  # type: ignore[arg-type]
    assert check_stages([0.25, 1]) == [0.25, 1.0]


def test_the_cli_refuses_a_bad_schedule_before_the_study_opens(tmp_path: Path, recorded: Path) -> None:
    path = staged_space(tmp_path, recorded, stages="[0.5, 0.25, 1]")
    env = {**os.environ, "DMO_RESULTS": str(tmp_path / "results")}
    out = subprocess.run([sys.executable, "-m", "dmo.cli", "study", str(path)], capture_output=True, text=True, env=env)
    assert out.returncode == 2 and "not increasing" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "results").exists()


# ------------------------------------------------------------------------------------- the small tiny world


@pytest.mark.slow
def test_a_wilcoxon_study_on_the_small_world_resumed_by_two_workers(tmp_path: Path) -> None:
    """``dmo study`` with the hf backend on the small tiny world: pruned proxies with partial rows, the best trial
    fully scored, and no item scored twice across a resume by two worker processes."""
    space = tmp_path / "staged.yaml"
    space.write_text(
        textwrap.dedent("""\
        name: staged
        domains: [counting, general, ocr]
        experts: tinyworld-small
        mixtures: {lattice: {resolution: 4}}
        benchmarks: [dmo_tiny_counting, dmo_tiny_general, dmo_tiny_ocr]
        sampler: {name: random, n_trials: 6, seed: 0}
        pruner: {name: wilcoxon, params: {p_threshold: 0.3}}
        scoring: {backend: hf, stages: [0.25, 0.5, 1]}
        """)
    )
    env = {**os.environ, "DMO_RESULTS": str(tmp_path / "results")}
    for extra in ([], ["--n-trials", "10", "--workers", "2"]):
        out = subprocess.run([sys.executable, "-m", "dmo.cli", "study", str(space), *extra], capture_output=True,
                             text=True, env=env, timeout=1200)  # fmt: skip
        assert out.returncode == 0, out.stderr[-2000:]
    folder = tmp_path / "results" / "staged"
    study = optuna.load_study(study_name="staged.random", storage=f"sqlite:///{folder / 'study.db'}")
    done = study.get_trials(states=(PRUNED, COMPLETE))
    assert len(done) == 10 and study.get_trials(states=(PRUNED,)), Counter(t.state.name for t in study.trials)
    assert not scored_twice(folder)
    totals = {b: e["items"] for b, e in json.loads((folder / "item_order.json").read_text())["tasks"].items()}
    df = ResultsTable(folder / "scores.jsonl").frame(latest=False)
    partial = df[df["status"] == "partial"]
    assert len(partial) and (partial["items"] < partial["items_total"]).all()
    best = study.best_trial
    full = df[(df["mixture"] == best.user_attrs[MIXTURE_ATTR]) & (df["status"] == "ok")]
    assert {r.benchmark: r["items"] for _, r in full.iterrows()} == totals
    assert best.value == pytest.approx(np.mean(full["score"].astype(float)), abs=1e-12)
