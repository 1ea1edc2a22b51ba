"""Ground truth by LLaMA-Factory: training YAMLs for experts and mixtures, local runs or a SLURM array, registration.

LLaMA-Factory 0.9.5 pins transformers<=5.6, peft<=0.18.1 and datasets<=4.0, so it never shares dmo's environment:
dmo writes its YAML files and runs ``llamafactory-cli train`` (``--lf-bin``) from LLaMA-Factory's own venv
(``scripts/install_llamafactory.sh``). Every YAML is checked first by LLaMA-Factory's own parser, in that venv:
``get_train_args`` (unknown keys, inconsistent values), the template name against ``TEMPLATES`` and the datasets
against ``get_dataset_list`` (which ``get_train_args`` does not check).

A *run folder* (``--out``) holds everything about one set of trainings::

    plan.json                          base, template, method, budget, and one entry per run
    configs/<run>.yaml                 the LLaMA-Factory training config of each run
    logs/<run>.log                     its output
    .partial/<run>/                    LLaMA-Factory's output_dir while training (checkpoints make it resumable)
    experts/<domain>/                  a finished expert (moved here only once complete)
    mixtures/<mixture id>/seed<N>/     a finished model trained on an exact mixture
    mixtures-interleave/<id>/seed<N>/  the same, trained with LLaMA-Factory's interleave_under mixing
    train_<what>.sbatch, slurm/        with --slurm: the array script and its job list

A finished run is registered: experts into the expert manifest(s) (``experts/<name>.yaml``), trained mixtures into
that manifest's ``trained:`` list (``experts/<name>-interleave.yaml`` for interleave-mixed ones: the two strategies
are two different ground truths sharing the experts). Their scores enter the results table as ``trained`` rows once
scored (``dmo study``, or ``dmo ingest`` for lmms-eval runs made elsewhere).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dmo.atomic import explain_os_error, replace_dir
from dmo.errors import DmoError
from dmo.groundtruth.data_mix import (
    SHAREGPT_ENTRY,
    DataFolder,
    MixRecord,
    Strategy,
    prepare,
    source_pools,
    source_val_pools,
    val_name,
)
from dmo.groundtruth.recipe import DEFAULT_LF_BIN, Recipe
from dmo.groundtruth.register import register
from dmo.groundtruth.runs import Run, RunFolder, expert_run, is_complete, mixture_run
from dmo.mixture import Mixture
from dmo.paths import safe_name

# ------------------------------------------------------------------------------------------------ validation

_VALIDATOR = r"""
import json, os, sys
payload = json.load(sys.stdin)
configs, dataset_info = payload["configs"], payload.get("dataset_info")
results = {}
try:
    import torch
    from llamafactory.data.parser import get_dataset_list
    from llamafactory.data.template import TEMPLATES
    from llamafactory.hparams import get_train_args
except BaseException as exc:  # the environment itself is broken
    print("@@DMO@@" + json.dumps({"*": f"cannot import LLaMA-Factory: {type(exc).__name__}: {exc}"}), flush=True)
    sys.exit(0)
for name, cfg in configs.items():
    try:
        template = cfg.get("template")
        if template not in TEMPLATES:
            import difflib
            close = difflib.get_close_matches(str(template), list(TEMPLATES), n=4, cutoff=0.5) or sorted(TEMPLATES)[:6]
            raise ValueError(f"unknown template {template!r}: did you mean {' or '.join(close)}?")
        names = [d.strip() for d in str(cfg.get("dataset", "")).split(",") if d.strip()]
        names += [d.strip() for d in str(cfg.get("eval_dataset") or "").split(",") if d.strip()]
        # dataset_info: what dataset_info.json will hold once dmo has written the mixtures these configs train on
        get_dataset_list(names, dataset_info if dataset_info is not None else cfg.get("dataset_dir", "data"))
        check = dict(cfg)
        if not torch.cuda.is_available() and (check.get("bf16") or check.get("fp16")):
            # No GPU where dmo runs (a login node): mixed precision is checked by LLaMA-Factory when it trains.
            check.update(bf16=False, fp16=False, use_cpu=True)
        get_train_args(check)
        results[name] = None
    except BaseException as exc:
        results[name] = f"{type(exc).__name__}: {exc}"
print("@@DMO@@" + json.dumps(results), flush=True)
"""


def lf_python(lf_bin: Path) -> Path:
    """The Python interpreter of the venv that ``llamafactory-cli`` belongs to (its shebang, else its sibling)."""
    lf_bin = Path(lf_bin)
    try:
        first = lf_bin.read_bytes()[:512].split(b"\n", 1)[0].decode()
    except OSError:
        first = ""
    if first.startswith("#!"):
        cand = Path(shlex.split(first[2:].strip())[0])
        if cand.name != "env" and cand.exists():
            return cand
    sibling = lf_bin.parent / "python"
    if sibling.exists():
        return sibling
    raise DmoError(f"cannot find the Python of {lf_bin}: pass the llamafactory-cli of a venv (--lf-bin)")


def check_lf_bin(lf_bin: Path | None) -> Path:
    path = Path(lf_bin) if lf_bin is not None else DEFAULT_LF_BIN
    if not path.is_file() or not os.access(path, os.X_OK):
        hint = (
            "fix --lf-bin"
            if lf_bin is not None
            else ("run 'bash scripts/install_llamafactory.sh' (it makes .venv-lf) or pass --lf-bin")
        )
        raise DmoError(f"LLaMA-Factory not found: {path} is not an executable llamafactory-cli; {hint}")
    return path.absolute()


def validate(
    configs: Mapping[str, dict[str, Any]],
    lf_bin: Path,
    dataset_info: Mapping[str, Any] | None = None,
    timeout: float = 900,
) -> None:
    """Check every config with LLaMA-Factory's own parser, in its venv; raise on the first bad one.

    ``dataset_info`` stands in for the configs' ``dataset_info.json`` (the datasets they name may not be written yet).
    """
    if not configs:
        return
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "DISABLE_VERSION_CHECK": "1", "LLAMAFACTORY_VERBOSITY": "WARN"}
    try:
        proc = subprocess.run(
            [str(lf_python(lf_bin)), "-c", _VALIDATOR],
            input=json.dumps({"configs": dict(configs), "dataset_info": dataset_info}),
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise DmoError(
            f"LLaMA-Factory's config check did not finish in {timeout:.0f} s: is {lf_bin} working?"
        ) from None
    except OSError as exc:
        raise DmoError(f"cannot run LLaMA-Factory's Python for {lf_bin}: {exc.strerror or exc}") from None
    marked = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@DMO@@")]
    if not marked:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise DmoError(f"LLaMA-Factory's config check failed (exit {proc.returncode}): {tail}")
    results = json.loads(marked[-1][len("@@DMO@@") :])
    if results.get("*"):
        raise DmoError(f"{lf_bin}: {results['*']}; reinstall with 'bash scripts/install_llamafactory.sh'")
    for name, error in results.items():
        if error:
            raise DmoError(f"LLaMA-Factory refuses the config of run {name}: {error}")


# ------------------------------------------------------------------------------------------------ planning


@dataclass
class Planned:
    folder: RunFolder
    runs: list[Run]
    notes: list[str]
    validated: bool


def default_manifest(name: str, strategy: str = "exact") -> Path:
    return Path("experts") / (f"{name}.yaml" if strategy == "exact" else f"{name}-{strategy}.yaml")


def plan_runs(
    kind: Literal["experts", "mixtures"],
    recipe: Recipe,
    *,
    data: Path,
    out: Path,
    domains: Sequence[str] = (),
    mixtures: Sequence[Mixture] = (),
    seeds: Sequence[int] = (0,),
    strategy: Strategy = "exact",
    data_seed: int = 0,
    allow_repeats: bool = False,
    manifest: Path | None = None,
    name: str | None = None,
    lf_bin: Path | None = None,
) -> Planned:
    """Write the training sets (where missing), the configs and the plan of expert or mixture runs.

    ``data`` is a dmo data folder (``dmo data mix``), whose new mixtures are added to it, or per-domain source data,
    converted into ``<out>/data``. Everything is read and checked first, the configs by LLaMA-Factory's parser when
    ``lf_bin`` exists here, so a refusal writes nothing.
    """
    folder = RunFolder(out)
    name = safe_name(name or folder.root.name, "manifest name")
    folder.check_compatible(recipe)
    if not seeds or len(set(seeds)) != len(seeds):
        raise DmoError(f"give one or more distinct seeds, got {list(seeds)}")
    if kind == "experts":
        if not domains:
            raise DmoError("no domains given: pass --domains general,ocr")
        if len(seeds) != 1:
            raise DmoError("experts are trained with one seed: pass a single --seeds value")
        targets = [Mixture((d,), (1.0,)) for d in domains]
        strategy = "exact"  # an expert trains on `budget` rows of its domain, drawn like an exact mixture's
    else:
        if not mixtures:
            raise DmoError("no mixtures given: pass --mixture general=0.25,ocr=0.75 (repeatable) or a search space")
        targets = list(mixtures)
    needed = sorted({d for m in targets for d, n in m.counts(recipe.budget).items() if n > 0})
    if not needed:
        raise DmoError(f"every mixture rounds to 0 samples at budget {recipe.budget}: raise --budget")
    manifest = Path(manifest if manifest is not None else default_manifest(name, strategy)).absolute()

    # Read and check everything first.
    given = DataFolder(data)
    val_pools = None
    if given.is_dmo():
        data_folder, pools, sizes = given, None, given.pool_sizes(needed)
        with_val = set(given.val_domains())
    else:
        data_folder = DataFolder(folder.root / "data")
        pools, sizes = source_pools(Path(data), needed, None)
        val_pools = source_val_pools(Path(data), needed, None)
        with_val = set(val_pools) | set(data_folder.val_domains())
    plans = [
        data_folder.plan_mix(m, recipe.budget, sizes, seed=data_seed, strategy=strategy, allow_repeats=allow_repeats)
        for m in targets
    ]
    runs: list[Run] = []
    for m, (record, _) in zip(targets, plans):
        for seed in seeds:
            if kind == "experts":
                runs.append(expert_run(m.domains[0], record, manifest, seed))
            else:
                runs.append(mixture_run(record, manifest, seed))
    notes = _wire_validation(runs, plans, with_val)
    configs = {
        r.name: recipe.config(
            dataset_dir=data_folder.root, data=r.data, output_dir=folder.root / r.partial, seed=r.seed, run=r.name
        )
        for r in runs
    }
    validated = False
    if lf_bin is not None and Path(lf_bin).is_file():
        info = data_folder.info()
        info.update({d: {"file_name": f"domains/{d}.jsonl", **SHAREGPT_ENTRY} for d in needed})
        info.update({val_name(d): {"file_name": f"validation/{d}.jsonl", **SHAREGPT_ENTRY} for d in with_val})
        for record, picked in plans:
            if picked is not None:
                info[record.name] = {"file_name": f"mixtures/{record.name}.jsonl", **SHAREGPT_ENTRY}
        validate(configs, Path(lf_bin), dataset_info=info)
        validated = True

    # Then write: the pools and mixtures, the configs, the plan.
    if pools is not None:
        prepare(Path(data), data_folder.root, needed, pools=pools, val_pools=val_pools)
    with data_folder.locked():
        for record, picked in plans:
            data_folder.write_mix(record, picked)
    with folder.locked():
        folder.add(recipe, runs, configs, name)
    notes = [n for record, _ in plans for n in record.notes()] + notes
    return Planned(folder, runs, notes, validated)


def _wire_validation(runs: Sequence[Run], plans: Sequence[tuple[MixRecord, Any]], with_val: set[str]) -> list[str]:
    """Give each run whose domains all have a validation split LLaMA-Factory's ``eval_dataset``; say who has none."""
    counts = {record.mixture: record.counts for record, _ in plans}
    notes: list[str] = []
    lacking: set[str] = set()
    for run in runs:
        domains = sorted(d for d, n in counts[run.mixture].items() if n > 0)
        if all(d in with_val for d in domains):
            run.data["eval_dataset"] = ",".join(val_name(d) for d in domains)
        else:
            lacking |= {d for d in domains if d not in with_val}
    if lacking:
        which = ", ".join(sorted(lacking))
        notes.append(
            f"no validation split for domain(s) {which}: runs on them train without LLaMA-Factory's evaluation "
            "(add <domain>/val.jsonl beside the training data to evaluate as the paper does)"
        )
    return notes


# ------------------------------------------------------------------------------------------------ running


@dataclass
class RunResult:
    run: Run
    seconds: float
    skipped: bool = False  # already finished


def train_runs(
    folder: RunFolder,
    lf_bin: Path | None,
    *,
    only: Sequence[str] | None = None,
    overwrite: bool = False,
    validate_first: bool = True,
    echo: Callable[[str], None] = print,
) -> list[RunResult]:
    """Train the planned runs (``only`` these names) one after another with ``llamafactory-cli train``.

    ``lf_bin`` None is the default LLaMA-Factory venv's. A finished run is skipped unless ``overwrite``; a run killed
    half-way resumes from its last checkpoint. Each finished run is moved from ``.partial/`` into place and registered
    at once, so a later failure loses nothing.
    """
    lf_bin = check_lf_bin(lf_bin)
    runs = folder.runs()
    if only:
        unknown = [n for n in only if n not in runs]
        if unknown:
            raise DmoError(f"run {unknown[0]!r} is not planned in {folder.root}: planned are {sorted(runs)}")
        runs = {n: runs[n] for n in only}
    todo = [r for r in runs.values() if overwrite or not folder.finished(r)]
    if validate_first and todo:
        validate({r.name: folder.config_of(r) for r in todo}, lf_bin)
    method = folder.recipe_header()["method"]
    results = [RunResult(r, 0.0, skipped=True) for r in runs.values() if r not in todo]
    for i, run in enumerate(todo, 1):
        partial = folder.root / run.partial
        log = folder.root / run.log
        t0 = time.perf_counter()
        if not is_complete(partial, method):
            echo(f"[{i}/{len(todo)}] training {run.name} (log: {log})")
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "w") as fh:
                proc = subprocess.run(
                    [str(lf_bin), "train", str(folder.root / run.config)],
                    cwd=folder.root,
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            if proc.returncode != 0 or not is_complete(partial, method):
                raise DmoError(
                    f"training run {run.name} failed (exit {proc.returncode}): {_last_error(log)}; full log: {log}"
                )
        _finish(partial, folder.root / run.output)
        seconds = time.perf_counter() - t0
        results.append(RunResult(run, seconds))
        echo(f"[{i}/{len(todo)}] {run.name} finished in {seconds:.1f} s -> {folder.root / run.output}")
        register(folder, echo=echo)
    return results


def _last_error(log: Path) -> str:
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    for ln in reversed(lines):
        if "Error" in ln or "error:" in ln.lower():
            return ln[:300]
    return lines[-1][:300] if lines else "no output"


def _finish(partial: Path, output: Path) -> None:
    """Drop the resumption checkpoints and move the finished run into place (atomically)."""
    for ckpt in partial.glob("checkpoint-*"):
        shutil.rmtree(ckpt, ignore_errors=True)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        replace_dir(partial, output)
    except OSError as exc:
        raise explain_os_error(exc, output) from exc
