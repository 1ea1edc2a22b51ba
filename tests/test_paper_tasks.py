"""dmo's lmms-eval tasks for the DMO paper's lenient metrics (dmo/scoring/paper_tasks).

Each matching rule on hand-made answers (the paper's own examples, then edge cases, quirks included: the point is
to reproduce the paper's numbers), then each task end to end through lmms-eval on a few local rows in the real
dataset's columns, with a model object that answers from a script, and no hub access.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

from dmo.scoring.paper_tasks import PAPER_TASKS, TASK_DIR, hooks, rules

# -- ChartQA: relaxed accuracy, and the paper's soft variant that drops trailing full stops first ----------------


@pytest.mark.parametrize(
    ("response", "target", "strict", "soft"),
    [
        ("Yes.", "Yes", False, True),  # the paper's example
        ("Yes", "Yes", True, True),
        ("yes", "Yes", True, True),  # text compares ignoring case
        ("Yes..", "Yes", False, True),  # every trailing full stop goes
        ("Yes. ", "Yes", False, False),  # ... but only full stops: a trailing space stays
        (".Yes", "Yes", False, False),  # leading stops stay
        ("12.3", "12", True, True),  # within 5 %
        ("12.3.", "12", False, True),  # not a number until the stop goes
        ("12.", "12", True, True),  # float("12.") is a number already
        ("12.7", "12", False, False),  # 5.8 % off
        ("11.4", "12", True, True),  # exactly 5 % off counts
        ("0.45.", "45%", False, True),  # a percentage target is a fraction
        ("45%", "0.45", True, True),
        ("0", "0", True, True),  # a zero target needs the same text: no relative error to 0
        ("0.0", "0", False, False),
        ("", "Yes", False, False),
        ("London.", "Paris", False, False),
    ],
)
def test_chartqa_relaxed_and_soft(response: str, target: str, strict: bool, soft: bool) -> None:
    assert rules.relaxed_match(response, target) is strict
    assert rules.relaxed_match_soft(response, target) is soft


# -- POPE: strict is the whole answer; the paper's soft reading is its first word without trailing . : , ---------


@pytest.mark.parametrize(
    ("response", "strict", "soft"),
    [
        ("Yes.", "yes.", "yes"),
        ("yes", "yes", "yes"),
        ("  YES  ", "yes", "yes"),
        ("No, there is no dog.", "no, there is no dog.", "no"),
        ("Yes: a dog", "yes: a dog", "yes"),
        ("yes,.:", "yes,.:", "yes"),
        ("Yes!", "yes!", "yes!"),  # only . : , go
        ("Answer: yes", "answer: yes", "answer"),
        ("\nno\n", "no", "no"),
        ("", "", ""),
        ("   ", "", ""),  # the paper's code raises here; dmo reads no answer
    ],
)
def test_pope_readings(response: str, strict: str, soft: str) -> None:
    assert rules.pope_prediction(response) == strict
    assert rules.pope_prediction_soft(response) == soft


def test_pope_reference_must_be_yes_or_no() -> None:
    assert rules.pope_answer(" Yes ") == "yes"
    with pytest.raises(ValueError, match="yes or no"):
        rules.pope_answer("maybe")


def _pope(truth: str, prediction: str) -> dict[str, Any]:
    return {"ground_truth": truth, "prediction": prediction, "score": float(truth == prediction)}


def test_pope_aggregations() -> None:
    results = [_pope("yes", "yes"), _pope("no", "yes"), _pope("yes", "no"), _pope("no", "no"), _pope("yes", "yes.")]
    assert hooks.pope_accuracy(results) == pytest.approx(2 / 5)
    assert hooks.pope_precision(results) == pytest.approx(1 / 2)  # tp 1, fp 1; "yes." is no positive
    assert hooks.pope_recall(results) == pytest.approx(1 / 2)  # tp 1, fn 1; "yes." is no negative either
    assert hooks.pope_f1_score(results) == pytest.approx(1 / 2)
    assert hooks.pope_yes_ratio(results) == pytest.approx(3 / 5)  # of the references
    assert hooks.pope_precision([_pope("no", "no")]) == 0.0
    assert hooks.pope_f1_score([_pope("no", "no")]) == 0.0


# -- MMStar: MMStar's own letter matching; the paper's soft variant removes "answer:" first -----------------------


@pytest.mark.parametrize(
    ("response", "answer", "strict", "soft"),
    [
        ("B", "B", True, True),
        ("Answer: B", "B", False, True),  # the paper's example
        ("ANSWER: b", "B", False, True),  # any case
        ("Answer:B", "B", False, True),
        ("Answer: (B)", "B", False, True),
        ("(B) 12 cm", "B", True, True),
        ("Option C", "C", True, True),
        ("The answer is D", "D", True, True),
        ("\nD", "D", True, True),
        ("b", "B", True, True),
        ("Answer: B", "A", True, False),  # the leading "a" of "Answer" is read as A: MMStar's rule, kept
        ("a dog", "A", True, True),  # same: only the first character counts
        ("C", "B", False, False),
        ("The answer: B", "B", False, False),
        ("", "A", False, False),
        ("(", "A", False, False),
        ("answer:", "A", True, False),  # nothing is left once "answer:" goes
    ],
)
def test_mmstar_strict_and_soft(response: str, answer: str, strict: bool, soft: bool) -> None:
    assert rules.mmstar_match(response, answer) is strict
    assert rules.mmstar_match_soft(response, answer) is soft


def test_mmstar_average_is_a_mean_over_fine_categories() -> None:
    results = [
        {"l2_category": "geometry", "score": 1.0},
        {"l2_category": "geometry", "score": 0.0},
        {"l2_category": "geometry", "score": 0.0},
        {"l2_category": "image emotion", "score": 1.0},
    ]
    assert rules.mmstar_average(results) == pytest.approx((1 / 3 + 1) / 2)  # not 2/4
    assert rules.mmstar_average([]) == 0.0


def test_mmstar_prompt_drops_the_yes_no_instruction_when_a_prompt_is_added() -> None:
    doc = {"question": " Is it red? Please answer yes or no. Options: A: yes, B: no "}
    post = {"pre_prompt": "", "post_prompt": "\nLetter only"}
    assert hooks.mmstar_doc_to_text(doc, post) == "Is it red? Options: A: yes, B: no\nLetter only"
    assert hooks.mmstar_doc_to_text(doc, {}) == "Is it red? Please answer yes or no. Options: A: yes, B: no"


# -- CV-Bench: the leading letter; _soft removes "Answer:" first; _softer also maps an answer equal to a choice ------

COUNT_CHOICES = ["3", "2", "1", "0"]


@pytest.mark.parametrize(
    ("response", "strict", "soft", "softer"),
    [
        ("B", "B", "B", "B"),
        ("(C)", "C", "C", "C"),
        (" b.", "B", "B", "B"),
        ("Answer: B", "A", "B", "B"),  # the paper's example: strictly, the "A" of "Answer" is the answer
        ("Answer: (D) 0", "A", "D", "D"),
        ("answer: B", "A", "A", "A"),  # "Answer:" is removed case-sensitively
        ("2", "", "", "B"),  # the paper's example: a count that is one of the choices stands for its letter
        ("3", "", "", "A"),
        ("Answer:2", "A", "", "B"),  # nothing left but the count: a choice
        ("Answer: 2", "A", "", ""),  # " 2" is compared as it stands, and is no choice: the paper's rule, kept
        ("2.", "", "", ""),
        ("7", "", "", ""),
        ("", "", "", ""),
        ("There are 2", "T", "T", "T"),
    ],
)
def test_cv_bench_readings(response: str, strict: str, soft: str, softer: str) -> None:
    assert rules.cv_bench_letter(response) == strict
    assert rules.cv_bench_letter_soft(response) == soft
    assert rules.cv_bench_letter_softer(response, COUNT_CHOICES) == softer


def test_cv_bench_reference_and_repeated_choices() -> None:
    assert rules.cv_bench_answer("(C)") == "C"
    assert rules.cv_bench_letter_softer("1", ["1", "1", "2"]) == "A"  # the first equal choice


def test_cv_bench_accuracies() -> None:
    results = [
        {"task": "Count", "is_correct": True},
        {"task": "Count", "is_correct": False},
        {"task": "Relation", "is_correct": True},
        {"task": "Relation", "is_correct": True},
    ]
    assert hooks.cv_bench_accuracy(results) == pytest.approx(3 / 4)
    assert hooks.cv_bench_count_accuracy(results) == pytest.approx(1 / 2)
    assert hooks.cv_bench_count_accuracy(results[2:]) == 0.0  # no counting question: 0, as in the paper


# -- Task files --------------------------------------------------------------------------------------------------


def _yaml(path: Path) -> dict[str, Any]:
    """A task file as data, ``!function`` tags as their text."""
    loader = type("Loader", (yaml.SafeLoader,), {})
    loader.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")
    return yaml.load(path.read_text(), Loader=loader)


def test_shipped_task_files_name_dmo_tasks_and_hooks_that_exist() -> None:
    files = sorted(TASK_DIR.glob("*.yaml"))
    assert {_yaml(f)["task"] for f in files} == set(PAPER_TASKS)
    for f in files:
        text = f.read_text()
        for name in re.findall(r"!function hooks\.(\w+)", text):
            assert callable(getattr(hooks, name, None)), f"{f.name} names hooks.{name}, which does not exist"
        assert "!function" in text and not re.search(r"!function (?!hooks\.)", text)


STOCK_FILES = {
    "chartqa_dmo": "chartqa/chartqa.yaml",
    "pope_dmo": "pope/pope.yaml",
    "mmstar_dmo": "mmstar/mmstar.yaml",
    "cv_bench_2d_dmo": "cv_bench/cv_bench_2d.yaml",
}


def _stock_tasks() -> Path:
    """Stock lmms-eval's task folder; tests that need lmms-eval (the "eval" extra) are skipped without it."""
    lmms_eval = pytest.importorskip("lmms_eval")
    return Path(lmms_eval.__file__).parent / "tasks"


def _stock(task: str) -> dict[str, Any]:
    folder = _stock_tasks()
    from lmms_eval.utils import load_yaml_config

    return load_yaml_config(str(folder / STOCK_FILES[task]), mode="simple")


@pytest.mark.parametrize("task", sorted(PAPER_TASKS))
def test_task_uses_the_stock_data_prompt_and_metrics(task: str) -> None:
    ours, stock = _yaml(TASK_DIR / f"{task}.yaml"), _stock(task)
    assert stock["task"] == PAPER_TASKS[task]
    for key in ("dataset_path", "dataset_name", "test_split", "output_type", "doc_to_target"):
        assert ours.get(key) == stock.get(key), key
    assert ours["lmms_eval_specific_kwargs"]["default"] == stock["lmms_eval_specific_kwargs"]["default"]
    assert ours.get("generation_kwargs") == stock.get("generation_kwargs")
    stock_metrics = {m["metric"] for m in stock["metric_list"]}
    our_metrics = {m["metric"] for m in ours["metric_list"]}
    assert stock_metrics <= our_metrics  # every strict metric stock reports, and the paper's lenient ones besides
    assert {m for m in our_metrics - stock_metrics if not re.search(r"_soft(er)?$", m)} <= {"count_acc"}


def test_task_names_are_not_built_in() -> None:
    # lmms-eval lets built-in names win over included ones: a clash would silently run the stock task.
    built_in = set()
    for path in _stock_tasks().rglob("*.yaml"):
        built_in.update(re.findall(r"^(?:task|group):\s*\"?([^\"\s]+)", path.read_text(errors="replace"), re.M))
    assert len(built_in) > 500 and not built_in & set(PAPER_TASKS)


def test_task_manager_finds_the_tasks_without_the_built_in_index() -> None:
    _stock_tasks()
    from dmo.scoring.evaluate import task_manager_for

    manager = task_manager_for(["chartqa_dmo", "pope_dmo/f1", "mmstar_dmo/math", "cv_bench_2d_dmo"], None)
    assert set(PAPER_TASKS) <= set(manager.all_tasks)
    assert "gqa" not in manager.all_tasks  # found in dmo's folder alone: lmms-eval's 2,000 tasks were not indexed


# -- End to end through lmms-eval, on local rows in each dataset's columns --------------------------------------


def _image(colour: str) -> Image.Image:
    return Image.new("RGB", (4, 4), colour)


# Per task: rows in the Hub dataset's columns, a scripted answer per row, and what lmms-eval must report.
CHARTQA_ROWS = [
    {"type": "human_test", "question": "Is the bar blue?", "answer": "Yes", "image": _image("blue")},
    {"type": "human_test", "question": "Value of 2019?", "answer": "12", "image": _image("red")},
    {"type": "augmented_test", "question": "Share of A?", "answer": "45%", "image": _image("green")},
    {"type": "augmented_test", "question": "Which city?", "answer": "Paris", "image": _image("white")},
]
CHARTQA_ANSWERS = ["Yes.", "12.3", "0.45.", "London."]
CHARTQA_EXPECTED = {
    "relaxed_overall": 1 / 4,
    "relaxed_overall_soft": 3 / 4,
    "relaxed_human_split": 1 / 2,
    "relaxed_human_split_soft": 1.0,
    "relaxed_augmented_split": 0.0,
    "relaxed_augmented_split_soft": 1 / 2,
}


def _pope_row(i: int, answer: str) -> dict[str, Any]:
    return {
        "id": str(i),
        "question_id": str(100 + i),
        "question": f" Is there a dog in image {i}? ",
        "answer": answer,
        "image_source": f"COCO_val2014_{i:012d}",
        "image": _image("black"),
        "category": "adversarial",
    }


POPE_ROWS = [_pope_row(i, a) for i, a in enumerate(["yes", "no", "yes", "no", "yes", "no"])]
POPE_ANSWERS = ["Yes.", "no", "yes", "Yes, there is.", "no", "yes"]
POPE_EXPECTED = {
    "pope_accuracy": 2 / 6,
    "pope_accuracy_soft": 3 / 6,
    "pope_precision": 1 / 2,
    "pope_recall": 1 / 2,
    "pope_f1_score": 1 / 2,
    "pope_yes_ratio": 1 / 2,
}


def _mmstar_row(index: int, category: str, l2_category: str, answer: str) -> dict[str, Any]:
    question = f"Question {index}?\nOptions: A: one, B: two, C: three, D: four"
    meta = {"source": "MathVista", "split": "testmini", "image_path": f"images/{index}.jpg"}
    return {
        "index": index,
        "question": question,
        "image": _image("gray"),
        "answer": answer,
        "category": category,
        "l2_category": l2_category,
        "meta_info": meta,
    }


MMSTAR_ROWS = [
    _mmstar_row(0, "coarse perception", "image emotion", "B"),
    _mmstar_row(1, "coarse perception", "image emotion", "C"),
    _mmstar_row(2, "math", "geometry", "D"),
    _mmstar_row(3, "math", "statistical reasoning", "A"),
]
MMSTAR_ANSWERS = ["Answer: B", "C", "(D) 12 cm", "Answer: B"]
MMSTAR_EXPECTED = {
    # strict: image emotion 1/2, geometry 1, statistical reasoning 1 (the "A" of "Answer"); averaged by l2 category
    "average": (1 / 2 + 1 + 1) / 3,
    "average_soft": (1 + 1 + 0) / 3,
    "coarse perception": 1 / 2,
    "coarse perception_soft": 1.0,
    "math": 1.0,
    "math_soft": 1 / 2,
}


def _cv_row(idx: int, task: str, choices: list[str], answer: str) -> dict[str, Any]:
    listed = " ".join(f"({chr(65 + i)}) {c}" for i, c in enumerate(choices))
    question = "How many chairs are in the image?" if task == "Count" else "Is the cup left or right of the lamp?"
    return {
        "idx": idx,
        "type": "2D",
        "task": task,
        "image": _image("yellow"),
        "question": question,
        "choices": choices,
        "answer": answer,
        "prompt": f"{question} Select from the following choices.\n{listed}",
        "filename": f"img/2D/{task.lower()}/ade20k_{idx}.png",
        "source": "ADE20K",
        "source_dataset": "ADE20K Validation Set",
        "source_filename": f"ADE_val_{idx:08d}.jpg",
        "target_class": "chair" if task == "Count" else None,
        "target_size": None,
        "bbox": None,
    }


CV_ROWS = [
    _cv_row(0, "Count", ["3", "2", "1", "0"], "(A)"),
    _cv_row(1, "Count", ["0", "5", "4", "2"], "(C)"),
    _cv_row(2, "Count", ["1", "2", "3", "4", "5"], "(B)"),
    _cv_row(3, "Relation", ["left", "right"], "(B)"),
]
CV_ANSWERS = ["3", "Answer: (C)", "Answer: 2", "(B) right"]
CV_EXPECTED = {
    "count_acc": 0.0,
    "count_acc_soft": 1 / 3,
    "count_acc_softer": 2 / 3,
    "cv_bench_acc": 1 / 4,
    "cv_bench_acc_soft": 2 / 4,
    "cv_bench_acc_softer": 3 / 4,
}

CASES: dict[str, tuple[list[dict[str, Any]], list[str], dict[str, float]]] = {
    "chartqa_dmo": (CHARTQA_ROWS, CHARTQA_ANSWERS, CHARTQA_EXPECTED),
    "pope_dmo": (POPE_ROWS, POPE_ANSWERS, POPE_EXPECTED),
    "mmstar_dmo": (MMSTAR_ROWS, MMSTAR_ANSWERS, MMSTAR_EXPECTED),
    "cv_bench_2d_dmo": (CV_ROWS, CV_ANSWERS, CV_EXPECTED),
}


def scripted_lmm() -> Any:
    """An lmms-eval model that answers each document from CASES, after building its visual and keeping its prompt."""
    from lmms_eval.api.model import lmms

    class ScriptedLMM(lmms):
        def __init__(self) -> None:
            super().__init__()
            self.prompts: dict[tuple[str, int], str] = {}
            self.max_new_tokens: dict[str, Any] = {}

        def generate_until(self, requests: Sequence[Any]) -> list[str]:
            out = []
            for request in requests:
                context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
                visuals = doc_to_visual(self.task_dict[task][split][doc_id])
                assert len(visuals) == 1 and isinstance(visuals[0], Image.Image) and visuals[0].mode == "RGB"
                self.prompts[task, doc_id] = context
                self.max_new_tokens[task] = gen_kwargs.get("max_new_tokens")
                out.append(CASES[task][1][doc_id])
            return out

        def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
            raise AssertionError("the paper tasks only generate")

        def generate_until_multi_round(self, requests: Sequence[Any]) -> list[str]:
            raise AssertionError("the paper tasks only generate")

    return ScriptedLMM()


@pytest.fixture(scope="module")
def local_tasks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The shipped task files, each included by a test file that points it at local parquet rows."""
    _stock_tasks()
    import datasets

    root = tmp_path_factory.mktemp("paper_tasks")
    folder = root / "tasks"
    folder.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        # Nothing below may reach the Hub: a shipped dataset_path left in place would fail here, not download.
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
        for task, (rows, _, _) in CASES.items():
            data = root / f"{task}.parquet"
            table = datasets.Dataset.from_list(rows)
            table = table.cast_column("image", datasets.Image())
            table.to_parquet(str(data))
            override = {
                "include": str(TASK_DIR / f"{task}.yaml"),
                "dataset_path": "parquet",
                "dataset_name": None,
                "dataset_kwargs": {"data_files": {_yaml(TASK_DIR / f"{task}.yaml")["test_split"]: str(data)}},
            }
            override["dataset_kwargs"]["cache_dir"] = str(root / "hf_cache")
            (folder / f"{task}.yaml").write_text(yaml.safe_dump(override))
        yield folder


def test_each_task_scores_through_simple_evaluate(local_tasks: Path) -> None:
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from dmo.scoring.metrics import score_from_results

    manager = TaskManager("ERROR", include_path=str(local_tasks), include_defaults=False)
    lmm = scripted_lmm()
    results = simple_evaluate(
        model=lmm, tasks=list(CASES), task_manager=manager, bootstrap_iters=0, log_samples=False, verbosity="ERROR"
    )
    for task, (rows, _, expected) in CASES.items():
        table = results["results"][task]
        for metric, value in expected.items():
            assert table[f"{metric},none"] == pytest.approx(value), (task, metric)
        assert len(lmm.prompts) >= len(rows)
    # the score dmo reads is the paper's lenient one
    assert score_from_results("chartqa_dmo", results) == pytest.approx(3 / 4)
    assert score_from_results("pope_dmo", results) == pytest.approx(1 / 2)
    assert score_from_results("mmstar_dmo", results) == pytest.approx(2 / 3)
    assert score_from_results("cv_bench_2d_dmo", results) == pytest.approx(2 / 3)
    # prompts and generation lengths as in the paper's (and stock) task files
    assert lmm.prompts["chartqa_dmo", 0] == "Is the bar blue?\nAnswer the question with a single word."
    assert (
        lmm.prompts["pope_dmo", 0] == "Is there a dog in image 0?\nAnswer the question using a single word or phrase."
    )
    assert lmm.prompts["mmstar_dmo", 2].endswith(
        "D: four\nAnswer with the option's letter from the given choices directly"
    )
    note = "Note: You only need to respond with A, B, C, D, E without providing any additional information.\n\n"
    assert lmm.prompts["cv_bench_2d_dmo", 2] == note + CV_ROWS[2]["prompt"]
    assert lmm.max_new_tokens == {"chartqa_dmo": 16, "pope_dmo": 128, "mmstar_dmo": None, "cv_bench_2d_dmo": 1024}


def test_dmo_evaluate_scores_the_tasks_and_their_sub_scores_in_one_run(local_tasks: Path) -> None:
    from dmo.scoring.evaluate import evaluate

    lmm = scripted_lmm()
    benchmarks = [*CASES, "pope_dmo/f1", "mmstar_dmo/math", "mmstar_dmo/coarse_perc", "cv_bench_2d_dmo/avg"]
    # local_tasks holds the same task names as dmo's own folder, and wins: the caller's folder comes first
    scores = evaluate(lmm, benchmarks, local_tasks)
    assert scores == pytest.approx(
        {
            "chartqa_dmo": 3 / 4,
            "pope_dmo": 1 / 2,
            "mmstar_dmo": 2 / 3,
            "cv_bench_2d_dmo": 2 / 3,
            "pope_dmo/f1": 1 / 2,
            "mmstar_dmo/math": 1.0,
            "mmstar_dmo/coarse_perc": 1 / 2,
            "cv_bench_2d_dmo/avg": 3 / 4,
        }
    )
    assert sum(1 for task, _ in lmm.prompts if task == "pope_dmo") == len(POPE_ROWS)  # one run, not one per score
