"""Read lmms-eval output folders into the results table: scores of the base, the experts and trained mixtures.

Layout: ``<root>/<model>/<benchmark>/**/*_results.json``, i.e. one
``lmms-eval --output_path <root>/<model>/<benchmark>`` per model and benchmark (lmms-eval adds a folder named
after the model and writes ``<date>_results.json`` into it). When a folder holds several results files, the newest
wins: by the date lmms-eval puts in the file name, else by time of modification. The benchmark folder's name is the
lmms-eval task whose score is read, through the metric map (``dmo/scoring/metrics.yaml``).

A model folder's name says what the model is:

* ``base``: the base model;
* ``expert-<domain>``, ``expert_<domain>`` or a bare domain name (``ocr``): that domain's expert; a model trained
  on one domain only (``ocr-102400``, ``ocr-1``) is an expert too;
* a model trained on a mixture: the DMO paper's name (``general-25600++ocr-76800``), a canonical mixture id
  (``general-0.25+ocr-0.75``), or either followed by ``.seed<N>`` / ``_seed<N>`` / ``-seed<N>`` (dmo's run names).

Trained rows get one weight per domain of the space (``--space``), the manifest (``--manifest``) or, without
either, of every domain named under ``root``, so that their mixture ids match those of the proxies they are
compared with. Everything is read and checked before the first row is written; re-ingesting the same files adds
nothing, and a newer file for the same model and benchmark supersedes the older row.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dmo.errors import DmoError
from dmo.mixture import Mixture, check_domain_name, from_paper_name
from dmo.results import ResultsTable, ScoreRow, cache_key
from dmo.scoring.metrics import MetricSpec, metric_spec, score_from_results

RESULTS_GLOB = "*_results.json"
_SEED = re.compile(r"^(?P<model>.+?)[._-]seed(?P<seed>\d+)$")
_EXPERT = re.compile(r"^expert[-_](?P<domain>[a-z][a-z0-9_]*)$")
_DATE = re.compile(r"^(\d{8}_\d{6})")
#: Recorded in every ingested row's cache key, so ingested rows never collide with scored ones.
INGEST_VERSION = "lmms-eval-ingest-v1"


@dataclass(frozen=True)
class ModelName:
    kind: str  # base | expert | trained
    label: str  # the results table's mixture column: "base", the domain, or the mixture id
    mixture: Mixture | None = None
    seed: int | None = None


def parse_model_name(name: str, domains: Sequence[str] | None = None) -> ModelName:
    """What a model folder name says (see the module docstring); refuses names it cannot read."""
    seed = None
    m = _SEED.match(name)
    if m:
        name, seed = m["model"], int(m["seed"])
    if name == "base":
        if seed is not None:
            raise DmoError(f"model folder {name}.seed{seed}: the base model has no training seed; name it 'base'")
        return ModelName("base", "base")
    e = _EXPERT.match(name)
    if e or _is_domain(name):
        domain = e["domain"] if e else name
        return _expert(domain, seed, domains, name)
    try:
        if "=" not in name and ("++" in name or re.fullmatch(r"[a-z][a-z0-9_]*-\d+", name)):
            mixture = from_paper_name(name)
        else:
            mixture = Mixture.parse(name)
    except DmoError:
        raise DmoError(
            f"cannot tell which model {name!r} is: name its folder base, expert-<domain>, a mixture id such as "
            "general-0.25+ocr-0.75 or a paper name such as general-25600++ocr-76800 (optionally .seed<N>)"
        ) from None
    used = [d for d, w in mixture.as_dict().items() if w > 0]
    if len(used) == 1:
        return _expert(used[0], seed, domains, name)
    if domains is not None:
        try:
            mixture = Mixture.from_mapping(mixture.as_dict(), list(domains), tolerance=mixture.tolerance)
        except DmoError as exc:
            raise DmoError(f"model folder {name!r}: {exc}") from None
    return ModelName("trained", mixture.id, mixture, seed if seed is not None else 0)


def _is_domain(name: str) -> bool:
    try:
        check_domain_name(name)
    except DmoError:
        return False
    return True


def _expert(domain: str, seed: int | None, domains: Sequence[str] | None, name: str) -> ModelName:
    if domains is not None and domain not in domains:
        raise DmoError(
            f"model folder {name!r} is an expert of {domain!r}, which is not among the domains {list(domains)}"
        )
    return ModelName("expert", domain, None, seed)


@dataclass
class Found:
    model: str
    benchmark: str
    path: Path
    parsed: ModelName


def newest(files: Sequence[Path]) -> Path:
    """The newest lmms-eval results file: by the date in its name (``20250101_120000_results.json``), else mtime."""

    def key(p: Path) -> tuple[str, int]:
        m = _DATE.match(p.name)
        return (m.group(1) if m else "", p.stat().st_mtime_ns)

    return max(files, key=key)


def scan(root: Path, domains: Sequence[str] | None = None) -> list[Found]:
    """Every (model, benchmark) under ``root`` with its newest results file; refuses any folder without one."""
    root = Path(root)
    if not root.is_dir():
        raise DmoError(f"{root} is not a folder: give the folder of lmms-eval outputs (<root>/<model>/<benchmark>/)")
    models = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not models:
        raise DmoError(f"no model folders under {root}: expected {root}/<model>/<benchmark>/**/{RESULTS_GLOB}")
    parsed = {m.name: parse_model_name(m.name) for m in models}
    if domains is None:  # every domain named under root, so that trained mixture ids are comparable
        named = set()
        for p in parsed.values():
            named |= set(p.mixture.domains) if p.mixture is not None else {p.label} if p.kind == "expert" else set()
        domains = sorted(named)
    out = []
    for m in models:
        info = parse_model_name(m.name, domains)
        benches = sorted(p for p in m.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not benches:
            raise DmoError(f"model folder {m} has no benchmark folders: expected {m}/<benchmark>/**/{RESULTS_GLOB}")
        for b in benches:
            files = [f for f in b.rglob(RESULTS_GLOB) if f.is_file()]
            if not files:
                raise DmoError(
                    f"no lmms-eval results JSON (*_results.json) under {b}: did that evaluation finish? remove the "
                    "folder or re-run it"
                )
            out.append(Found(m.name, b.name, newest(files), info))
    return out


def _read_json(path: Path) -> Mapping[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DmoError(f"cannot read lmms-eval results {path}: {exc}") from None
    if not isinstance(data, dict):
        raise DmoError(f"{path} is not an lmms-eval results file (expected a JSON object)")
    return data


def ingest_rows(
    root: Path,
    *,
    domains: Sequence[str] | None = None,
    group: str = "",
    metric_map: Mapping[str, MetricSpec] | None = None,
) -> list[ScoreRow]:
    """The results table rows of every (model, benchmark) under ``root``; raises before returning any if one is bad."""
    rows = []
    for f in scan(root, domains):
        data = _read_json(f.path)
        try:
            score = score_from_results(f.benchmark, data, metric_map)
        except DmoError as exc:
            raise DmoError(f"{f.path}: {exc}") from None
        spec = metric_spec(f.benchmark, metric_map)
        p = f.parsed
        rows.append(
            ScoreRow(
                kind=p.kind,  # type: ignore[arg-type]
                mixture=p.label,
                benchmark=f.benchmark,
                score=score,
                metric="+".join(spec.keys),
                weights=p.mixture.as_dict() if p.mixture is not None else {},
                group=group,
                seed=p.seed,
                source=f"lmms-eval:{f.path.relative_to(root)}",
                fingerprint=hashlib.sha256(f.path.read_bytes()).hexdigest()[:16],
                key=cache_key(
                    source=INGEST_VERSION, kind=p.kind, model=p.label, seed=p.seed, benchmark=f.benchmark, group=group
                ),
            )
        )
    return rows


def ingest(
    root: Path,
    table: ResultsTable,
    *,
    domains: Sequence[str] | None = None,
    group: str = "",
    metric_map: Mapping[str, MetricSpec] | None = None,
    dry_run: bool = False,
) -> tuple[list[ScoreRow], int]:
    """Append the rows of ``root`` that the table does not hold yet; returns (new rows, rows already there)."""
    rows = ingest_rows(Path(root), domains=domains, group=group, metric_map=metric_map)
    have = {(r.get("key"), r.get("fingerprint")) for r in table.records() if r.get("status") == "ok"}
    new = [r for r in rows if (r.key, r.fingerprint) not in have]
    if new and not dry_run:
        table.append(new)
    return new, len(rows) - len(new)
