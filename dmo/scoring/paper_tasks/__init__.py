"""lmms-eval tasks that score the DMO paper's four lenient benchmarks on a stock lmms-eval.

The paper (mLLMs_merging_4_DMO) scores ChartQA, POPE, MMStar and CV-Bench 2D with metrics that exist only in its own
lmms-eval fork (``relaxed_overall_soft``, ``pope_accuracy_soft``, ``average_soft``, ``count_acc_softer``). The task
files in this folder define them for a stock lmms-eval, on the stock tasks' datasets, under names of their own:
lmms-eval lets its built-in task names win over included ones, so a task named ``chartqa`` here would never run.

This folder is on lmms-eval's include path in every dmo evaluation (dmo.scoring.evaluate); from lmms-eval's own
command line, pass ``--include_path`` with :data:`TASK_DIR`. The matching rules are in :mod:`.rules`, the lmms-eval
hooks in :mod:`.hooks`.
"""

from __future__ import annotations

from pathlib import Path

#: The folder to give lmms-eval as an include path.
__all__ = ["PAPER_TASKS", "TASK_DIR"]

TASK_DIR: Path = Path(__file__).resolve().parent

#: dmo's task -> the benchmark of the paper (and stock lmms-eval task, same data) that it scores.
PAPER_TASKS: dict[str, str] = {
    "chartqa_dmo": "chartqa",
    "pope_dmo": "pope",
    "mmstar_dmo": "mmstar",
    "cv_bench_2d_dmo": "cv_bench_2d",
}
