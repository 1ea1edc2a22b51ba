"""The ``replay`` scoring backend: answers from a recorded results table instead of evaluating a model.

Record once (e.g. a dense lattice of proxies scored with the ``hf`` backend), then replay: samplers, study
settings and multi-worker runs can be compared on real scores at no model cost. A proxy is answered when the
table holds a successful score of exactly its mixture (canonical id) and merge method on every requested
benchmark; with ``nearest=True``, the recorded mixture closest to it (Euclidean distance on the simplex,
over the same domains) answers instead. Anything else is refused with a :class:`~dmo.errors.DmoError` that
says what is missing. The base, experts and trained models are answered by exact match only.

In a search space::

    scoring: {backend: replay, replay: {table: ../results/tiny-3d/scores.jsonl, nearest: true}}

From Python (e.g. a benchmark of samplers)::

    scorer = ReplayScorer("results/tiny-3d/scores.jsonl", nearest=True)
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dmo.errors import DmoError
from dmo.mixture import Mixture
from dmo.results import ResultsTable
from dmo.scoring.backends import ReplayOptions
from dmo.scoring.base import Evaluation, ItemEvaluation, Scorer, ScoringContext, Target, TargetRefused


@dataclass
class _Recorded:
    """The newest successful score per benchmark of one recorded model."""

    label: str
    weights: dict[str, float] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, str] = field(default_factory=dict)
    #: per-item scores (by document id) per benchmark, from the recorded ``items.jsonl`` beside the table
    items: dict[str, dict[int, float]] = field(default_factory=dict)


class ReplayScorer(Scorer):
    """Scores read back from a recorded results table (``scores.jsonl``, or the results folder holding it)."""

    name = "replay"

    @classmethod
    def from_context(cls, context: ScoringContext, options: ReplayOptions) -> ReplayScorer:
        # a replay has no model and reads recorded scores: of the context, only the limit is recorded (settings)
        return cls(options.table, options.nearest, limit=context.limit)

    def __init__(self, table: str | Path | None = None, nearest: bool = False, *, limit: int | None = None) -> None:
        if table is None:
            raise DmoError(
                "the replay backend needs a recorded results table: add 'replay: {table: PATH}' to the space's "
                "'scoring' section (a scores.jsonl, or the results folder that holds it)"
            )
        path = Path(table).expanduser()
        if path.is_dir():
            path = path / "scores.jsonl"
        if not path.is_file():
            raise DmoError(f"replay table {path} does not exist: record one first (e.g. a grid study on a lattice)")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise DmoError(f"cannot read replay table {path}: {exc.strerror or exc}") from None
        self.path = path
        self.nearest = bool(nearest)
        self.limit = limit
        self.digest = hashlib.sha256(data).hexdigest()[:16]
        #: (method, mixture id) -> recorded proxy; (kind, label, seed) -> recorded base/expert/trained model.
        self._proxies: dict[tuple[str, str], _Recorded] = {}
        self._models: dict[tuple[str, str, int | None], _Recorded] = {}
        self.benchmarks: set[str] = set()
        for rec in ResultsTable(path).records():
            score = rec.get("score")
            if rec.get("status", "ok") != "ok" or not isinstance(score, (int, float)) or not math.isfinite(score):
                continue
            label, bench = str(rec.get("mixture", "")), str(rec.get("benchmark", ""))
            if not label or not bench:
                continue
            if rec.get("kind") == "proxy":
                key: Any = (str(rec.get("method") or ""), label)
                entry = self._proxies.setdefault(key, _Recorded(label, dict(rec.get("weights") or {})))
            else:
                key = (str(rec.get("kind")), label, rec.get("seed"))
                entry = self._models.setdefault(key, _Recorded(label))
            entry.scores[bench] = float(score)  # file order: the newest row wins
            entry.metrics[bench] = str(rec.get("metric") or "")
            self.benchmarks.add(bench)
        self._read_items(path.parent)
        if not self.benchmarks:
            raise DmoError(f"replay table {path} holds no successful scores: record some first")
        #: target label -> (recorded mixture id, distance) for every proxy answered by a neighbour.
        self.matches: dict[str, tuple[str, float]] = {}
        #: every evaluation asked for, in order (target labels).
        self.calls: list[str] = []

    # ------------------------------------------------------------------------------------------ Scorer protocol

    def fingerprint(self, target: Target) -> str:
        seed = "" if target.seed is None else str(target.seed)
        return f"replay:{self.digest}:{target.kind}:{target.method}:{seed}:{target.label}"

    def settings(self) -> dict[str, Any]:
        return {"backend": self.name, "table": self.digest, "nearest": self.nearest}

    def check(self, benchmarks: Sequence[str]) -> None:
        """Refuse benchmarks the table never recorded, before a study starts."""
        unknown = [b for b in benchmarks if b not in self.benchmarks]
        if unknown:
            raise DmoError(
                f"unknown benchmark {unknown[0]!r}: replay table {self.path} has scores for "
                f"{sorted(self.benchmarks)} only; fix the space's 'benchmarks' or record that benchmark"
            )

    def evaluate(self, target: Target, benchmarks: Sequence[str]) -> Evaluation:
        self.check(benchmarks)
        self.calls.append(target.label)
        entry = self._lookup(target, benchmarks)
        return Evaluation(
            {b: entry.scores[b] for b in benchmarks}, metrics={b: entry.metrics.get(b, "") for b in benchmarks}
        )

    def _read_items(self, folder: Path) -> None:
        """The recorded per-item scores and item counts (``items.jsonl``, ``item_order.json``), where recorded."""
        from dmo.paths import SpaceFolder
        from dmo.scoring.items import ItemOrders, ItemTable

        space = SpaceFolder(folder)
        self.item_totals = {t: int(e["items"]) for t, e in ItemOrders(space.item_order).read().items()}
        if not space.items.exists():
            return
        digest = hashlib.sha256(space.items.read_bytes()).hexdigest()[:16]
        self.digest = hashlib.sha256(f"{self.digest}:{digest}".encode()).hexdigest()[:16]
        for rec in ItemTable(space.items).rows():
            label, bench = str(rec.get("mixture", "")), str(rec.get("benchmark", ""))
            if rec.get("kind") == "proxy":
                key: Any = (str(rec.get("method") or ""), label)
                entry = self._proxies.setdefault(key, _Recorded(label, dict(rec.get("weights") or {})))
            else:
                key = (str(rec.get("kind")), label, rec.get("seed"))
                entry = self._models.setdefault(key, _Recorded(label))
            entry.items.setdefault(bench, {}).update({int(d): float(v) for d, v in (rec.get("items") or {}).items()})
            self.benchmarks.add(bench)

    def item_count(self, benchmark: str) -> int:
        task = benchmark.split("/", 1)[0]
        if task not in self.item_totals:
            raise DmoError(
                f"replay table {self.path} has no item order for {benchmark!r} beside it (item_order.json): record "
                "the benchmark with scoring.stages, or replay without stages"
            )
        return self.item_totals[task]

    def evaluate_items(self, target: Target, items: Mapping[str, Sequence[int]]) -> ItemEvaluation:
        self.check(list(items))
        self.calls.append(target.label)
        entry = self._lookup(target, list(items), lambda e, _: _missing_items(e, items))
        return ItemEvaluation(
            {b: {int(d): entry.items[b][int(d)] for d in ids} for b, ids in items.items()},
            metrics={b: entry.metrics.get(b, "") for b in items},
        )

    # ---------------------------------------------------------------------------------------------- lookups

    #: Targets answered in one call: any number (a table look-up), so studies with ``--batch`` can be replayed.
    max_batch = 64

    def mixtures(self, domains: Sequence[str], method: str = "linear") -> list[Mixture]:
        """The recorded proxy mixtures over exactly ``domains`` (e.g. the lattice a sampler is replayed on)."""
        out = []
        for (m, _), entry in sorted(self._proxies.items()):
            if m == method and set(entry.weights) == set(domains):
                out.append(Mixture.from_mapping(entry.weights, domains, tolerance=1e-5))
        return out

    def _lookup(
        self,
        target: Target,
        benchmarks: Sequence[str],
        missing_of: Callable[[_Recorded | None, Sequence[str]], list[str]] | None = None,
    ) -> _Recorded:
        _missing = missing_of or _missing_scores
        if target.kind != "proxy":
            key = (target.kind, target.label, target.seed)
            entry = self._models.get(key)
            missing = _missing(entry, benchmarks)
            if missing:
                what = f"{target.kind} {target.label}" + (f" seed {target.seed}" if target.seed is not None else "")
                raise TargetRefused(
                    f"replay table {self.path} has no score of {what} on {missing[0]!r}: record it first"
                )
            assert entry is not None
            return entry
        assert target.mixture is not None
        exact = self._proxies.get((target.method, target.mixture.id))
        if not _missing(exact, benchmarks):
            assert exact is not None
            return exact
        near = self._nearest(target, benchmarks, _missing)
        if self.nearest and near is not None:
            entry, distance = near
            self.matches[target.label] = (entry.label, distance)
            return entry
        hint = (
            f"the nearest recorded one is {near[0].label} at distance {near[1]:.4g}: "
            "set 'replay: {nearest: true}' in the space's 'scoring' section to use it"
            if near is not None
            else f"no recorded {target.method or 'linear'} proxy over domains {list(target.mixture.domains)} "
            f"has scores on {list(benchmarks)}"
        )
        raise TargetRefused(
            f"replay table {self.path} has no {target.method} proxy score of mixture {target.mixture.id} "
            f"on {list(benchmarks)}; {hint}"
        )

    def _nearest(
        self,
        target: Target,
        benchmarks: Sequence[str],
        _missing: Callable[[_Recorded | None, Sequence[str]], list[str]],
    ) -> tuple[_Recorded, float] | None:
        assert target.mixture is not None
        want = target.mixture.as_dict()
        best: tuple[float, str, _Recorded] | None = None
        for (method, label), entry in self._proxies.items():
            if method != target.method or set(entry.weights) != set(want) or _missing(entry, benchmarks):
                continue
            d = math.sqrt(sum((entry.weights[k] - w) ** 2 for k, w in want.items()))
            if best is None or (d, label) < best[:2]:
                best = (d, label, entry)
        return None if best is None else (best[2], best[0])


def _missing_scores(entry: _Recorded | None, benchmarks: Sequence[str]) -> list[str]:
    if entry is None:
        return list(benchmarks)
    return [b for b in benchmarks if b not in entry.scores]


def _missing_items(entry: _Recorded | None, items: Mapping[str, Sequence[int]]) -> list[str]:
    if entry is None:
        return list(items)
    return [b for b, ids in items.items() if any(int(d) not in entry.items.get(b, {}) for d in ids)]
