"""LLaMA-Factory's per-domain validation losses of a run folder's finished runs, as ``loss:<domain>`` rows.

A dmo run folder (``dmo train experts|mixtures``, :mod:`dmo.groundtruth.llamafactory`) trains with
``eval_on_each_dataset`` whenever every domain of a run has a validation split (``<domain>-val``), so LLaMA-Factory
reports one validation loss per domain: ``eval_<domain>-val_loss``. The final model's losses are in its output
folder: ``all_results.json`` (written after the last evaluation), else ``eval_results.json``, else the
``log_history`` entry of ``trainer_state.json`` at the last step (an evaluation that ran at an earlier step is
not the final model's: skipped, and said). Each becomes the score of benchmark ``loss:<domain>``,
``exp(-loss)``, as :mod:`dmo.scoring.loss` defines it, so the trained models need not be scored again for it.

A run reports losses on its own domains only (an expert on its domain, a mixture on the domains it was trained on).
LLaMA-Factory's number is the Trainer's evaluation loss: the mean over evaluation batches of each batch's mean
answer-token loss, where dmo's own ``loss:<domain>`` pools every answer token of the split; the two agree up to
that batching (and up to LLaMA-Factory's template, where dmo uses the base's chat template).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dmo.errors import DmoError
from dmo.groundtruth.recipe import PLAN
from dmo.groundtruth.runs import RunFolder
from dmo.mixture import Mixture
from dmo.results import ScoreRow, cache_key

SOURCE = "llamafactory-val-loss-v1"
#: LLaMA-Factory's key of a domain's validation loss (its eval dataset ``<domain>-val``, dmo.groundtruth.data_mix)
_LOSS_KEY = re.compile(r"^eval_(?P<domain>[a-z][a-z0-9_]{0,31})-val_loss$")
#: the files that hold the final model's metrics, in the order they are read
FINAL_FILES = ("all_results.json", "eval_results.json")
STATE_FILE = "trainer_state.json"


def is_run_folder(root: Path) -> bool:
    return (Path(root) / PLAN).is_file()


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DmoError(f"cannot read {path}: {exc}") from None


def _losses(metrics: Any) -> dict[str, float]:
    out = {}
    for key, value in (metrics if isinstance(metrics, dict) else {}).items():
        m = _LOSS_KEY.match(str(key))
        if m and isinstance(value, (int, float)) and math.isfinite(value):
            out[m["domain"]] = float(value)
    return out


def final_losses(folder: Path) -> tuple[dict[str, float], Path | None, str]:
    """The final model's validation loss per domain in a finished run's output folder, the file it came from, and
    why there is none (empty when found)."""
    for name in FINAL_FILES:
        path = folder / name
        if path.is_file():
            found = _losses(_read(path))
            if found:
                return found, path, ""
    path = folder / STATE_FILE
    if not path.is_file():
        return {}, None, f"no {' / '.join(FINAL_FILES)} or {STATE_FILE} with eval_<domain>-val_loss"
    state = _read(path)
    history = state.get("log_history") or [] if isinstance(state, dict) else []
    last = state.get("global_step") if isinstance(state, dict) else None
    evals = [e for e in history if isinstance(e, dict) and _losses(e)]
    if not evals:
        return {}, None, f"{STATE_FILE} has no eval_<domain>-val_loss (was it trained with validation splits?)"
    final = [e for e in evals if e.get("step") == last]
    if not final:
        return {}, None, f"its last validation loss is from step {evals[-1].get('step')}, not the final step {last}"
    last_losses: dict[str, float] = {}
    for entry in final:  # one entry per domain when each is evaluated on its own
        last_losses.update(_losses(entry))
    return last_losses, path, ""


def loss_rows(
    root: Path, *, domains: Sequence[str] | None = None, group: str = "", report: list[str] | None = None
) -> list[ScoreRow]:
    """``loss:<domain>`` rows of every finished run of the run folder ``root`` (experts and trained mixtures).

    Trained mixtures get one weight per domain of ``domains`` (default: every domain of the folder's runs), so that
    their ids match the proxies'; a run over other domains (or an expert of another domain) is skipped, and said in
    ``report``, as is an unfinished run or one without losses. Mixtures trained with ``interleave`` mixing are
    another ground truth (they have their own manifest): skipped, and said.
    """
    from dmo.scoring.loss import METRIC, PREFIX  # (imports torch)

    folder = RunFolder(root)
    runs = folder.runs()
    if domains is None:
        domains = list(dict.fromkeys(d for r in runs.values() for d in r.weights))
    notes = report if report is not None else []
    rows = []
    for run in runs.values():
        out = folder.root / run.output
        if run.kind == "trained" and run.strategy != "exact":
            # another ground truth (registered in its own manifest): its rows would mix with the exact runs'
            notes.append(f"run {run.name}: trained with {run.strategy} mixing, not the exact mixture, skipped")
            continue
        if not folder.finished(run):
            notes.append(f"run {run.name}: not finished ({out} is incomplete), skipped")
            continue
        losses, path, why = final_losses(out)
        if path is None:
            notes.append(f"run {run.name}: {why}, skipped")
            continue
        if run.kind == "expert":
            assert run.domain is not None
            if run.domain not in domains:
                notes.append(f"run {run.name}: an expert of another domain than {', '.join(domains)}, skipped")
                continue
            label, weights, seed = run.domain, {}, None
        else:
            try:
                mixture = Mixture.from_mapping({d: w for d, w in run.weights.items() if w > 0}, domains)
            except DmoError:
                notes.append(f"run {run.name}: trained on other domains than {', '.join(domains)}, skipped")
                continue
            label, weights, seed = mixture.id, mixture.as_dict(), run.seed
        fingerprint = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        for domain, loss in sorted(losses.items()):
            benchmark = f"{PREFIX}{domain}"
            key = cache_key(source=SOURCE, kind=run.kind, model=label, seed=seed, benchmark=benchmark)
            source = f"llamafactory:{path.relative_to(folder.root)}"
            row = ScoreRow(run.kind, label, benchmark, math.exp(-loss), METRIC, weights, group, seed=seed, key=key)
            row.source, row.fingerprint = source, fingerprint
            rows.append(row)
    return rows
