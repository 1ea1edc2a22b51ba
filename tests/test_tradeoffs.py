"""Multi-objective and constrained studies (``objective: {pareto: [...]}``, ``constraints``), driven by an analytic
scorer so that the trade-off is known; studies, storages, samplers and caching are the real Optuna/dmo code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from dmo.config import parse_space
from dmo.errors import DmoError
from dmo.scoring.base import Evaluation, Scorer, Target
from dmo.search.history import study_history
from dmo.search.study import MIXTURE_ATTR, space_hash, study_paths
from dmo.search.tradeoffs import (
    FEASIBLE_ATTR,
    SET_ON_TRIAL,
    STUDY_CONSTRAINTS_ATTR,
    VIOLATIONS_ATTR,
    trial_constraints,
)
from dmo.search.trials import run_study

DOMAINS = ["counting", "general", "ocr"]
BASE = {"b1": 0.2, "b2": 0.3}
EXPERTS = {"counting": {"b1": 0.1, "b2": 0.9}, "general": {"b1": 0.5, "b2": 0.5}, "ocr": {"b1": 0.95, "b2": 0.05}}
COMPLETE = optuna.trial.TrialState.COMPLETE


class Tradeoff(Scorer):
    """b1 grows with OCR, b2 falls with it: no mixture is best on both."""

    name = "tradeoff"

    def __init__(self, fail_base: bool = False) -> None:
        self.calls: list[str] = []
        self.fail_base = fail_base

    def fingerprint(self, target: Target) -> str:
        return target.label

    def settings(self) -> dict:
        return {"version": 1}

    def evaluate(self, target: Target, benchmarks):
        self.calls.append(target.label)
        if target.kind == "base":
            if self.fail_base:
                return Evaluation({}, errors={b: "no base here" for b in benchmarks})
            return Evaluation({b: BASE[b] for b in benchmarks})
        if target.kind == "expert":
            return Evaluation({b: EXPERTS[target.domain][b] for b in benchmarks})
        w = target.weights
        scores = {"b1": 0.9 * w["ocr"] + 0.3 * w["general"], "b2": 1 - w["ocr"] ** 2 - 0.5 * w["counting"]}
        return Evaluation({b: scores[b] for b in benchmarks})


def space(sampler: str | None = "tpe", n: int = 10, **extra):
    data = {
        "name": "s",
        "domains": DOMAINS,
        "mixtures": {"preset": "paper-3d"},
        "benchmarks": ["b1", "b2"],
        "objective": {"pareto": ["b1", "b2"]},
        "sampler": {"n_trials": n, "seed": 3, **({"name": sampler} if sampler else {})},
        **extra,
    }
    return parse_space(data)


def scores_of(t: optuna.trial.FrozenTrial) -> dict[str, float]:
    return {k.removeprefix("score:"): v for k, v in t.user_attrs.items() if k.startswith("score:")}


def dominated(v: list[float], others: list[list[float]]) -> bool:
    return any(all(b >= a for a, b in zip(v, o)) and any(b > a for a, b in zip(v, o)) for o in others)


@pytest.mark.parametrize("sampler", ["tpe", "nsga2", "random", "qmc", "grid", "gp"])
def test_a_two_objective_study_records_both_objectives_and_its_front(tmp_path: Path, sampler: str) -> None:
    sp = space(sampler, n=7 if sampler == "gp" else 12)
    scorer = Tradeoff()
    res = run_study(sp, scorer, study_paths(sp, root=tmp_path), progress=False)
    study = res.study
    assert len(study.directions) == 2 and study.user_attrs["objectives"] == ["b1", "b2"]
    done = study.get_trials(states=(COMPLETE,))
    assert len(done) == (21 if sampler == "grid" else sp.sampler.n_trials)
    for t in done:
        assert t.values == pytest.approx([scores_of(t)["b1"], scores_of(t)["b2"]])
    want = {t.number for t in done if not dominated(t.values, [o.values for o in done])}
    assert res.tradeoffs is not None and {f.number for f in res.tradeoffs.front} == want
    assert {t.number for t in study.best_trials} == want  # Optuna's own front agrees
    assert res.best is None
    assert len(scorer.calls) == len(set(scorer.calls))
    # resuming with a larger budget runs only the missing trials and scores no mixture twice
    if sampler != "grid":
        again = Tradeoff()
        res2 = run_study(sp, again, study_paths(sp, root=tmp_path), n_trials=sp.sampler.n_trials + 2, progress=False)
        assert len(res2.study.get_trials(states=(COMPLETE,))) == sp.sampler.n_trials + 2
        assert len(again.calls) <= 2


def test_a_weighted_group_is_one_objective(tmp_path: Path) -> None:
    sp = space("random", n=5, objective={"pareto": ["b1", {"name": "mostly b2", "weights": {"b1": 1, "b2": 3}}]})
    res = run_study(sp, Tradeoff(), study_paths(sp, root=tmp_path), progress=False)
    assert res.study.user_attrs["objectives"] == ["b1", "mostly b2"]
    for t in res.study.get_trials(states=(COMPLETE,)):
        s = scores_of(t)
        assert t.values == pytest.approx([s["b1"], (s["b1"] + 3 * s["b2"]) / 4])


def test_the_best_trial_of_a_constrained_study_is_the_best_feasible_one(tmp_path: Path) -> None:
    # one objective, b1 (more OCR is better), but b2 must stay above the general expert's minus 0.1: at most ~0.77 OCR;
    # the paper's grid holds mixtures on both sides
    sp = space("grid", objective="mean", benchmarks=["b1", "b2"],
               constraints=[{"benchmark": "b2", "min": "expert:general - 0.1"}])  # fmt: skip
    sp = sp.model_copy(update={"objective": sp.objective.model_copy(update={"aggregate": "weighted",
                                                                           "weights": {"b1": 1.0}})})  # fmt: skip
    res = run_study(sp, Tradeoff(), study_paths(sp, root=tmp_path), progress=False)
    done = res.study.get_trials(states=(COMPLETE,))
    feasible = [t for t in done if scores_of(t)["b2"] >= 0.4]
    infeasible = [t for t in done if scores_of(t)["b2"] < 0.4]
    assert feasible and infeasible, "the test needs both kinds of trial"
    for t in done:  # every trial kept, complete, marked
        assert t.user_attrs[FEASIBLE_ATTR] == (t in feasible)
        assert t.user_attrs[VIOLATIONS_ATTR] == pytest.approx([0.4 - scores_of(t)["b2"]])
    best = max(feasible, key=lambda t: t.value)
    assert max(t.value for t in infeasible) > best.value  # the constraint changes the pick
    assert res.best is not None and res.best.id == best.user_attrs[MIXTURE_ATTR]
    assert res.best_value == pytest.approx(best.value)
    assert res.study.best_trial.number == best.number  # Optuna's feasibility-aware best agrees
    assert res.study.user_attrs[STUDY_CONSTRAINTS_ATTR] == ["b2 >= 0.4000 (expert:general - 0.1)"]
    assert res.tradeoffs is not None and res.tradeoffs.feasible == len(feasible)


def test_a_study_where_nothing_is_feasible_says_so(tmp_path: Path) -> None:
    sp = space("random", n=4, constraints=[{"benchmark": "b1", "min": 2}])
    res = run_study(sp, Tradeoff(), study_paths(sp, root=tmp_path), progress=False)
    assert res.tradeoffs is not None and res.tradeoffs.front == [] and res.tradeoffs.feasible == 0
    assert res.tradeoffs.note == "no trial is feasible: all 4 completed trials violate a constraint"
    assert len(res.study.get_trials(states=(COMPLETE,))) == 4


def test_relative_thresholds_score_the_base_and_experts_once(tmp_path: Path) -> None:
    constraints = [{"benchmark": "b2", "min": "base"}, {"benchmark": "b1", "min": "expert - 0.9"},
                   {"benchmark": "b1", "min": 0.05}]  # fmt: skip
    sp = space("random", n=3, constraints=constraints)
    scorer = Tradeoff()
    paths = study_paths(sp, root=tmp_path)
    res = run_study(sp, scorer, paths, progress=False)
    assert res.study.user_attrs[STUDY_CONSTRAINTS_ATTR] == ["b2 >= 0.3000 (base)", "b1 >= 0.0500 (expert - 0.9)",
                                                            "b1 >= 0.0500"]  # fmt: skip
    assert scorer.calls[:4] == ["base", *DOMAINS] and all(scorer.calls.count(x) == 1 for x in ["base", *DOMAINS])
    again = Tradeoff()
    run_study(sp, again, paths, n_trials=4, progress=False)
    assert "base" not in again.calls  # read from the results table
    kinds = set(paths.table.frame()["kind"])
    assert {"base", "expert", "proxy"} <= kinds


def test_a_reference_that_cannot_be_scored_stops_before_the_study_opens(tmp_path: Path) -> None:
    sp = space("random", n=3, constraints=[{"benchmark": "b2", "min": "base + 0.01"}])
    paths = study_paths(sp, root=tmp_path)
    with pytest.raises(DmoError, match=r"constraints: the base model could not be scored on b2 \(no base here\)"):
        run_study(sp, Tradeoff(fail_base=True), paths, progress=False)
    assert not Path(paths.storage.removeprefix("sqlite:///")).exists()


def test_the_default_sampler_and_the_hash_of_spaces_without_tradeoffs() -> None:
    assert space(None).sampler.name == "tpe"
    plain = parse_space({"name": "s", "domains": DOMAINS, "mixtures": {"preset": "paper-3d"}, "benchmarks": ["b1"]})
    assert plain.sampler.name == "tpe"
    constrained = parse_space({"name": "s", "domains": DOMAINS, "mixtures": {"preset": "paper-3d"},
                               "benchmarks": ["b1"], "constraints": [{"benchmark": "b1", "min": 0.1}]})  # fmt: skip
    assert constrained.sampler.name == "tpe"
    # a space without pareto or constraints keeps the hash it had before they existed (its studies stay valid): the
    # values space_hash gave these spaces at commit ac8c1c0, before multi-objective studies and constraints
    assert space_hash(plain) == "467d5ab9f7da0d30"
    calibrated = plain.model_copy(
        update={
            "objective": parse_space(
                {"domains": DOMAINS, "mixtures": [{"ocr": 1}], "objective": {"calibrate": {"method": "residual"}}}
            ).objective
        }
    )
    assert space_hash(calibrated) == "5db55bc2f318d908"
    assert space_hash(space("tpe")) != space_hash(space("tpe", constraints=[{"benchmark": "b1", "min": 0.1}]))


def test_the_history_table_has_one_column_per_objective_and_feasibility(tmp_path: Path) -> None:
    sp = space("random", n=4, constraints=[{"benchmark": "b2", "min": 0.5}])
    paths = study_paths(sp, root=tmp_path)
    run_study(sp, Tradeoff(), paths, progress=False)
    table, note = study_history(paths.storage)
    assert note is None and len(table) == 4
    assert table["value"].isna().all() and {"objective:b1", "objective:b2", "feasible"} <= set(table.columns)
    assert (table["feasible"] == (table["score:b2"] >= 0.5)).all()


# --------------------------------------------------------------------------------- bad input, on the command line

SPACE = {
    "name": "bad",
    "domains": ["a", "b"],
    "experts": "experts.yaml",
    "mixtures": [{"a": 0.5, "b": 0.5}],
    "benchmarks": ["b1", "b2"],
    "objective": {"pareto": ["b1", "b2"]},
}


@pytest.mark.parametrize(("change", "args", "message"), [
    ({"objective": {"pareto": ["b1", "b3"]}}, [], "objective: pareto: 'b3' is not a benchmark of this space (b1, b2)"),
    ({"constraints": [{"benchmark": "b9", "min": 0.5}]}, [],
     "constraints: 0: 'b9' is not scored by this space (b1, b2): a constraint needs one of its benchmarks"),
    ({"sampler": "cmaes"}, [], "sampler: sampler 'cmaes' optimises a single objective, and this study has several"),
    ({}, ["--sampler", "cmaes"], "sampler 'cmaes' optimises a single objective"),
    ({"objective": {"pareto": ["b1"]}}, [], "pareto needs at least two objectives"),
    ({"constraints": [{"benchmark": "b1", "min": "best"}]}, [], "min 'best' is neither a number nor 'base'"),
    ({"objective": "mean", "constraints": [{"benchmark": "b1", "min": 0.1}], "sampler": "cmaes"}, [],
     "sampler 'cmaes' cannot take constraints"),
    ({"objective": {"pareto": ["b1", "b2"], "calibrate": {}}}, [], "drop calibrate"),
])  # fmt: skip
def test_bad_trade_off_input_is_one_line_before_the_study_opens(tmp_path: Path, change, args, message) -> None:
    (tmp_path / "experts.yaml").write_text("name: x\nbase: ./base\nexperts: {a: ./a, b: ./b}\n")
    (tmp_path / "space.yaml").write_text(yaml.safe_dump({**SPACE, **change}))
    env = {**os.environ, "DMO_RESULTS": str(tmp_path / "results")}
    out = subprocess.run([sys.executable, "-m", "dmo.cli", "study", "space.yaml", *args], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], out.stderr
    assert not (tmp_path / "results").exists()


def test_the_constraints_func_for_optuna_4_reads_the_violations_each_trial_recorded(tmp_path: Path) -> None:
    sp = space("random", n=3, constraints=[{"benchmark": "b2", "min": 0.5}, {"benchmark": "b1", "min": 0.1}])
    res = run_study(sp, Tradeoff(), study_paths(sp, root=tmp_path), progress=False)
    for t in res.study.get_trials(states=(COMPLETE,)):
        s = scores_of(t)
        want = [0.5 - s["b2"], 0.1 - s["b1"]]
        assert trial_constraints(t, 2) == pytest.approx(want)
        if SET_ON_TRIAL:  # Optuna 5: the same values, set on the trial for its samplers
            assert list(t.constraints.values()) == pytest.approx(want)
    unscored = optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED)
    assert trial_constraints(unscored, 2) == [1.0, 1.0]  # pruned before scoring: violates every constraint
