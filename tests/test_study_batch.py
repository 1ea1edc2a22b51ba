"""``dmo study --batch K``: K trials of one worker in flight, their targets scored in one backend call.

Scores come from the ``replay`` backend over a recorded lattice (a real backend with ``evaluate_many``), so what is
tested is the study loop, Optuna's concurrent trials, the batcher and the results table.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest

from dmo.config import load_space
from dmo.errors import DmoError
from dmo.mixture import lattice
from dmo.results import ResultsTable, ScoreRow
from dmo.scoring.base import Evaluation, Target
from dmo.scoring.replay_backend import ReplayScorer
from dmo.search.storage import make_storage
from dmo.search.study import MIXTURE_ATTR, study_paths
from dmo.search.trials import run_study
from dmo.session import study_batch

DOMAINS = ["a", "b", "c"]
BENCHMARKS = ["b1", "b2"]


class Recording(ReplayScorer):
    """The replay backend, noting how many targets each call held."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sizes: list[int] = []

    def evaluate(self, target: Target, benchmarks: Sequence[str]) -> Evaluation:
        self.sizes.append(1)
        return super().evaluate(target, benchmarks)

    def evaluate_many(self, targets: Sequence[Target], benchmarks: Sequence[str]) -> list[Evaluation]:
        self.sizes.append(len(targets))
        return [ReplayScorer.evaluate(self, t, benchmarks) for t in targets]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("recorded") / "scores.jsonl"
    rows = []
    for m in lattice(DOMAINS, 8):
        value = 1 - (m["a"] - 0.2) ** 2 - (m["b"] - 0.3) ** 2 - (m["c"] - 0.5) ** 2
        rows += [ScoreRow("proxy", m.id, b, value + 0.01 * i, weights=m.as_dict(), method="linear", metric="acc")
                 for i, b in enumerate(BENCHMARKS)]  # fmt: skip
    ResultsTable(path).append(rows)
    return path


def run(write: Callable[..., Path], tmp_path: Path, recorded: Path, sampler: str, n: int, batch: int) -> tuple:
    root = tmp_path / f"k{batch}"
    space = load_space(write(tmp_path, recorded, sampler, n, f"{sampler}.yaml"))
    scorer = Recording(recorded, nearest=True)
    paths = study_paths(space, root=root)
    run_study(space, scorer, paths, progress=False, batch=batch)
    study = optuna.load_study(study_name=paths.study_name, storage=make_storage(paths.storage))
    rows = [json.loads(line) for line in paths.table.path.read_text().splitlines() if line.strip()]
    return study, scorer, rows


def _complete(study: optuna.Study) -> dict[str, float]:
    done = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    mixtures = [t.user_attrs[MIXTURE_ATTR] for t in done]
    assert len(set(mixtures)) == len(mixtures), "a mixture was told twice"
    return {t.user_attrs[MIXTURE_ATTR]: t.value for t in done}


def test_grid_results_do_not_depend_on_the_batch(tmp_path: Path, recorded: Path, replay_space) -> None:
    candidates = {m.id for m in load_space(replay_space(tmp_path, recorded, "grid", 1, "grid.yaml")).candidates()}
    one, s1, rows1 = run(replay_space, tmp_path, recorded, "grid", 1, 1)
    four, s4, rows4 = run(replay_space, tmp_path, recorded, "grid", 1, 4)
    assert _complete(one) == _complete(four) and set(_complete(four)) == candidates
    assert set(s1.sizes) == {1} and max(s4.sizes) == 4  # the batch really went to the backend together
    assert sum(s4.sizes) == len(candidates)  # each target scored once
    for rows in (rows1, rows4):
        assert max(Counter(r["key"] for r in rows).values()) == 1 and len(rows) == len(candidates) * len(BENCHMARKS)


def test_a_sampled_study_with_a_batch_runs_its_budget_exactly(tmp_path: Path, recorded: Path, replay_space) -> None:
    study, scorer, rows = run(replay_space, tmp_path, recorded, "tpe", 10, 4)
    trials = study.get_trials()
    assert len(_complete(study)) == 10 and len(trials) == 10, Counter(t.state.name for t in trials)
    assert sum(scorer.sizes) == 10 and max(scorer.sizes) > 1
    assert len(rows) == 10 * len(BENCHMARKS) and max(Counter(r["key"] for r in rows).values()) == 1
    # resuming runs nothing more
    study2, scorer2, _ = run(replay_space, tmp_path, recorded, "tpe", 10, 4)
    assert scorer2.sizes == [] and len(study2.get_trials()) == 10


def test_batch_the_backend_cannot_take_is_refused() -> None:
    assert study_batch(SimpleNamespace(name="hf", max_batch=1, default_batch=1), None) == 1
    assert study_batch(SimpleNamespace(name="vllm", max_batch=4, default_batch=4), None) == 4
    assert study_batch(SimpleNamespace(name="replay", max_batch=64, default_batch=1), None) == 1
    with pytest.raises(DmoError, match="max_loras"):
        study_batch(SimpleNamespace(name="vllm", max_batch=4, default_batch=4), 5)
    with pytest.raises(DmoError, match="--batch 1"):
        study_batch(SimpleNamespace(name="hf", max_batch=1, default_batch=1), 2)
