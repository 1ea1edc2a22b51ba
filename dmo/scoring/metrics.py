"""Turn lmms-eval's results into one score in [0, 1] per benchmark.

lmms-eval reports many metrics per task under keys ``"<metric>,<filter>"`` (e.g. ``exact_match,none``), on
different scales (MME in points, most others as fractions). Which one dmo optimises is data, kept in
``metrics.yaml`` next to this file, so adding a benchmark needs no code.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import json
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from dmo.errors import DmoError
from dmo.scoring.paper_tasks import PAPER_TASKS

#: A benchmark named "<task>/<name>" is a sub-score of lmms-eval task <task> (its own entry says which result).
SUBSCORE_SEP = "/"
_ALLOWED_FIELDS = {"metric", "filter", "divide_by"}
#: Scores may exceed [0, 1] by float rounding only (a mean of 0/1 values, a sum divided by its maximum).
_RANGE_TOLERANCE = 1e-9


@dataclass(frozen=True)
class MetricSpec:
    """The result keys to read (summed when several), the lmms-eval filter, and the divisor into [0, 1]."""

    keys: tuple[str, ...]
    filter: str = "none"
    divide_by: float = 1.0

    def result_keys(self) -> list[str]:
        return [f"{k},{self.filter}" for k in self.keys]


def _parse_spec(benchmark: str, entry: Any, source: str) -> MetricSpec:
    where = f"entry {benchmark!r} in {source}"
    if not isinstance(entry, Mapping):
        raise DmoError(f"{where} must be a mapping like {{metric: exact_match}}, got {entry!r}")
    unknown = set(entry) - _ALLOWED_FIELDS
    if unknown:
        raise DmoError(f"{where} has unknown field(s) {sorted(unknown)}: allowed are {sorted(_ALLOWED_FIELDS)}")
    metric = entry.get("metric")
    keys = (metric,) if isinstance(metric, str) else tuple(metric) if isinstance(metric, list) else ()
    if not keys or not all(isinstance(k, str) and k for k in keys):
        raise DmoError(f"{where} needs 'metric': a metric name or a list of names, got {metric!r}")
    filt = entry.get("filter", "none")
    if not isinstance(filt, str) or not filt:
        raise DmoError(f"{where} has filter {filt!r}: give an lmms-eval filter name such as none")
    divide_by = entry.get("divide_by", 1)
    if isinstance(divide_by, bool) or not isinstance(divide_by, (int, float)) or not divide_by > 0:
        raise DmoError(f"{where} has divide_by {divide_by!r}: give a positive number")
    return MetricSpec(keys, filt, float(divide_by))


def parse_metric_map(raw: Any, source: str = "metric map") -> dict[str, MetricSpec]:
    """Validate a ``{benchmark: {metric, filter, divide_by}}`` mapping (the content of ``metrics.yaml``)."""
    if not isinstance(raw, Mapping):
        raise DmoError(f"{source} must map benchmark names to metric entries")
    return {str(name): _parse_spec(str(name), entry, source) for name, entry in raw.items()}


@functools.lru_cache(maxsize=1)
def _default_map() -> dict[str, MetricSpec]:
    text = resources.files("dmo.scoring").joinpath("metrics.yaml").read_text()
    return parse_metric_map(yaml.safe_load(text), "dmo/scoring/metrics.yaml")


def load_metric_map(path: Path | None = None) -> dict[str, MetricSpec]:
    """The packaged map, or the one in ``path`` (same format as ``dmo/scoring/metrics.yaml``)."""
    if path is None:
        return dict(_default_map())
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise DmoError(f"cannot read metric map {path}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise DmoError(f"metric map {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    return parse_metric_map(raw, str(path))


def own_metrics(metric_map: Mapping[str, MetricSpec] | None) -> dict[str, str]:
    """For a scorer's settings (its cache key): a digest of the entries of ``metric_map`` that differ from the shipped
    map, so that changing one's own metric re-scores; nothing for the shipped map (cache keys stay as they were)."""
    if metric_map is None:
        return {}
    shipped = _default_map()
    own = {k: v for k, v in metric_map.items() if shipped.get(k) != v}
    if not own:
        return {}
    blob = json.dumps({k: [list(v.keys), v.filter, v.divide_by] for k, v in sorted(own.items())})
    return {"metrics": hashlib.sha256(blob.encode()).hexdigest()[:16]}


def task_of(benchmark: str) -> str:
    """The lmms-eval task that reports ``benchmark``: the name itself, or the part before "/" of a sub-score."""
    return benchmark.split(SUBSCORE_SEP, 1)[0]


def metric_spec(benchmark: str, metric_map: Mapping[str, MetricSpec] | None = None) -> MetricSpec:
    """The spec for ``benchmark``: an exact entry first, else the first glob pattern that matches."""
    table = _default_map() if metric_map is None else metric_map
    if benchmark in table:
        return table[benchmark]
    for pattern, spec in table.items():
        if any(c in pattern for c in "*?[") and fnmatch.fnmatchcase(benchmark, pattern):
            return spec
    raise DmoError(
        f"no score metric known for benchmark {benchmark!r}: add it to the space's scoring section, "
        f"'metrics: {{{benchmark}: {{metric: <lmms-eval metric name>}}}}' (or to dmo/scoring/metrics.yaml, or to your "
        "own metric map file)"
    )


def score_from_results(
    benchmark: str, results: Mapping[str, Any], metric_map: Mapping[str, MetricSpec] | None = None
) -> float:
    """The score in [0, 1] of ``benchmark`` in lmms-eval's output.

    ``results`` is what ``simple_evaluate`` returns (or the ``results.json`` lmms-eval writes): the per-task
    table is read from ``results["results"]`` (groups also from ``results["groups"]``); a bare per-task table
    is accepted too.
    """
    spec = metric_spec(benchmark, metric_map)
    table = _task_table(task_of(benchmark), results)
    values = []
    for key in spec.result_keys():
        if key not in table:
            found = sorted(k for k in table if "," in k and "_stderr" not in k.split(",")[0])
            raise DmoError(f"lmms-eval results for {benchmark!r} have no {key!r} (found {found}): {_fix(benchmark)}")
        values.append(_as_number(benchmark, key, table[key]))
    score = math.fsum(values) / spec.divide_by
    if not -_RANGE_TOLERANCE <= score <= 1 + _RANGE_TOLERANCE:
        raise DmoError(
            f"score of {benchmark!r} is {score:g}, outside [0, 1]: set divide_by for it in dmo/scoring/metrics.yaml "
            "(e.g. 100 for a percentage)"
        )
    return min(1.0, max(0.0, score))


def _fix(benchmark: str) -> str:
    paper_task = {stock: ours for ours, stock in PAPER_TASKS.items()}.get(benchmark)
    if paper_task is not None:  # the DMO paper's lenient metric, which a stock lmms-eval's task lacks
        return f"name dmo's {paper_task!r} instead, which adds the DMO paper's lenient metrics to a stock lmms-eval"
    return "fix the entry for this benchmark in dmo/scoring/metrics.yaml"


def _task_table(benchmark: str, results: Mapping[str, Any]) -> Mapping[str, Any]:
    if not isinstance(results, Mapping):
        raise DmoError(f"expected lmms-eval results as a mapping, got {type(results).__name__}")
    sections = [results.get("results"), results.get("groups")] if "results" in results else [results]
    for section in sections:
        if isinstance(section, Mapping) and isinstance(section.get(benchmark), Mapping):
            return section[benchmark]
    raise DmoError(f"lmms-eval results have no entry for benchmark {benchmark!r}: was it among the evaluated tasks?")


def _as_number(benchmark: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise DmoError(
            f"lmms-eval reported {value!r} for {key!r} of {benchmark!r}, not a finite number: "
            "check that the benchmark has documents and that the model produced answers"
        )
    return float(value)
