"""The search layer, driven by an analytic scorer so that the optimum is known.

The scorer is a test double for the *model*, not for the code under test: studies, storages, caching and
resumption are the real Optuna/dmo code paths.
"""

from collections import Counter

import optuna
import pytest

from dmo.config import parse_space
from dmo.errors import DmoError
from dmo.scoring.base import Evaluation, Scorer, Target
from dmo.search.study import study_paths
from dmo.search.trials import run_study

OPT = {"counting": 0.2, "general": 0.3, "ocr": 0.5}


class Bowl(Scorer):
    name = "bowl"

    def __init__(self, fail: set[str] = frozenset()):
        self.calls: list[str] = []
        self.fail = fail

    def fingerprint(self, target: Target) -> str:
        return target.label

    def settings(self) -> dict:
        return {"version": 1}

    def evaluate(self, target: Target, benchmarks):
        self.calls.append(target.label)
        w = target.weights
        value = 1 - sum((w[d] - OPT[d]) ** 2 for d in OPT)
        scores = {b: value for b in benchmarks if b not in self.fail}
        return Evaluation(scores, errors={b: "boom" for b in benchmarks if b in self.fail})


def space(sampler="tpe", n=12, **extra):
    return parse_space(
        {
            "name": "s",
            "domains": ["counting", "general", "ocr"],
            "mixtures": {"preset": "paper-3d"},
            "benchmarks": ["b1", "b2"],
            "sampler": {"name": sampler, "n_trials": n, "seed": 1},
            **extra,
        }
    )


def test_grid_scores_every_candidate_once_and_resume_scores_nothing(tmp_path):
    sp = space("grid")
    scorer = Bowl()
    res = run_study(sp, scorer, study_paths(sp, root=tmp_path), progress=False)
    assert sorted(scorer.calls) == sorted(m.id for m in sp.candidates())
    assert res.best.id == "counting-0.25+general-0.25+ocr-0.5"
    again = Bowl()
    res2 = run_study(sp, again, study_paths(sp, root=tmp_path), progress=False)
    assert again.calls == [] and len(res2.study.trials) == 21


@pytest.mark.parametrize("sampler", ["random", "tpe", "gp", "cmaes", "qmc"])
def test_samplers_propose_valid_mixtures_and_reuse_cached_scores(tmp_path, sampler):
    sp = space(sampler, n=8)
    scorer = Bowl()
    res = run_study(sp, scorer, study_paths(sp, root=tmp_path), progress=False)
    trials = res.study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == 8
    assert len(scorer.calls) == len(set(scorer.calls))  # no mixture scored twice
    # resuming with a larger budget runs only the missing trials
    more = Bowl()
    res = run_study(sp, more, study_paths(sp, root=tmp_path), n_trials=10, progress=False)
    assert len(res.study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 10
    assert len(more.calls) <= 2


def test_tpe_beats_its_own_random_start(tmp_path):
    sp = space("tpe", n=30)
    res = run_study(sp, Bowl(), study_paths(sp, root=tmp_path), progress=False)
    values = [t.value for t in res.study.trials]
    assert max(values) >= max(values[:5])
    assert res.best_value > 0.99


def test_changed_space_under_same_study_is_refused_and_left_intact(tmp_path):
    sp = space("grid")
    run_study(sp, Bowl(), study_paths(sp, root=tmp_path), progress=False)
    changed = space("grid", benchmarks=["b1"])
    with pytest.raises(DmoError, match="different search space"):
        run_study(changed, Bowl(), study_paths(changed, root=tmp_path), progress=False)
    paths = study_paths(sp, root=tmp_path)
    study = optuna.load_study(study_name=paths.study_name, storage=paths.storage)
    assert len(study.trials) == 21


def test_failed_benchmark_is_recorded_and_trial_not_counted_as_complete(tmp_path):
    sp = space("random", n=3)
    paths = study_paths(sp, root=tmp_path)
    res = run_study(sp, Bowl(fail={"b2"}), paths, progress=False)
    states = Counter(t.state for t in res.study.trials)
    assert states[optuna.trial.TrialState.PRUNED] == 3
    df = paths.table.frame()
    assert set(df["status"]) == {"ok", "failed"}
    assert (df[df.benchmark == "b2"]["error"] == "boom").all()
    assert df[df.benchmark == "b1"]["score"].notna().all()


def test_no_benchmarks_is_an_actionable_error(tmp_path):
    sp = parse_space({"name": "s", "domains": ["a", "b"], "mixtures": [{"a": 1}]})
    with pytest.raises(DmoError, match="lists no benchmarks"):
        run_study(sp, Bowl(), study_paths(sp, root=tmp_path), progress=False)
