"""Score one proxy on several benchmarks with a single lmms-eval run.

One ``simple_evaluate`` call per proxy: lmms-eval's fixed costs (task loading, dataset opening, request
building) are paid once per proxy rather than once per benchmark, and the proxy's delta is written into the
live model once per request type rather than once per benchmark.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmo.errors import DmoError
from dmo.scoring.metrics import MetricSpec, metric_spec, score_from_results, task_of
from dmo.scoring.paper_tasks import TASK_DIR as PAPER_TASK_DIR

#: dataset builders whose ``data_files`` are local paths (lmms-eval's list, ``lmms_eval.utils._LOCAL_BUILDERS``).
_LOCAL_BUILDERS = frozenset({"csv", "json", "parquet", "text", "pandas", "arrow"})


#: lmms-eval task folders: one, several (earlier ones win), or none.
IncludePath = Path | Sequence[Path] | None


def evaluate(
    lmm: Any,
    benchmarks: Sequence[str],
    include_path: IncludePath,
    limit: int | None = None,
    *,
    metric_map: Mapping[str, MetricSpec] | None = None,
) -> dict[str, float]:
    """Evaluate ``lmm`` (an lmms-eval model object) on ``benchmarks``; returns ``{benchmark: score in [0, 1]}``.

    ``include_path`` is a folder of extra task YAMLs (e.g. from :func:`dmo.scoring.tasks.write_tiny_tasks`), or a
    list of such folders (a space's ``scoring: {tasks: [...]}``; earlier folders win).
    lmms-eval's ~2,000 built-in tasks are indexed only when a benchmark is not found there, which saves a few
    seconds per call. ``limit`` caps the documents per task (the first ``limit``), for tests and smoke runs.
    Every benchmark is checked (known to lmms-eval, has a score metric, local data present) before anything
    is evaluated.
    """
    benchmarks = list(benchmarks)
    if not benchmarks:
        raise DmoError("no benchmarks given: name at least one lmms-eval task to evaluate")
    duplicates = sorted({b for b in benchmarks if benchmarks.count(b) > 1})
    if duplicates:
        raise DmoError(f"benchmark(s) listed twice: {duplicates}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DmoError(f"limit must be a positive whole number of documents per task, got {limit!r}")
    for benchmark in benchmarks:
        metric_spec(benchmark, metric_map)  # fail before the (slow) evaluation, not after it

    tasks = list(dict.fromkeys(task_of(b) for b in benchmarks))  # sub-scores ("pope_dmo/f1") share one run
    task_manager = task_manager_for(tasks, include_path)  # quiet by itself, and not nestable in _quiet_lmms_eval
    with _quiet_lmms_eval():
        _check_local_data(task_manager, tasks)
        results = _simple_evaluate(lmm, tasks, task_manager, limit)
    if results is None:  # lmms-eval returns None on ranks other than 0; dmo runs one process
        raise DmoError("lmms-eval returned no results: run dmo's evaluation in a single process")
    return {b: score_from_results(b, results, metric_map) for b in benchmarks}


def include_paths(include_path: IncludePath) -> list[Path]:
    """``include_path`` as a list of folders, each checked to exist."""
    if include_path is None:
        return []
    folders = [Path(include_path)] if isinstance(include_path, (str, os.PathLike)) else [Path(p) for p in include_path]
    for folder in folders:
        if not folder.is_dir():
            raise DmoError(
                f"task folder {folder} does not exist: write your lmms-eval task YAMLs there, or fix the path "
                "(a space's scoring.tasks are relative to the space file)"
            )
    return folders


def check_benchmarks(
    benchmarks: Sequence[str], metric_map: Mapping[str, MetricSpec] | None, include_path: IncludePath, loss: Any
) -> None:
    """Refuse, before a study opens, what no backend can score: a validation split missing for a ``loss:``
    benchmark (``loss`` is the backend's :class:`~dmo.scoring.loss.ValidationLoss`), a benchmark with no metric in
    the map, or a task lmms-eval does not know."""
    from dmo.scoring.loss import split_benchmarks
    from dmo.scoring.metrics import metric_spec

    tasks, _ = split_benchmarks(benchmarks)
    loss.check(benchmarks)
    for b in tasks:
        metric_spec(b, metric_map)
    if tasks:
        task_manager_for(tasks, include_path)


def task_manager_for(benchmarks: Sequence[str], include_path: IncludePath) -> Any:
    """A TaskManager that knows every benchmark, indexing the built-in tasks only when needed.

    dmo's paper tasks (dmo.scoring.paper_tasks) are always included, after ``include_path``: earlier folders win.
    """
    from lmms_eval.tasks import TaskManager

    benchmarks = list(dict.fromkeys(task_of(b) for b in benchmarks))
    folders = include_paths(include_path)
    paths = [*(str(f.resolve()) for f in folders), str(PAPER_TASK_DIR)]
    with _quiet_task_loader():
        manager = TaskManager("ERROR", include_path=paths, include_defaults=False)
        if all(b in manager.all_tasks for b in benchmarks):
            return manager
        manager = TaskManager("ERROR", include_path=paths, include_defaults=True)
    unknown = [b for b in benchmarks if b not in manager.all_tasks]
    if unknown:
        where = f"in {', '.join(str(f) for f in folders)} or " if folders else ""
        raise DmoError(
            f"unknown benchmark {unknown[0]!r}: it is not a task {where}among lmms-eval's built-in tasks; "
            "check the name (see `python -m lmms_eval --tasks list`), or put its task YAML in a folder that the "
            "space's scoring.tasks (or --tasks-dir) names"
            + (f" (also unknown: {unknown[1:]})" if len(unknown) > 1 else "")
        )
    return manager


def _check_local_data(task_manager: Any, benchmarks: Sequence[str]) -> None:
    """Refuse missing local data files up front: lmms-eval retries a failed dataset load for a minute."""
    from lmms_eval.utils import load_yaml_config

    for name in _leaf_tasks(task_manager, benchmarks):
        yaml_path = task_manager.task_index.get(name, {}).get("yaml_path", -1)
        if yaml_path == -1:
            continue
        config = load_yaml_config(yaml_path, mode="simple")
        if config.get("dataset_path") not in _LOCAL_BUILDERS:
            continue
        data_files = (config.get("dataset_kwargs") or {}).get("data_files")
        for path in _flatten_paths(data_files):
            full = Path(os.path.dirname(yaml_path), path)
            if "*" not in path and not full.is_file():
                raise DmoError(f"benchmark {name!r} needs data file {full}, which does not exist: build the data first")


def _leaf_tasks(task_manager: Any, names: Sequence[str]) -> Iterator[str]:
    """The tasks behind ``names``, expanding groups (whose YAML lists its tasks)."""
    from lmms_eval.utils import load_yaml_config

    for name in names:
        entry = task_manager.task_index.get(name, {})
        if entry.get("type") == "group" and entry.get("yaml_path", -1) != -1:
            subtasks = load_yaml_config(entry["yaml_path"], mode="simple").get("task") or []
            yield from _leaf_tasks(task_manager, [t for t in subtasks if isinstance(t, str)])
        else:
            yield name


def _flatten_paths(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _flatten_paths(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _flatten_paths(v)


def _simple_evaluate(lmm: Any, benchmarks: Sequence[str], task_manager: Any, limit: int | None) -> dict | None:
    from lmms_eval.evaluator import simple_evaluate

    # lmms-eval reseeds python, numpy and torch on every call (as its CLI does, so answers match a CLI run);
    # restore the caller's random state afterwards so a search loop's own sampling is not reset per proxy.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            return simple_evaluate(
                model=lmm,
                tasks=list(benchmarks),
                limit=limit,
                task_manager=task_manager,
                use_cache=None,  # lmms-eval's response cache keys the model by str(model); dmo caches scores itself
                cache_requests=False,
                log_samples=False,
                bootstrap_iters=0,  # no stderr: dmo needs the point score, and bootstrapping is slow
                verbosity="ERROR",
                process_docs_parallel=1,  # scoring a few short answers is faster than starting threads
            )
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


@contextlib.contextmanager
def _quiet_task_loader() -> Iterator[None]:
    """Hide lmms-eval's task-loader messages, which it logs at DEBUG whatever verbosity TaskManager is given.

    DMO_LMMS_EVAL_LOGS=1 shows them (and all of lmms-eval's output, see _quiet_lmms_eval). Its exit re-enables
    lmms-eval's logs: never use it inside _quiet_lmms_eval.
    """
    from loguru import logger

    if os.environ.get("DMO_LMMS_EVAL_LOGS"):
        yield
        return
    logger.disable("lmms_eval")
    try:
        yield
    finally:
        logger.enable("lmms_eval")


@contextlib.contextmanager
def _quiet_lmms_eval() -> Iterator[None]:
    """Silence lmms-eval's loguru messages and datasets' progress bars for the duration of one evaluation.

    Failures still surface as exceptions; what is hidden is per-call chatter (task loading, request counts,
    "--limit is for testing" warnings, dataset progress bars) that would repeat for every proxy.
    """
    if os.environ.get("DMO_LMMS_EVAL_LOGS"):  # asked for: lmms-eval's messages and bars as it gives them
        yield
        return
    import datasets
    import lmms_eval.api.task
    import lmms_eval.evaluator
    from loguru import logger

    # lmms-eval draws a progress bar per task and per call ("Postprocessing"), passing disable= itself, and tqdm
    # reads its TQDM_* environment only at import; so swap in a bar that is always off, in those two modules only.
    bar_modules = (lmms_eval.api.task, lmms_eval.evaluator)
    original_bars = [module.tqdm for module in bar_modules]
    for module, bar in zip(bar_modules, original_bars):
        module.tqdm = functools.partial(_silent_bar, bar)
    bars_were_enabled = datasets.is_progress_bar_enabled()
    datasets_verbosity = datasets.logging.get_verbosity()
    logger.disable("lmms_eval")
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        yield
    finally:
        logger.enable("lmms_eval")
        datasets.logging.set_verbosity(datasets_verbosity)
        if bars_were_enabled:
            datasets.enable_progress_bars()
        for module, bar in zip(bar_modules, original_bars):
            module.tqdm = bar


def _silent_bar(bar: Any, *args: Any, **kwargs: Any) -> Any:
    kwargs["disable"] = True
    return bar(*args, **kwargs)
