"""The benchmark -> score map (dmo/scoring/metrics.yaml) on fabricated lmms-eval results: no model, no lmms-eval run."""

from __future__ import annotations

import math

import pytest

from dmo.errors import DmoError
from dmo.scoring.metrics import load_metric_map, metric_spec, parse_metric_map, score_from_results


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
