"""Read lmms-eval output folders into the results table: scores of the base, the experts, trained mixtures and proxies.

Layout: ``<root>/<model>/<benchmark>/**/*_results.json``, i.e. one
``lmms-eval --output_path <root>/<model>/<benchmark>`` per model and benchmark (lmms-eval adds a folder named
after the model and writes ``<date>_results.json`` into it). When a model and benchmark have several results files
(also across folders naming the same model, such as an export and its ``-HF`` twin), the newest wins: by the date
lmms-eval puts in the file name, else by time of modification. The benchmark folder's name is the lmms-eval task whose
score is read, through the metric map (``dmo/scoring/metrics.yaml``); the paper's lenient benchmarks ``chartqa``,
``pope``, ``mmstar`` and ``cv_bench_2d`` (its own lmms-eval's keys) are recorded as dmo's ``chartqa_dmo``,
``pope_dmo``, ``mmstar_dmo`` and ``cv_bench_2d_dmo``, which report the same metric by the same rule.

The DMO paper's own result tree (``eval_bench/``, written by its ``scripts/*/eval_bench_*.sh``) is read as it is::

    eval_bench/base_models/<base model>/<benchmark>/...          e.g. Qwen2-VL-2B, InternVL3_5-2B-Pretrained
    eval_bench/<experiment>/<model id>/<benchmark>/...           e.g. exp_qwen2_2b_100k/qwen2_2b_lora_mixed_...

``root`` may be one experiment folder (its base model is then read from ``../base_models`` when that exists) or
``eval_bench`` itself, when it holds one experiment. A model folder's name says what the model is:

* ``base``, or a base model's folder name (``Qwen2-VL-2B``, ``Qwen2-VL-2B-Instruct``, ``Qwen2-VL-7B[-Instruct]``,
  ``InternVL3_5-{2B,8B}-{Pretrained,Instruct}``): the base model, when it is the base of the experiment's models
  (``qwen2instr_2b_*`` models are trained from ``Qwen2-VL-2B-Instruct``); another base model is skipped, and said;
* ``expert-<domain>``, ``expert_<domain>``, a bare domain name (``ocr``), a model trained on one domain only
  (``ocr-102400``, ``ocr-1``), or the paper's ``<family>_<size>_<ft>_expert_<domain>-<n>``: that domain's expert;
* a model trained on a mixture: the paper's name of its data (``general-25600++ocr-76800``), a canonical mixture id
  (``general-0.25+ocr-0.75``) or the paper's ``<family>_<size>_<ft>_mixed_<domain>-<n>++<domain>-<n>...``, each
  optionally followed by ``.seed<N>`` / ``_seed<N>`` / ``-seed<N>`` (dmo's run names; :mod:`dmo.paper_names`);
* the paper's merged proxies ``<family>_<size>_<ft>_merged_<domain>-<n>++...--<method>``: proxy rows of that merge
  method (the paper's name for it: task_arithmetic, ties, dare_ta, ...).

Any name may end in ``-HF`` (the paper's transformers-format InternVL exports): the same model. A model folder's
``checkpoint-<n>`` sub-folders (the paper's intermediate checkpoints) are skipped, and said. All models of the paper's
naming under ``root`` must share one ``<family>_<size>_<ft>``. A folder whose name says none of this, or a benchmark
absent from the metric map, is *unknown*: ingestion lists every one and stops, unless told to skip them.

Weights. A paper name gives sample counts ``n_i``; the mixture is ``n_i / budget`` (budget: the experts' ``n``, or
the manifest's). The paper rounds ``n_i = round(w_i * budget)``, so a count may be off ``w_i * budget`` by half a
sample: a candidate mixture of the space (or one of the paper's published mixtures, :mod:`dmo.presets`) whose counts
at the budget are exactly the name's is taken as the mixture it names, so that trained and proxy rows get the same
ids as the proxies dmo scores; any other name's weights are ``n_i / sum(n)``, which is ``n_i / budget`` whenever the
counts add up to the budget (counts that add up to anything else are refused). Trained rows get one weight per domain
of the space (``--space``), the manifest (``--manifest``) or, without either, of every domain named under ``root``,
so that their mixture ids match those of the proxies they are compared with; models on other domains are skipped,
and said. Everything is read and checked before the first row is written; re-ingesting the same files adds nothing,
and a newer file for the same model and benchmark supersedes the older row.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dmo.errors import DmoError
from dmo.mixture import Mixture, check_domain_name, from_paper_name
from dmo.paper_names import PaperName, paper_mixture, paper_mixtures, read_paper_name, split_seed
from dmo.results import ResultsTable, ScoreRow, cache_key
from dmo.scoring.metrics import MetricSpec, metric_spec, score_from_results
from dmo.scoring.paper_tasks import PAPER_TASKS

RESULTS_GLOB = "*_results.json"
_EXPERT = re.compile(r"^expert[-_](?P<domain>[a-z][a-z0-9_]*)$")
_DATE = re.compile(r"^(\d{8}_\d{6})")
_CHECKPOINT = re.compile(r"^checkpoint-\d+$")
_EXPERIMENT = "exp_"
_BASE_MODELS = "base_models"
_HF = "-HF"
#: The paper's base models (utils/model_paths.py), by ``<family>_<size>``: the folder names its results use (the
#: path's last part without ``-HF``). The ``instr`` families are fine-tuned from the instruct models.
PAPER_BASES: dict[str, str] = {
    "qwen2_2b": "Qwen2-VL-2B",
    "qwen2instr_2b": "Qwen2-VL-2B-Instruct",
    "qwen2_7b": "Qwen2-VL-7B",
    "qwen2instr_7b": "Qwen2-VL-7B-Instruct",
    "intern35_2b": "InternVL3_5-2B-Pretrained",
    "intern35instr_2b": "InternVL3_5-2B-Instruct",
    "intern35_8b": "InternVL3_5-8B-Pretrained",
    "intern35instr_8b": "InternVL3_5-8B-Instruct",
}
_BASE_NAMES = {name: key for key, name in PAPER_BASES.items()}
#: The paper's benchmark name (its own lmms-eval) -> dmo's task that reports the same metric on a stock lmms-eval.
DMO_TASK_OF = {stock: ours for ours, stock in PAPER_TASKS.items()}
#: Recorded in every ingested row's cache key, so ingested rows never collide with scored ones.
INGEST_VERSION = "lmms-eval-ingest-v1"


class UnknownModelName(DmoError):
    """A model folder whose name follows none of the naming rules (the help says them once, for all such folders)."""


_NAMING_HELP = (
    "name a model's folder base, expert-<domain>, a mixture id such as general-0.25+ocr-0.75 or a paper name such "
    "as general-25600++ocr-76800 (optionally .seed<N>), or use the paper's qwen2_2b_lora_mixed_general-25600++ocr-76800"
    " / qwen2_2b_lora_merged_general-25600++ocr-76800--task_arithmetic / qwen2_2b_lora_expert_ocr-102400"
)


@dataclass(frozen=True)
class ModelName:
    kind: str  # base | expert | trained | proxy
    label: str  # the results table's mixture column: "base", the domain, or the mixture id
    mixture: Mixture | None = None
    seed: int | None = None
    method: str = ""  # proxies: the merge method
    tag: str | None = None  # the paper's <family>_<size>_<ft> (base models: <family>_<size>)
    budget: int | None = None  # the paper's experts: their sample count
    domains_used: tuple[str, ...] = ()  # the domains the model was trained on (experts: its domain)


def parse_model_name(
    name: str,
    domains: Sequence[str] | None = None,
    *,
    budget: int | None = None,
    candidates: Sequence[Mixture] = (),
) -> ModelName:
    """What a model folder name says (see the module docstring); refuses names it cannot read.

    ``budget`` and ``candidates`` turn the paper's sample counts into weights (see the module docstring).
    """
    if name.endswith(_HF) and len(name) > len(_HF):
        name = name[: -len(_HF)]
    if name in _BASE_NAMES:
        return ModelName("base", "base", tag=_BASE_NAMES[name])
    paper = read_paper_name(name)
    if paper is not None:
        return _paper_model(name, paper, domains, budget, candidates)
    name, seed = split_seed(name)
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
        raise UnknownModelName(f"cannot tell which model {name!r} is: {_NAMING_HELP}") from None
    used = [d for d, w in mixture.as_dict().items() if w > 0]
    if len(used) == 1:
        return _expert(used[0], seed, domains, name)
    if domains is not None:
        try:
            mixture = Mixture.from_mapping(mixture.as_dict(), list(domains), tolerance=mixture.tolerance)
        except DmoError as exc:
            raise DmoError(f"model folder {name!r}: {exc}") from None
    return ModelName("trained", mixture.id, mixture, seed if seed is not None else 0, domains_used=tuple(used))


def _paper_model(
    name: str, p: PaperName, domains: Sequence[str] | None, budget: int | None, candidates: Sequence[Mixture]
) -> ModelName:
    if p.kind == "expert":
        ((domain, n),) = p.counts.items()
        if budget is not None and n != budget:
            raise DmoError(f"model folder {name!r}: an expert of {n} samples, but the budget is {budget}")
        return ModelName("expert", domain, tag=p.tag, budget=n, domains_used=(domain,))
    if p.kind == "trained" and len(p.counts) == 1:  # trained on one domain only: an expert, if on the whole budget
        ((domain, n),) = p.counts.items()
        if budget is not None and n != budget:
            raise DmoError(f"model folder {name!r}: trained on {n} samples of one domain, not the budget {budget}")
        return ModelName("expert", domain, tag=p.tag, domains_used=(domain,))
    mixture = paper_mixture(p.counts, domains, budget, candidates, name)
    seed = (p.seed or 0) if p.kind == "trained" else None
    return ModelName(p.kind, mixture.id, mixture, seed, p.method, p.tag, domains_used=tuple(sorted(p.counts)))


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
    return ModelName("expert", domain, None, seed, domains_used=(domain,))


@dataclass
class Found:
    model: str
    benchmark: str  # the benchmark recorded (dmo's task name for the paper's lenient benchmarks)
    path: Path
    parsed: ModelName
    task: str = ""  # the lmms-eval task the results file reports (the benchmark folder's name)

    def __post_init__(self) -> None:
        self.task = self.task or self.benchmark


@dataclass
class Scan:
    """What a results tree holds: the newest file per (model, benchmark), the unknown folders, and what was skipped."""

    found: list[Found] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    budget: int | None = None


def newest(files: Sequence[Path]) -> Path:
    """The newest lmms-eval results file: by the date in its name (``20250101_120000_results.json``), else mtime."""

    def key(p: Path) -> tuple[str, int]:
        m = _DATE.match(p.name)
        return (m.group(1) if m else "", p.stat().st_mtime_ns)

    return max(files, key=key)


def _dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _rel(path: Path, root: Path) -> str:
    return os.path.relpath(path, root)


def model_folders(root: Path) -> tuple[list[Path], Path | None]:
    """The model folders under ``root`` and the paper's ``base_models`` folder to look in, if any."""
    root = Path(root)
    if not root.is_dir():
        raise DmoError(f"{root} is not a folder: give the folder of lmms-eval outputs (<root>/<model>/<benchmark>/)")
    children = _dirs(root)
    experiments = [c for c in children if c.name.startswith(_EXPERIMENT)]
    if experiments and all(c.name.startswith(_EXPERIMENT) or c.name == _BASE_MODELS for c in children):
        if len(experiments) > 1:  # the paper's eval_bench/ with several experiments: never mix them
            names = ", ".join(c.name for c in experiments)
            raise DmoError(
                f"{root} holds {len(experiments)} of the paper's experiments ({names}): ingest one at a time, e.g. "
                f"dmo ingest {root / experiments[0].name}"
            )
        base_models = root / _BASE_MODELS
        return _dirs(experiments[0]), base_models if base_models.is_dir() else None
    sibling = root.parent / _BASE_MODELS
    if root.name.startswith(_EXPERIMENT) and sibling.is_dir():
        return children, sibling
    return children, None


def scan(
    root: Path,
    domains: Sequence[str] | None = None,
    *,
    budget: int | None = None,
    candidates: Sequence[Mixture] = (),
    metric_map: Mapping[str, MetricSpec] | None = None,
) -> Scan:
    """Every (model, benchmark) under ``root`` with its newest results file, and every folder it cannot read.

    Refuses a model or benchmark folder without a results file, and models of several of the paper's base models.
    """
    root = Path(root)
    folders, base_models = model_folders(root)
    candidates = [*candidates, *paper_mixtures()]
    if not folders:
        raise DmoError(f"no model folders under {root}: expected {root}/<model>/<benchmark>/**/{RESULTS_GLOB}")
    out = Scan()
    explicit = domains is not None
    # First pass (no weights yet): what every folder is, the experiment's base model, the experts' budget.
    first: dict[Path, ModelName] = {}
    for folder in folders:
        try:
            first[folder] = parse_model_name(folder.name)
        except DmoError as exc:
            why = "" if isinstance(exc, UnknownModelName) else f" ({exc})"  # the naming help is said once, at the end
            out.unknown.append(f"model folder {_rel(folder, root)}{why}")
    tags = sorted({p.tag for p in first.values() if p.tag is not None and p.kind != "base"})
    if len(tags) > 1:
        raise DmoError(
            f"{root} holds models of several of the paper's base models or methods ({', '.join(tags)}): "
            "ingest each experiment's folder on its own"
        )
    tag = tags[0] if tags else None
    base_key = tag.rsplit("_", 1)[0] if tag is not None else None
    if base_models is not None and base_key in PAPER_BASES:
        for name in (PAPER_BASES[base_key], PAPER_BASES[base_key] + _HF):
            if (base_models / name).is_dir():
                folders.append(base_models / name)
                first[base_models / name] = ModelName("base", "base", tag=base_key)
    budgets = sorted({p.budget for p in first.values() if p.kind == "expert" and p.budget is not None})
    if len(budgets) > 1:
        raise DmoError(f"the experts under {root} were trained on different budgets ({budgets}): ingest them apart")
    if budgets:
        if budget is not None and budget != budgets[0]:
            raise DmoError(
                f"the experts under {root} were trained on {budgets[0]} samples, not the budget {budget} (given, "
                f"or the manifest's): pass --budget {budgets[0]} if that is the experiment's"
            )
        budget = budgets[0]
    out.budget = budget
    bases = [f for f, p in first.items() if p.kind == "base"]
    if base_key is not None:
        other = [f for f in bases if first[f].tag not in (None, base_key)]
        for f in other:
            out.notes.append(f"skipped {_rel(f, root)}: the base model of other experiments, not of {tag}")
        bases = [f for f in bases if f not in other]
    elif len({first[f].tag for f in bases}) > 1:
        names = ", ".join(_rel(f, root) for f in bases)
        raise DmoError(f"several base models under {root} ({names}): keep the one these models were trained from")
    if domains is None:  # every domain named under root, so that trained mixture ids are comparable
        named: set[str] = set()
        for p in first.values():
            named |= set(p.domains_used)
        domains = sorted(named)
    # Second pass: weights, and the domains' filter.
    by_model: dict[tuple[Any, ...], dict[str, list[Path]]] = {}
    info: dict[tuple[Any, ...], tuple[str, ModelName]] = {}
    for folder in folders:
        if folder not in first or (first[folder].kind == "base" and folder not in bases):
            continue
        if explicit and any(d not in domains for d in first[folder].domains_used):
            outside = sorted(set(first[folder].domains_used) - set(domains))
            out.notes.append(f"skipped {_rel(folder, root)}: trained on {', '.join(outside)}, outside {list(domains)}")
            continue
        try:
            parsed = parse_model_name(folder.name, domains, budget=budget, candidates=candidates)
        except DmoError as exc:
            out.unknown.append(f"model folder {_rel(folder, root)} ({exc})")
            continue
        ident = (parsed.kind, parsed.label, parsed.seed, parsed.method)
        info.setdefault(ident, (folder.name.removesuffix(_HF), parsed))
        benches = by_model.setdefault(ident, {})
        subs = _dirs(folder)
        if not subs:
            raise DmoError(
                f"model folder {folder} has no benchmark folders: expected {folder}/<benchmark>/**/{RESULTS_GLOB}"
            )
        for b in subs:
            if _CHECKPOINT.match(b.name):
                out.notes.append(f"skipped {_rel(b, root)}: an intermediate checkpoint, not the finished model")
                continue
            files = [f for f in b.rglob(RESULTS_GLOB) if f.is_file()]
            if not files:
                raise DmoError(
                    f"no lmms-eval results JSON (*_results.json) under {b}: did that evaluation finish? remove the "
                    "folder or re-run it"
                )
            benches.setdefault(b.name, []).extend(files)
    for ident, benches in by_model.items():
        model, parsed = info[ident]
        for task, files in sorted(benches.items()):
            try:
                metric_spec(task, metric_map)
            except DmoError:
                out.unknown.append(f"benchmark folder {task!r} (of {model}): no metric map entry")
                continue
            out.found.append(Found(model, DMO_TASK_OF.get(task, task), newest(files), parsed, task))
    return out


def _read_json(path: Path) -> Mapping[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DmoError(f"cannot read lmms-eval results {path}: {exc}") from None
    if not isinstance(data, dict):
        raise DmoError(f"{path} is not an lmms-eval results file (expected a JSON object)")
    return data


def unknown_error(root: Path, unknown: Iterable[str]) -> DmoError:
    items = list(unknown)
    return DmoError(
        f"{len(items)} unknown folder(s) under {root}, nothing ingested: {'; '.join(items)}. To ingest a model, "
        f"{_NAMING_HELP}; to ingest a benchmark, add it to the metric map; or pass --skip-unknown to ingest the rest"
    )


def ingest_rows(
    root: Path,
    *,
    domains: Sequence[str] | None = None,
    group: str = "",
    metric_map: Mapping[str, MetricSpec] | None = None,
    budget: int | None = None,
    candidates: Sequence[Mixture] = (),
    skip_unknown: bool = False,
    report: list[str] | None = None,
) -> list[ScoreRow]:
    """The results table rows of every (model, benchmark) under ``root``; raises before returning any if one is bad.

    ``root`` a dmo run folder (``dmo train``'s ``--out``): the ``loss:<domain>`` rows of its finished runs instead
    (:mod:`dmo.groundtruth.trainer_losses`).

    Unknown folders raise (listing them all) unless ``skip_unknown``; ``report`` receives what was skipped.
    """
    from dmo.groundtruth.trainer_losses import is_run_folder, loss_rows

    root = Path(root)
    if is_run_folder(root):  # a dmo run folder: LLaMA-Factory's validation losses of its runs
        return loss_rows(root, domains=domains, group=group, report=report)
    found = scan(root, domains, budget=budget, candidates=candidates, metric_map=metric_map)
    if found.unknown and not skip_unknown:
        raise unknown_error(root, found.unknown)
    if report is not None:
        report.extend(found.notes)
        report.extend(f"skipped unknown {u}" for u in found.unknown)
    rows = []
    for f in found.found:
        data = _read_json(f.path)
        try:
            score = score_from_results(f.task, data, metric_map)
        except DmoError as exc:
            raise DmoError(f"{f.path}: {exc}") from None
        spec = metric_spec(f.task, metric_map)
        p = f.parsed
        parts: dict[str, Any] = dict(
            source=INGEST_VERSION, kind=p.kind, model=p.label, seed=p.seed, benchmark=f.benchmark, group=group
        )
        if p.method:  # proxies of several merge methods of one mixture are different models
            parts["method"] = p.method
        rows.append(
            ScoreRow(
                kind=p.kind,  # type: ignore[arg-type]
                mixture=p.label,
                benchmark=f.benchmark,
                score=score,
                metric="+".join(spec.keys),
                weights=p.mixture.as_dict() if p.mixture is not None else {},
                group=group,
                method=p.method,
                seed=p.seed,
                source=f"lmms-eval:{_rel(f.path, root)}",
                fingerprint=hashlib.sha256(f.path.read_bytes()).hexdigest()[:16],
                key=cache_key(**parts),
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
    budget: int | None = None,
    candidates: Sequence[Mixture] = (),
    skip_unknown: bool = False,
    report: list[str] | None = None,
) -> tuple[list[ScoreRow], int]:
    """Append the rows of ``root`` that the table does not hold yet; returns (new rows, rows already there)."""
    rows = ingest_rows(
        Path(root),
        domains=domains,
        group=group,
        metric_map=metric_map,
        budget=budget,
        candidates=candidates,
        skip_unknown=skip_unknown,
        report=report,
    )
    have = {(r.get("key"), r.get("fingerprint")) for r in table.records() if r.get("status") == "ok"}
    new = [r for r in rows if (r.key, r.fingerprint) not in have]
    if new and not dry_run:
        table.append(new)
    return new, len(rows) - len(new)
