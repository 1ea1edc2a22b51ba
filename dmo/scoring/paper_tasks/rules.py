"""The answer-matching rules of the DMO paper's benchmarks, strict and lenient, as pure functions.

The paper (mLLMs_merging_4_DMO) scores ChartQA, POPE, MMStar and CV-Bench 2D with lenient variants of lmms-eval's
matching (its ``_soft``/``_softer`` metrics). These functions reproduce those rules exactly, quirks included, so
that a score computed here is the number the paper's scripts would report for the same answers: where a rule looks
odd (a case-sensitive "Answer:", a choice compared before stripping), it is the paper's behaviour, kept on purpose
and pinned by tests/test_paper_tasks.py. The one departure: the paper's POPE rule raises on an answer made of
whitespace only; here such an answer is wrong, like an empty one.

Nothing here imports lmms-eval; hooks.py wires these rules into lmms-eval's task hooks.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

# -- ChartQA -------------------------------------------------------------------------------------------------------

#: ChartQA's tolerance for numeric answers (Methani et al., 2020): within 5 % of the reference.
MAX_RELATIVE_CHANGE = 0.05


def _chartqa_number(text: str) -> float | None:
    """``text`` as a number, a percentage as a fraction ("12%" -> 0.12); None if it is not one."""
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_match(prediction: str, target: str, max_relative_change: float = MAX_RELATIVE_CHANGE) -> bool:
    """ChartQA's relaxed accuracy: a number within 5 % of a non-zero numeric target, else equal ignoring case.

    A target of 0 (or one that is not a number) needs the same text: a relative error to 0 is undefined.
    """
    predicted, expected = _chartqa_number(prediction), _chartqa_number(target)
    if predicted is not None and expected:
        return abs(predicted - expected) / abs(expected) <= max_relative_change
    return prediction.lower() == target.lower()


def relaxed_match_soft(prediction: str, target: str) -> bool:
    """The paper's ``relaxed_*_soft``: trailing full stops are dropped first ("Yes." counts as "Yes")."""
    return relaxed_match(prediction.rstrip("."), target)


# -- POPE ----------------------------------------------------------------------------------------------------------

POPE_ANSWERS = ("yes", "no")


def pope_answer(answer: str) -> str:
    """A POPE reference answer, normalised; anything but yes/no is a broken document, not a wrong answer."""
    normalised = answer.lower().strip()
    if normalised not in POPE_ANSWERS:
        raise ValueError(f"POPE reference answer must be yes or no, got {answer!r}")
    return normalised


def pope_prediction(response: str) -> str:
    """POPE's strict reading of a response: the whole response, lower-cased and stripped."""
    return response.lower().strip()


def pope_prediction_soft(response: str) -> str:
    """The paper's ``pope_accuracy_soft`` reading: the first word, lower-cased, without trailing ".", ":" or ","."""
    words = response.lower().split()
    return words[0].rstrip(".:,") if words else ""


# -- MMStar --------------------------------------------------------------------------------------------------------

#: MMStar's answer forms (from the MMStar authors' matcher): the letter leads the answer, or follows one of these.
_MMSTAR_LEADS = ("(", "option ", "the answer is ")


def _mmstar_normalise(text: str) -> str:
    return text.lower().replace("\n", " ").strip()


def _mmstar_letter_matches(prediction: str, answer: str) -> bool:
    # Only the leading character is compared: "a cat" matches answer A. That is MMStar's own rule, kept as is.
    if not prediction:
        return False
    if prediction[0] == answer:
        return True
    for lead in _MMSTAR_LEADS:
        if prediction.startswith(lead) and len(prediction) > len(lead) and prediction[len(lead)] == answer:
            return True
    return False


def mmstar_match(prediction: str, answer: str) -> bool:
    """MMStar's strict matching, as in the paper's fork (the MMStar authors' rule)."""
    return _mmstar_letter_matches(_mmstar_normalise(prediction), _mmstar_normalise(answer))


def mmstar_match_soft(prediction: str, answer: str) -> bool:
    """The paper's ``*_soft`` MMStar matching: every "answer:" (any case) is removed first ("Answer: A" is A)."""
    cleaned = prediction.lower().replace("\n", " ").replace("answer:", "").strip()
    return _mmstar_letter_matches(cleaned, _mmstar_normalise(answer))


def mmstar_average(results: Sequence[Mapping[str, Any]]) -> float:
    """MMStar's aggregate: the mean over fine-grained categories (``l2_category``) of each category's mean score."""
    by_category: dict[str, list[float]] = defaultdict(list)
    for result in results:
        by_category[result["l2_category"]].append(float(result["score"]))
    if not by_category:
        return 0.0
    return sum(sum(scores) / len(scores) for scores in by_category.values()) / len(by_category)


# -- CV-Bench ------------------------------------------------------------------------------------------------------

# IGNORECASE with [a-z], as in lmms-eval's CV-Bench matcher, so that the same (Unicode case-folded) letters count.
_LEADING_LETTER = re.compile(r"[(\s]*([a-z])", flags=re.IGNORECASE)


def cv_bench_answer(answer: str) -> str:
    """The reference letter of a CV-Bench document ("(B)" -> "B")."""
    return answer.strip("()")


def cv_bench_letter(response: str) -> str:
    """CV-Bench's strict reading: the first letter after any leading "(" or spaces, upper-cased; "" if none.

    Only the leading character counts, so "Answer: B" reads as "A" and "3" reads as nothing.
    """
    found = _LEADING_LETTER.match(response.strip())
    return found.group(1).upper() if found else ""


def cv_bench_soft_response(response: str) -> str:
    """The paper's ``_soft`` clean-up: every "Answer:" removed (case-sensitive, anywhere), nothing else."""
    return response.replace("Answer:", "")


def cv_bench_letter_soft(response: str) -> str:
    """The paper's ``_soft`` reading: the strict reading of the response without "Answer:" ("Answer: B" -> "B")."""
    return cv_bench_letter(cv_bench_soft_response(response))


def cv_bench_letter_softer(response: str, choices: Sequence[str]) -> str:
    """The paper's ``_softer`` reading: a response that *is* one of the choices ("3") stands for that choice's letter.

    The comparison is with the "Answer:"-free response as it stands, neither stripped nor case-folded, as in the
    paper: "Answer: 3" leaves " 3", which is no choice, and falls back to the ``_soft`` reading. The first equal
    choice wins if two are equal.
    """
    cleaned = cv_bench_soft_response(response)
    choices = list(choices)
    if cleaned in choices:
        return chr(ord("A") + choices.index(cleaned))
    return cv_bench_letter(cleaned)


def cv_bench_accuracy(results: Sequence[Mapping[str, Any]], task: str | None = None) -> float:
    """The share of correct answers, over all results or over those of one CV-Bench ``task`` (e.g. "Count").

    0.0 when there is nothing to count, as in the paper (a 2D run without counting questions reports 0).
    """
    picked = [r for r in results if task is None or r["task"] == task]
    return sum(1 for r in picked if r["is_correct"]) / len(picked) if picked else 0.0
