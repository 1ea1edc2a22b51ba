"""The benchmark -> score map (dmo/scoring/metrics.yaml) on fabricated lmms-eval results: no model, no lmms-eval run."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest

from dmo.errors import DmoError
from dmo.scoring.metrics import load_metric_map, metric_spec, parse_metric_map, score_from_results, task_of


def _results(task: str, **metrics: float) -> dict:
    """The shape simple_evaluate returns: results -> task -> "<metric>,<filter>" (plus stderr and alias noise)."""
    row = {"alias": task, **{f"{k},none": v for k, v in metrics.items()}}
    row.update({f"{k}_stderr,none": "N/A" for k in metrics})
    return {"results": {task: row}, "configs": {}, "versions": {}}


# benchmark, the metric lmms-eval reports, its value, the expected score.
PAPER = [
    ("gqa", "exact_match", 0.61, 0.61),
    ("vqav2_val_lite", "exact_match", 0.75, 0.75),
    ("vizwiz_vqa_val", "exact_match", 0.42, 0.42),
    ("ok_vqa_val2014", "exact_match", 0.5, 0.5),
    ("textvqa_val", "exact_match", 0.66, 0.66),
    ("docvqa_val", "anls", 0.81, 0.81),
    ("infovqa_val", "anls", 0.37, 0.37),
    ("chartqa", "relaxed_overall_soft", 0.7, 0.7),
    ("ocrbench", "ocrbench_accuracy", 0.598, 0.598),
    ("cv_bench_2d", "count_acc_softer", 0.55, 0.55),
    ("pope", "pope_accuracy_soft", 0.88, 0.88),
    ("mmstar", "average_soft", 0.45, 0.45),
    ("vmcbench", "average", 0.63, 0.63),
    ("chartqa_dmo", "relaxed_overall_soft", 0.7, 0.7),
    ("cv_bench_2d_dmo", "count_acc_softer", 0.55, 0.55),
    ("pope_dmo", "pope_accuracy_soft", 0.88, 0.88),
    ("mmstar_dmo", "average_soft", 0.45, 0.45),
    ("dmo_tiny_ocr", "exact_match", 0.25, 0.25),
    ("dmo_tiny", "exact_match", 1.0, 1.0),
]


@pytest.mark.parametrize(("benchmark", "metric", "value", "expected"), PAPER)
def test_paper_benchmarks_read_their_metric(benchmark: str, metric: str, value: float, expected: float) -> None:
    results = _results(benchmark, **{metric: value, "some_other_metric": 0.123})
    assert score_from_results(benchmark, results) == pytest.approx(expected)


def test_mme_sums_cognition_and_perception_over_their_maximum() -> None:
    results = _results("mme", mme_cognition_score=300.0, mme_perception_score=1400.0)
    assert score_from_results("mme", results) == pytest.approx((300 + 1400) / 2800)
    full = _results("mme", mme_cognition_score=800.0, mme_perception_score=2000.0)
    assert score_from_results("mme", full) == 1.0


def test_bare_task_table_and_group_section_are_accepted() -> None:
    assert score_from_results("gqa", {"gqa": {"exact_match,none": 0.5}}) == 0.5
    grouped = {"results": {}, "groups": {"dmo_tiny": {"exact_match,none": 0.25}}}
    assert score_from_results("dmo_tiny", grouped) == 0.25


def test_unknown_benchmark_says_how_to_add_it() -> None:
    with pytest.raises(DmoError) as err:
        score_from_results("mmmu_val", _results("mmmu_val", mmmu_acc=0.3))
    message = str(err.value)
    assert "mmmu_val" in message and "metrics.yaml" in message and "\n" not in message


def test_missing_metric_lists_what_lmms_eval_reported() -> None:
    with pytest.raises(DmoError, match=r"no 'exact_match,none'.*relaxed_overall"):
        score_from_results("gqa", _results("gqa", relaxed_overall=0.5))


def test_benchmark_absent_from_results() -> None:
    with pytest.raises(DmoError, match="no entry for benchmark 'pope'"):
        score_from_results("pope", _results("gqa", exact_match=0.5))


@pytest.mark.parametrize("bad", ["N/A", None, math.nan, True])
def test_non_numeric_metric_value_is_refused(bad: object) -> None:
    with pytest.raises(DmoError, match="not a finite number"):
        score_from_results("gqa", {"results": {"gqa": {"exact_match,none": bad}}})


def test_score_outside_unit_interval_asks_for_divide_by() -> None:
    # e.g. a benchmark reported in percent
    with pytest.raises(DmoError, match="divide_by"):
        score_from_results("gqa", _results("gqa", exact_match=61.0))


def test_custom_map_with_filter_and_glob() -> None:
    table = parse_metric_map({"my_*": {"metric": "acc", "filter": "flexible", "divide_by": 100}})
    assert score_from_results("my_bench", {"results": {"my_bench": {"acc,flexible": 40}}}, table) == 0.4
    # exact names win over patterns
    table = parse_metric_map({"my_*": {"metric": "acc"}, "my_bench": {"metric": "f1"}})
    assert metric_spec("my_bench", table).keys == ("f1",)


@pytest.mark.parametrize(
    "raw",
    [
        {"b": "exact_match"},
        {"b": {"metric": []}},
        {"b": {"metric": "acc", "divide_by": 0}},
        {"b": {"metric": "acc", "scale": 2}},
        {"b": {"metric": "acc", "filter": ""}},
    ],
)
def test_malformed_map_entries_are_refused(raw: dict) -> None:
    with pytest.raises(DmoError):
        parse_metric_map(raw)


def test_packaged_map_loads_and_covers_the_paper(tmp_path) -> None:
    table = load_metric_map()
    for benchmark, *_ in PAPER:
        metric_spec(benchmark, table)
    assert metric_spec("mme", table).divide_by == 2800
    own = tmp_path / "m.yaml"
    own.write_text("foo: {metric: bar}\n")
    assert load_metric_map(own)["foo"].keys == ("bar",)
    own.write_text("foo: [unclosed\n")
    with pytest.raises(DmoError, match="not valid YAML"):
        load_metric_map(own)


# -- Every benchmark the DMO paper's scripts score, on results shaped like that task's lmms-eval 0.7 output ---------


def _real(task: str, filters: str = "none", **metrics: float) -> dict:
    """simple_evaluate's shape in lmms-eval 0.7: per metric its value and three stderr keys (N/A without bootstrap)."""
    row: dict[str, Any] = {"alias": task}
    for metric, value in metrics.items():
        row[f"{metric},{filters}"] = value
        for stderr in ("stderr", "stderr_clt", "stderr_clustered"):
            row[f"{metric}_{stderr},{filters}"] = "N/A"
    return {"results": {task: row}, "group_subtasks": {task: []}, "configs": {task: {}}, "versions": {task: 1.0}}


MMSTAR_CATEGORIES = {
    "coarse perception": 0.7,
    "fine-grained perception": 0.4,
    "instance reasoning": 0.6,
    "logical reasoning": 0.35,
    "science & technology": 0.3,
    "math": 0.25,
}
MMSTAR = {**MMSTAR_CATEGORIES, "average": 0.43}
MMSTAR_DMO = {**MMSTAR, **{f"{k}_soft": v + 0.05 for k, v in MMSTAR.items()}}
POPE = {"pope_accuracy": 0.84, "pope_precision": 0.9, "pope_recall": 0.76, "pope_f1_score": 0.82, "pope_yes_ratio": 0.5}
CV_2D_DMO = {
    "cv_bench_acc": 0.5,
    "count_acc": 0.3,
    "cv_bench_acc_soft": 0.55,
    "count_acc_soft": 0.4,
    "cv_bench_acc_softer": 0.6,
    "count_acc_softer": 0.52,
}
VMCBENCH = {"general": 0.7, "reason": 0.5, "doc": 0.66, "ocr": 0.8, "average": 0.64}
REFCOCO = {f"refcoco_{m}": v for m, v in [("IoU", 0.55), ("ACC@0.1", 0.9), ("ACC@0.5", 0.62), ("Center_ACC", 0.7)]}
SEED = {"seed_image": 0.71, "seed_video": 0.4, "seed_all": 0.66}
CHART_DMO = {"relaxed_overall": 0.6, "relaxed_human_split": 0.5, "relaxed_augmented_split": 0.7}
CHART_DMO |= {f"{k}_soft": v + 0.05 for k, v in CHART_DMO.items()}

# benchmark (the name in a space), lmms-eval task, its results, the filter they are under, the expected score.
PAPER_SCRIPTS = [
    # the 14 benchmarks of print_results.py, on stock tasks and dmo's paper tasks
    ("gqa", "gqa", {"exact_match": 0.61}, "none", 0.61),
    ("vqav2_val_lite", "vqav2_val_lite", {"exact_match": 0.75}, "none", 0.75),
    ("vizwiz_vqa_val", "vizwiz_vqa_val", {"exact_match": 0.42}, "none", 0.42),
    ("ok_vqa_val2014", "ok_vqa_val2014", {"exact_match": 0.5, "submission": 0.0}, "none", 0.5),
    ("textvqa_val", "textvqa_val", {"exact_match": 0.66, "submission": 0.0}, "none", 0.66),
    ("ocrbench", "ocrbench", {"ocrbench_accuracy": 0.598}, "none", 0.598),
    ("docvqa_val", "docvqa_val", {"anls": 0.81}, "none", 0.81),
    ("infovqa_val", "infovqa_val", {"anls": 0.37}, "none", 0.37),
    ("cv_bench_2d_dmo", "cv_bench_2d_dmo", CV_2D_DMO, "none", 0.52),
    ("pope_dmo", "pope_dmo", {**POPE, "pope_accuracy_soft": 0.86}, "none", 0.86),
    ("chartqa_dmo", "chartqa_dmo", CHART_DMO, "none", 0.65),
    ("mme", "mme", {"mme_perception_score": 1450.5, "mme_cognition_score": 330.0}, "none", 1780.5 / 2800),
    ("vmcbench", "vmcbench", VMCBENCH, "none", 0.64),
    ("mmstar_dmo", "mmstar_dmo", MMSTAR_DMO, "none", 0.48),
    # eval_bench_utils.py's sub-scores ("<benchmark>-<sub>" there, "<task>/<sub>" in dmo)
    ("cv_bench_2d_dmo/count", "cv_bench_2d_dmo", CV_2D_DMO, "none", 0.52),
    ("cv_bench_2d_dmo/avg", "cv_bench_2d_dmo", CV_2D_DMO, "none", 0.6),
    ("pope_dmo/acc", "pope_dmo", POPE, "none", 0.84),
    ("pope_dmo/f1", "pope_dmo", POPE, "none", 0.82),
    ("pope_dmo/precision", "pope_dmo", POPE, "none", 0.9),
    ("pope_dmo/recall", "pope_dmo", POPE, "none", 0.76),
    ("mmstar_dmo/avg", "mmstar_dmo", MMSTAR_DMO, "none", 0.48),
    ("mmstar_dmo/coarse_perc", "mmstar_dmo", MMSTAR_DMO, "none", 0.7),
    ("mmstar_dmo/fine_perc", "mmstar_dmo", MMSTAR_DMO, "none", 0.4),
    ("mmstar_dmo/instance_reason", "mmstar_dmo", MMSTAR_DMO, "none", 0.6),
    ("mmstar_dmo/logical_reason", "mmstar_dmo", MMSTAR_DMO, "none", 0.35),
    ("mmstar_dmo/math", "mmstar_dmo", MMSTAR_DMO, "none", 0.25),
    ("mmstar_dmo/science_tech", "mmstar_dmo", MMSTAR_DMO, "none", 0.3),
    ("vmcbench/avg", "vmcbench", VMCBENCH, "none", 0.64),
    ("vmcbench/general", "vmcbench", VMCBENCH, "none", 0.7),
    ("vmcbench/reason", "vmcbench", VMCBENCH, "none", 0.5),
    ("vmcbench/doc", "vmcbench", VMCBENCH, "none", 0.66),
    ("vmcbench/ocr", "vmcbench", VMCBENCH, "none", 0.8),
    # eval_bench_utils.py's other benchmarks, and the stock variants its substring matching covers
    ("seedbench", "seedbench", SEED, "none", 0.66),
    ("seedbench_lite", "seedbench_lite", SEED, "none", 0.66),
    ("scienceqa", "scienceqa", {"exact_match": 0.72}, "none", 0.72),
    ("scienceqa_img", "scienceqa_img", {"exact_match": 0.68}, "none", 0.68),
    ("ai2d", "ai2d", {"exact_match": 0.7}, "flexible-extract", 0.7),
    ("ai2d_lite", "ai2d_lite", {"exact_match": 0.69}, "flexible-extract", 0.69),
    ("ai2d_no_mask", "ai2d_no_mask", {"exact_match": 0.71}, "flexible-extract", 0.71),
    ("mathvision_testmini", "mathvision_testmini", {"mathvision_standard_eval": 17.76}, "none", 0.1776),
    ("refcoco_bbox_rec_val", "refcoco_bbox_rec_val", REFCOCO, "none", 0.62),
    ("refcoco+_bbox_rec_testA", "refcoco+_bbox_rec_testA", REFCOCO, "none", 0.62),
    ("refcocog_bbox_rec_test", "refcocog_bbox_rec_test", REFCOCO, "none", 0.62),
    ("mme_lite", "mme_lite", {"mme_perception_score": 1200.0, "mme_cognition_score": 200.0}, "none", 0.5),
    ("gqa_lite", "gqa_lite", {"exact_match": 0.6}, "none", 0.6),
    ("vqav2_val", "vqav2_val", {"exact_match": 0.77}, "none", 0.77),
    ("vizwiz_vqa_val_lite", "vizwiz_vqa_val_lite", {"exact_match": 0.4}, "none", 0.4),
    ("ok_vqa_val2014_lite", "ok_vqa_val2014_lite", {"exact_match": 0.52, "submission": 0.0}, "none", 0.52),
    ("textvqa_val_lite", "textvqa_val_lite", {"exact_match": 0.64, "submission": 0.0}, "none", 0.64),
    ("docvqa_val_lite", "docvqa_val_lite", {"anls": 0.8}, "none", 0.8),
    ("infovqa_val_lite", "infovqa_val_lite", {"anls": 0.35}, "none", 0.35),
]


@pytest.mark.parametrize(("benchmark", "task", "metrics", "filters", "expected"), PAPER_SCRIPTS)
def test_paper_scripts_benchmarks_on_real_output(
    benchmark: str, task: str, metrics: dict[str, float], filters: str, expected: float
) -> None:
    assert task_of(benchmark) == task
    assert score_from_results(benchmark, _real(task, filters, **metrics)) == pytest.approx(expected)


def test_every_packaged_entry_is_tested_on_real_output() -> None:
    tested = {b for b, *_ in PAPER_SCRIPTS} | {b for b, *_ in PAPER}
    untested = [name for name in load_metric_map() if not any(c in name for c in "*?[") and name not in tested]
    assert untested == [], "add a result-shaped test for each metric-map entry"


def test_sub_scores_read_their_task_and_say_so_when_missing() -> None:
    results = _real("pope_dmo", pope_accuracy_soft=0.9)
    with pytest.raises(DmoError, match=r"'pope_dmo/f1' have no 'pope_f1_score,none' \(found \['pope_accuracy_soft"):
        score_from_results("pope_dmo/f1", results)
    with pytest.raises(DmoError, match="no entry for benchmark 'pope_dmo'"):
        score_from_results("pope_dmo/f1", _real("gqa", exact_match=0.5))
    assert task_of("gqa") == "gqa" and task_of("a/b/c") == "a"


@pytest.mark.parametrize("stock", ["chartqa", "pope", "mmstar", "cv_bench_2d"])
def test_stock_paper_benchmark_without_lenient_metric_names_dmos_task(stock: str) -> None:
    # what a stock lmms-eval 0.7 reports for these: no lenient key, so dmo points at its own task
    reported = {"chartqa": CHART_DMO, "pope": POPE, "mmstar": MMSTAR, "cv_bench_2d": {"cv_bench_acc": 0.5}}[stock]
    strict = {k: v for k, v in reported.items() if not k.endswith("_soft")}
    ours = f"{stock}_dmo"
    with pytest.raises(DmoError, match=f"name dmo's '{ours}' instead"):
        score_from_results(stock, _real(stock, **strict))


# -- The keys above are those the installed lmms-eval's task files really declare ----------------------------------

#: metric-map entries whose task is not a stock lmms-eval 0.7 task: the paper fork's names, a user's own mme_lite,
#: and dmo's own tasks (checked in tests/test_paper_tasks.py); glob entries are checked on these example tasks.
NOT_STOCK = {"dmo_tiny", "dmo_tiny_*", "chartqa", "pope", "mmstar", "cv_bench_2d", "mme_lite"}
GLOB_EXAMPLES = {"refcoco*_bbox_rec_*": ["refcoco_bbox_rec_val", "refcoco+_bbox_rec_testA", "refcocog_bbox_rec_test"]}


def _declared(task_file: Path) -> tuple[set[str], set[str]]:
    """The metric names and filter names a task file (with its includes) declares."""
    from lmms_eval.utils import load_yaml_config

    config = load_yaml_config(str(task_file), mode="simple")
    filters = {f["name"] for f in config.get("filter_list") or []} or {"none"}
    return {m["metric"] for m in config.get("metric_list") or []}, filters


def test_packaged_keys_are_declared_by_the_installed_tasks() -> None:
    lmms_eval = pytest.importorskip("lmms_eval")
    from dmo.scoring.paper_tasks import TASK_DIR

    files: dict[str, Path] = {}
    for folder in (Path(lmms_eval.__file__).parent / "tasks", TASK_DIR):
        for path in folder.rglob("*.yaml"):
            found = re.search(r"^task:\s*\"?([^\"\s]+)", path.read_text(errors="replace"), re.M)
            if found:
                files.setdefault(found.group(1), path)
    checked = 0
    for name, spec in load_metric_map().items():
        if name in NOT_STOCK:
            continue
        for task in GLOB_EXAMPLES.get(name, [task_of(name)]):
            assert name not in GLOB_EXAMPLES or metric_spec(task) == spec, f"{task} is not matched by {name}"
            assert task in files, f"{name}: no task {task!r} in the installed lmms-eval"
            metrics, filters = _declared(files[task])
            assert set(spec.keys) <= metrics and spec.filter in filters, (name, spec, metrics, filters)
            checked += 1
    assert checked >= 50  # not vacuous: the map has some 50 stock-task entries
