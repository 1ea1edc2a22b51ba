"""lmms-eval hooks (``!function hooks.<name>``) of dmo's paper tasks: prompts, per-answer results, aggregations.

lmms-eval loads this file by its path, as a top-level module, once per ``!function`` tag; so it imports the rest of
dmo absolutely and keeps no state. Prompts and per-document result keys are those of the DMO paper's lmms-eval fork
(which match stock lmms-eval's for these four tasks); the matching rules are in rules.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image

from dmo.scoring.paper_tasks import rules

Doc = Mapping[str, Any]
Kwargs = Mapping[str, Any] | None


def doc_to_visual(doc: Doc) -> list[Image.Image]:
    """The document's one image, as RGB (all four benchmarks keep it in an ``image`` column)."""
    return [doc["image"].convert("RGB")]


def _prompts(kwargs: Kwargs) -> tuple[str, str]:
    kwargs = kwargs or {}
    return kwargs.get("pre_prompt", ""), kwargs.get("post_prompt", "")


def _one_response(results: Sequence[str]) -> str:
    # lmms-eval passes one generation per document for generate_until tasks; None stands for no answer at all.
    return results[0] or ""


# -- ChartQA -------------------------------------------------------------------------------------------------------


def chartqa_doc_to_text(doc: Doc, lmms_eval_specific_kwargs: Kwargs = None) -> str:
    pre, post = _prompts(lmms_eval_specific_kwargs)
    return f"{pre}{doc['question']}{post}"


def chartqa_process_results(doc: Doc, results: Sequence[str]) -> dict[str, float]:
    """Strict and soft relaxed accuracy, overall and for the document's split (human or augmented questions)."""
    response = _one_response(results)
    strict = float(rules.relaxed_match(response, doc["answer"]))
    soft = float(rules.relaxed_match_soft(response, doc["answer"]))
    split = "relaxed_human_split" if doc["type"] == "human_test" else "relaxed_augmented_split"
    return {"relaxed_overall": strict, split: strict, "relaxed_overall_soft": soft, f"{split}_soft": soft}


# -- POPE ----------------------------------------------------------------------------------------------------------


def pope_doc_to_text(doc: Doc, lmms_eval_specific_kwargs: Kwargs = None) -> str:
    pre, post = _prompts(lmms_eval_specific_kwargs)
    return f"{pre}{doc['question'].strip()}{post}"


def pope_process_results(doc: Doc, results: Sequence[str]) -> dict[str, dict[str, Any]]:
    """One record per metric (the aggregations read prediction and truth); the soft one holds the soft reading."""
    response = _one_response(results)
    truth = rules.pope_answer(doc["answer"])
    strict = rules.pope_prediction(response)
    soft = rules.pope_prediction_soft(response)

    def record(prediction: str) -> dict[str, Any]:
        score = float(prediction == truth)
        return {"question_id": doc["question_id"], "score": score, "prediction": prediction, "ground_truth": truth}

    strict_record = record(strict)
    metrics = ("pope_accuracy", "pope_precision", "pope_recall", "pope_f1_score", "pope_yes_ratio")
    return {**{m: strict_record for m in metrics}, "pope_accuracy_soft": record(soft)}


def pope_accuracy(results: Sequence[Mapping[str, Any]]) -> float:
    return sum(r["score"] for r in results) / len(results) if results else 0.0


def _pope_counts(results: Sequence[Mapping[str, Any]]) -> tuple[int, int, int]:
    """True positives, false positives, false negatives; "yes" is positive, and an answer that is neither yes nor
    no is none of the three (as in lmms-eval's POPE)."""
    tp = sum(1 for r in results if r["ground_truth"] == "yes" and r["prediction"] == "yes")
    fp = sum(1 for r in results if r["ground_truth"] == "no" and r["prediction"] == "yes")
    fn = sum(1 for r in results if r["ground_truth"] == "yes" and r["prediction"] == "no")
    return tp, fp, fn


def pope_precision(results: Sequence[Mapping[str, Any]]) -> float:
    tp, fp, _ = _pope_counts(results)
    return tp / (tp + fp) if tp + fp else 0.0


def pope_recall(results: Sequence[Mapping[str, Any]]) -> float:
    tp, _, fn = _pope_counts(results)
    return tp / (tp + fn) if tp + fn else 0.0


def pope_f1_score(results: Sequence[Mapping[str, Any]]) -> float:
    precision, recall = pope_precision(results), pope_recall(results)
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def pope_yes_ratio(results: Sequence[Mapping[str, Any]]) -> float:
    """The share of "yes" among the *reference* answers (lmms-eval's definition), not among the predictions."""
    yes = sum(1 for r in results if r["ground_truth"] == "yes")
    no = sum(1 for r in results if r["ground_truth"] == "no")
    return yes / (yes + no) if yes + no else 0.0


# -- MMStar --------------------------------------------------------------------------------------------------------

#: Stripped from MMStar questions when a prompt is added, as lmms-eval does: the prompt asks for a letter instead.
_MMSTAR_YES_NO = " Please answer yes or no."


def mmstar_doc_to_text(doc: Doc, lmms_eval_specific_kwargs: Kwargs = None) -> str:
    pre, post = _prompts(lmms_eval_specific_kwargs)
    question = doc["question"].strip()
    if pre:
        question = pre + question.replace(_MMSTAR_YES_NO, "")
    if post:
        question = question.replace(_MMSTAR_YES_NO, "") + post
    return question


def mmstar_process_results(doc: Doc, results: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The document's category and the average, strict and soft; aggregations average by fine category."""
    response = _one_response(results)

    def record(score: bool) -> dict[str, Any]:
        return {"question_id": doc["index"], "l2_category": doc["l2_category"], "score": float(score)}

    strict = record(rules.mmstar_match(response, doc["answer"]))
    soft = record(rules.mmstar_match_soft(response, doc["answer"]))
    category = doc["category"]
    return {category: strict, "average": strict, f"{category}_soft": soft, "average_soft": soft}


def mmstar_aggregate(results: Sequence[Mapping[str, Any]]) -> float:
    return rules.mmstar_average(results)


# -- CV-Bench ------------------------------------------------------------------------------------------------------


def cv_bench_doc_to_text(doc: Doc, lmms_eval_specific_kwargs: Kwargs = None) -> str:
    """The pre-prompt names the choice letters ("A, B, C"), then the dataset's own prompt (question and choices)."""
    pre, _ = _prompts(lmms_eval_specific_kwargs)
    letters = ", ".join(chr(ord("A") + i) for i in range(len(doc["choices"])))
    return pre.format(letters) + "\n" + doc["prompt"]


def cv_bench_process_results(doc: Doc, results: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Strict, soft and softer readings; each record keeps the CV-Bench task so that counting can be scored alone."""
    response = _one_response(results)
    truth = rules.cv_bench_answer(doc["answer"])
    readings = {
        "": rules.cv_bench_letter(response),
        "_soft": rules.cv_bench_letter_soft(response),
        "_softer": rules.cv_bench_letter_softer(response, doc["choices"]),
    }
    out: dict[str, dict[str, Any]] = {}
    for suffix, letter in readings.items():
        record = {"id": doc["idx"], "task": doc["task"], "source": doc["source"], "pred_parsed": letter}
        record.update(gt_content=truth, is_correct=letter == truth)
        out[f"cv_bench_acc{suffix}"] = record
        out[f"count_acc{suffix}"] = record
    return out


def cv_bench_accuracy(results: Sequence[Mapping[str, Any]]) -> float:
    return rules.cv_bench_accuracy(results)


def cv_bench_count_accuracy(results: Sequence[Mapping[str, Any]]) -> float:
    """Accuracy on the counting questions only: the paper's CV-Bench 2D score."""
    return rules.cv_bench_accuracy(results, task="Count")
