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


def _simple_evaluate(
    lmm: Any, benchmarks: Sequence[Any], task_manager: Any, limit: int | None, log_samples: bool = False
) -> dict | None:
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
                log_samples=log_samples,
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


def evaluate_items(
    lmm: Any,
    items: Mapping[str, Sequence[int]],
    include_path: IncludePath,
    limit: int | None = None,
    *,
    metric_map: Mapping[str, MetricSpec] | None = None,
) -> dict[str, dict[int, float]]:
    """Evaluate ``lmm`` on some items of each benchmark only: ``{benchmark: {document id: item score}}``.

    An item's score is its metric value, divided as the benchmark's score is; the benchmark's score is the mean of
    its items' scores, so a benchmark whose metric lmms-eval aggregates otherwise (an F1, a mean over categories) is
    refused. The task's evaluation split is cut to the asked documents (in document order) before lmms-eval builds its
    requests, so nothing else is generated; ``limit`` bounds the document ids as it bounds a full run.
    """
    benchmarks = list(items)
    if not benchmarks:
        raise DmoError("no benchmarks given: name at least one lmms-eval task to evaluate")
    specs = {b: metric_spec(b, metric_map) for b in benchmarks}
    wanted: dict[str, set[int]] = {}
    for b in benchmarks:
        wanted.setdefault(task_of(b), set()).update(int(d) for d in items[b])
    tasks = list(wanted)
    task_manager = task_manager_for(tasks, include_path)
    with _quiet_lmms_eval():
        _check_local_data(task_manager, tasks)
        loaded = _leaf_task_objects(task_manager, tasks)
        chosen = {}
        for name, task in loaded.items():
            n = _doc_count(task, limit)
            ids = sorted(wanted[name])
            if ids and (ids[0] < 0 or ids[-1] >= n):
                raise DmoError(f"benchmark {name!r} has {n} items (documents 0..{n - 1}): item {ids[-1]} is not one")
            _check_mean(name, task, [s for b, s in specs.items() if task_of(b) == name])
            _select_docs(task, ids)
            chosen[name] = ids
        results = _simple_evaluate(lmm, list(loaded.values()), task_manager, None, log_samples=True)
    if results is None:
        raise DmoError("lmms-eval returned no results: run dmo's evaluation in a single process")
    out: dict[str, dict[int, float]] = {}
    for b in benchmarks:
        task, spec = task_of(b), specs[b]
        per_doc = _sample_values(b, results.get("samples", {}).get(task, []), spec, _filter_names(loaded[task]))
        ids = chosen[task]
        out[b] = {ids[pos]: value for pos, value in per_doc.items()}
        lost = sorted(set(int(d) for d in items[b]) - set(out[b]))
        if lost:
            raise DmoError(f"lmms-eval returned no score for item {lost[0]} of {b!r}")
        out[b] = {int(d): out[b][int(d)] for d in items[b]}
    return out


def count_items(benchmark: str, include_path: IncludePath, limit: int | None = None) -> int:
    """How many items (documents of the evaluation split) a benchmark scores, ``limit`` applied."""
    task = task_of(benchmark)
    task_manager = task_manager_for([task], include_path)
    with _quiet_lmms_eval():
        _check_local_data(task_manager, [task])
        loaded = _leaf_task_objects(task_manager, [task])
    return _doc_count(loaded[task], limit)


def _leaf_task_objects(task_manager: Any, tasks: Sequence[str]) -> dict[str, Any]:
    from lmms_eval.tasks import get_task_dict

    found = get_task_dict(list(tasks), task_manager)
    out = {}
    for name in tasks:
        task = found.get(name)
        if task is None or isinstance(task, dict) or not hasattr(task, "eval_docs"):
            raise DmoError(
                f"benchmark {name!r} is a group of tasks: item-level scoring (scoring.stages) needs single tasks; "
                "list its tasks as benchmarks instead"
            )
        out[name] = task
    return out


def _doc_count(task: Any, limit: int | None) -> int:
    n = len(task.eval_docs)
    return min(n, limit) if limit else n


def _split(task: Any) -> str:
    return task.config.test_split if task.has_test_docs() else task.config.validation_split


def _select_docs(task: Any, ids: Sequence[int]) -> None:
    """Cut the task's evaluation split to these documents: lmms-eval then builds requests for them only (the model
    reads documents through the same, cut dataset, so a request's document id is its position in ``ids``)."""
    split = _split(task)
    task.dataset[split] = task.dataset[split].select(list(ids))
    if task.dataset_no_image is not task.dataset:
        task.dataset_no_image[split] = task.dataset_no_image[split].select(list(ids))


def _check_mean(name: str, task: Any, specs: Sequence[MetricSpec]) -> None:
    aggregation = task.aggregation() or {}
    for spec in specs:
        for key in spec.keys:
            fn = aggregation.get(key)
            if getattr(fn, "__name__", "") != "mean":
                raise DmoError(
                    f"benchmark {name!r} aggregates {key!r} by {getattr(fn, '__name__', fn)!r}, not a mean of its "
                    "items: score it without stages (drop scoring.stages and the pruner)"
                )


def _filter_names(task: Any) -> list[str]:
    filters = task.config.filter_list
    return [str(f.get("name", "none")) for f in filters] if filters else ["none"]


def _sample_values(
    benchmark: str, samples: Sequence[Mapping[str, Any]], spec: MetricSpec, filters: Sequence[str]
) -> dict[int, float]:
    """Each document's score from lmms-eval's logged samples (one run of the documents per filter, in order)."""
    if spec.filter not in filters:
        raise DmoError(f"benchmark {benchmark!r} has no filter {spec.filter!r} (its filters: {list(filters)})")
    which = filters.index(spec.filter)
    seen: dict[int, int] = {}
    out: dict[int, float] = {}
    for sample in samples:
        pos = int(sample["doc_id"])
        k = seen.get(pos, 0)
        seen[pos] = k + 1
        if k != which:
            continue
        total = 0.0
        for key in spec.keys:
            value = sample.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise DmoError(
                    f"benchmark {benchmark!r} gives item scores of {key!r} as {type(value).__name__}, not numbers: "
                    "score it without stages (drop scoring.stages and the pruner)"
                )
            total += float(value)
        out[pos] = total / spec.divide_by
    return out


def refuse_loss_items(benchmark: str) -> None:
    """A ``loss:<domain>`` benchmark has no items to score in stages: refused in one line."""
    from dmo.scoring.loss import split_benchmarks

    if split_benchmarks([benchmark])[1]:
        raise DmoError(
            f"{benchmark!r} is a validation loss, which has no items to score in stages: drop scoring.stages and the "
            "pruner, or the loss benchmark"
        )
