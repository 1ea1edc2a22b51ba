"""Command line of the ground truth: ``dmo data mix|name``, ``dmo train experts|mixtures|run|register``, ``dmo ingest``.

Kept apart from :mod:`dmo.cli`, which mounts these; like it, only argument parsing and printing live here.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_type_hints

import typer
from rich.console import Console
from rich.table import Table

from dmo.errors import DmoError
from dmo.presets import PAPER_BUDGET

if TYPE_CHECKING:
    from dmo.groundtruth.data_mix import Strategy
    from dmo.groundtruth.llamafactory import Planned
    from dmo.groundtruth.recipe import Recipe
    from dmo.manifest import FinetuneKind

data_app = typer.Typer(help="Training sets of data mixtures, in LLaMA-Factory's dataset format.", no_args_is_help=True)
train_app = typer.Typer(
    help="Ground truth: train experts and models on mixtures with LLaMA-Factory (locally or as a SLURM array).",
    no_args_is_help=True,
)
console = Console()
err = Console(stderr=True)

_BUDGET_HELP = f"Training samples per model (the paper: {PAPER_BUDGET} = 800 steps x 128)."


def _mixtures(texts: list[str], space: Path | None) -> tuple[list, list[str] | None]:
    """Mixtures from --mixture texts (weights, ids or paper names) and/or a search space's candidates."""
    from dmo.groundtruth.data_mix import read_name

    domains = None
    out = []
    if space is not None:
        from dmo.config import load_space

        sp = load_space(space)
        domains = list(sp.domains)
        out += sp.candidates()
    for t in texts:
        out.append(read_name(t, domains))
    return out, domains


def _say(text: str) -> None:
    console.print(text, soft_wrap=True, highlight=False)


def _note(text: str) -> None:
    err.print(f"[yellow]note:[/] {text}", highlight=False, soft_wrap=True)


# ------------------------------------------------------------------------------------------------ dmo data


@data_app.command("mix")
def data_mix(
    data: Annotated[Path, typer.Option(help="Per-domain data: <domain>/train.jsonl or <domain>.json[l] files.")],
    out: Annotated[Path, typer.Option(help="LLaMA-Factory dataset folder to write (dataset_info.json and data).")],
    mixture: Annotated[
        list[str], typer.Option(help="general=0.25,ocr=0.75, an id, or a paper name (repeatable).")
    ] = [],  # noqa: B006
    space: Annotated[Path | None, typer.Option(help="Also every candidate mixture of this search space.")] = None,
    budget: Annotated[int, typer.Option(help=_BUDGET_HELP, min=1)] = PAPER_BUDGET,
    seed: Annotated[int, typer.Option(help="Seed of the sub-sampling and shuffling.")] = 0,
    strategy: Annotated[
        str,
        typer.Option(
            help="exact: n_i = round(w_i * budget) rows per domain; interleave: LLaMA-Factory's "
            "interleave_under (random counts of about w_i * budget, no new files)."
        ),
    ] = "exact",
    allow_repeats: Annotated[
        bool, typer.Option(help="Repeat rows of a domain whose pool is smaller than its count (said when it happens).")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace a mixture made before with other settings.")] = False,
    media_dir: Annotated[
        Path | None, typer.Option(help="Folder that relative image paths start from (default: each file's folder).")
    ] = None,
) -> None:
    """Materialise the training set of each mixture (or its interleave config), with a dataset_info.json entry."""
    from dmo.groundtruth.data_mix import mix

    mixtures, _ = _mixtures(mixture, space)
    records = mix(
        data,
        out,
        mixtures,
        budget,
        seed=seed,
        strategy=_strategy(strategy),
        allow_repeats=allow_repeats,
        overwrite=overwrite,
        media_dir=media_dir,
    )
    table = Table(title=f"{len(records)} mixture(s) in {out} ({strategy}, seed {seed})", title_justify="left")
    for col in ("name", "mixture id", "samples", "LLaMA-Factory keys"):
        table.add_column(col)
    for r in records:
        keys = ", ".join(f"{k}: {v}" for k, v in r.llamafactory.items())
        table.add_row(r.name, r.mixture, str(sum(r.counts.values())), keys)
    console.print(table)
    for r in records:
        for n in r.notes():
            _note(n)
    if strategy == "interleave":
        _note(
            "interleave gives each domain a random count of about w_i * budget, and stops at the first exhausted "
            "domain; the default 'exact' trains on exactly the mixture the proxy merges"
        )


@data_app.command("name")
def data_name(
    text: Annotated[str, typer.Argument(help="A paper name (general-25600++ocr-76800) or a mixture.")],
    budget: Annotated[int, typer.Option(help=_BUDGET_HELP, min=1)] = PAPER_BUDGET,
) -> None:
    """Translate between the paper's names (sample counts) and mixture weights."""
    from dmo.groundtruth.data_mix import mixture_name, read_name

    m = read_name(text)
    weights = ", ".join(f"{d}={w:.6g}" for d, w in m.as_dict().items())
    console.print(f"mixture id: {m.id}\nweights:    {weights}\npaper name: {mixture_name(m, budget)} (budget {budget})")


# ------------------------------------------------------------------------------------------------ dmo train


def _base(text: str) -> str:
    """A local folder (made absolute) or a hub id, as LLaMA-Factory's model_name_or_path."""
    path = Path(text).expanduser()
    if text.startswith(("./", "../", "/", "~")) or path.exists():
        if not path.is_dir():
            raise DmoError(f"base model folder {path} does not exist: give a model folder or a hub id")
        return str(path.resolve())
    return text


def _launch(planned, what: str, training: _Training) -> None:
    from dmo.groundtruth.llamafactory import train_runs
    from dmo.groundtruth.recipe import DEFAULT_LF_BIN
    from dmo.groundtruth.slurm import default_slurm_script, write_slurm

    lf_bin, slurm, slurm_script, plan_only = training.lf_bin, training.slurm, training.slurm_script, training.plan_only

    folder = planned.folder
    for n in planned.notes:
        _note(n)
    _say(f"planned {len(planned.runs)} run(s) in [bold]{folder.root}[/] (configs in {folder.root / 'configs'})")
    if not planned.validated:
        _note(
            f"configs not checked by LLaMA-Factory here ({lf_bin or DEFAULT_LF_BIN} not found); each run checks its own"
        )
    if slurm:
        name = folder.plan().get("name") or folder.root.name
        script = write_slurm(
            folder,
            planned.runs,
            slurm_script or default_slurm_script(what, name),
            lf_bin or DEFAULT_LF_BIN,
            what=what,
            gpus=training.gpus,
            cpus=training.cpus,
            time_limit=training.time_limit,
            partition=training.partition,
            account=training.account,
            sbatch=training.sbatch,
        )
        _say(f"SLURM array script: [bold]{script}[/] ({len(planned.runs)} tasks); submit with: sbatch {script}")
        return
    if plan_only:
        _say(f"run them with: dmo train run {folder.root} --lf-bin {lf_bin or DEFAULT_LF_BIN}")
        return
    results = train_runs(
        folder,
        lf_bin or DEFAULT_LF_BIN,
        only=[r.name for r in planned.runs],
        overwrite=training.overwrite,
        validate_first=False,
        echo=_say,
    )
    skipped = [r.run.name for r in results if r.skipped]
    if skipped:
        _note(f"already finished, not retrained (pass --overwrite to): {', '.join(skipped)}")


_DATA = Annotated[Path, typer.Option(help="Per-domain data, or a dataset folder made by 'dmo data mix'.")]
_OUT = Annotated[Path, typer.Option(help="Run folder: configs, logs, the trained models, plan.json.")]
_BASE = Annotated[str, typer.Option(help="Base model: a local folder or a hub id.")]
_TEMPLATE = Annotated[str, typer.Option(help="LLaMA-Factory chat template: qwen2_vl (Qwen2/2.5-VL), intern_vl, ...")]
_NAME = Annotated[str | None, typer.Option(help="Manifest name (default: the run folder's name).")]
_MANIFEST = Annotated[
    Path | None, typer.Option(help="Expert manifest to register into (default: experts/<name>[-interleave].yaml).")
]
_METHOD = Annotated[str, typer.Option(help="lora or full.")]
_BUDGET = Annotated[int, typer.Option(help=_BUDGET_HELP, min=1)]
_BATCH = Annotated[int, typer.Option(help="Global batch size (steps = budget / batch).", min=1)]
_PDB = Annotated[int, typer.Option(help="Per-device batch size (accumulation makes up the rest).", min=1)]
_GPUS = Annotated[int, typer.Option(help="GPUs per run (LLaMA-Factory uses all it sees).", min=1)]
_DATA_SEED = Annotated[int, typer.Option(help="Seed of the training sets' sub-sampling.")]
_REPEATS = Annotated[bool, typer.Option(help="Repeat rows of a domain too small for its count.")]
_SET = Annotated[
    list[str], typer.Option("--set", help="Extra LLaMA-Factory key=value (repeatable), e.g. use_cpu=true.")
]
_LF_BIN = Annotated[
    Path | None, typer.Option(help="llamafactory-cli of LLaMA-Factory's venv (default: .venv-lf/bin/llamafactory-cli).")
]
_SLURM = Annotated[bool, typer.Option(help="Write a SLURM array script instead of training here.")]
_SCRIPT = Annotated[
    Path | None, typer.Option(help="Where to write it (default: scripts/slurm/train_<what>-<name>.sbatch).")
]
_PLAN_ONLY = Annotated[bool, typer.Option(help="Only write the training sets, configs and plan.")]
_OVERWRITE = Annotated[bool, typer.Option(help="Retrain runs that have finished before.")]
_CPUS = Annotated[int, typer.Option(help="SLURM: CPUs per task.", min=1)]
_TIME = Annotated[str, typer.Option("--time", help="SLURM: time limit per task.")]
_PARTITION = Annotated[str | None, typer.Option(help="SLURM partition.")]
_ACCOUNT = Annotated[str | None, typer.Option(help="SLURM account.")]
_SBATCH = Annotated[list[str], typer.Option(help="Extra #SBATCH option (repeatable), e.g. --sbatch qos=high.")]


@dataclass
class _Training:
    """The options ``dmo train experts`` and ``dmo train mixtures`` share (one definition, see ``_training``)."""

    base: _BASE
    data: _DATA
    out: _OUT
    template: _TEMPLATE = "qwen2_vl"
    name: _NAME = None
    manifest: _MANIFEST = None
    method: _METHOD = "lora"
    budget: _BUDGET = PAPER_BUDGET
    batch: _BATCH = 128
    per_device_batch: _PDB = 4
    gpus: _GPUS = 1
    data_seed: _DATA_SEED = 0
    allow_repeats: _REPEATS = False
    set_: _SET = field(default_factory=list)
    lf_bin: _LF_BIN = None
    slurm: _SLURM = False
    slurm_script: _SCRIPT = None
    plan_only: _PLAN_ONLY = False
    overwrite: _OVERWRITE = False
    cpus: _CPUS = 8
    time_limit: _TIME = "24:00:00"
    partition: _PARTITION = None
    account: _ACCOUNT = None
    sbatch: _SBATCH = field(default_factory=list)

    def recipe(self) -> Recipe:
        from dmo.groundtruth.recipe import Recipe, parse_overrides

        return Recipe(
            base=_base(self.base), template=self.template, method=_method(self.method), budget=self.budget,
            global_batch=self.batch, per_device_batch=self.per_device_batch, gpus=self.gpus,
            overrides=parse_overrides(self.set_),
        )  # fmt: skip

    def plan(self, what: Literal["experts", "mixtures"], **kwargs: Any) -> Planned:
        """Check LLaMA-Factory (unless only planning), then plan the runs."""
        from dmo.groundtruth.llamafactory import check_lf_bin, plan_runs

        recipe = self.recipe()
        if not (self.slurm or self.plan_only):
            self.lf_bin = check_lf_bin(self.lf_bin)
        return plan_runs(
            what, recipe, data=self.data, out=self.out, data_seed=self.data_seed, allow_repeats=self.allow_repeats,
            manifest=self.manifest, name=self.name, lf_bin=self.lf_bin or _default_lf_bin(), **kwargs,
        )  # fmt: skip


def _default(f: Field[Any]) -> Any:
    """A dataclass field's default as a signature default (``inspect.Parameter.empty`` when it is required)."""
    if f.default is not MISSING:
        return f.default
    if callable(f.default_factory):  # not MISSING
        return f.default_factory()
    return inspect.Parameter.empty


def _strategy(text: str) -> Strategy:
    """A --strategy value, checked."""
    if text == "exact":
        return "exact"
    if text == "interleave":
        return "interleave"
    raise DmoError(f"unknown mixing strategy {text!r}: choose exact or interleave")


def _method(text: str) -> FinetuneKind:
    """A --method value, checked."""
    if text == "lora":
        return "lora"
    if text == "full":
        return "full"
    raise DmoError(f"unknown training method {text!r}: choose lora or full")


def _training(command: Callable[..., None]) -> Callable[..., None]:
    """Give a command the shared :class:`_Training` options (after its own) and pass them to it as ``training``."""
    shared = [
        inspect.Parameter(
            f.name,
            inspect.Parameter.KEYWORD_ONLY,
            default=_default(f),
            annotation=f.type,
        )
        for f in fields(_Training)
    ]
    own = [p for p in inspect.signature(command).parameters.values() if p.name != "training"]
    hints = get_type_hints(_Training, include_extras=True)
    for i, p in enumerate(shared):
        shared[i] = p.replace(annotation=hints[p.name])
    own_hints = get_type_hints(command, include_extras=True)
    own = [p.replace(annotation=own_hints[p.name], kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
    required = [p for p in shared if p.default is inspect.Parameter.empty]
    optional = [p for p in shared if p.default is not inspect.Parameter.empty]

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> None:
        training = _Training(**{f.name: kwargs.pop(f.name) for f in fields(_Training)})
        command(training=training, **kwargs)

    # typeshed's function type declares no __signature__, which inspect.signature reads when it is set
    wrapper.__signature__ = inspect.Signature([*required, *own, *optional])  # type: ignore[attr-defined]
    del wrapper.__wrapped__  # typer must read the signature above, not the command's own
    return wrapper


@train_app.command("experts")
@_training
def train_experts(
    training: _Training,
    domains: Annotated[str | None, typer.Option(help="Comma-separated domains (default: all in --data).")] = None,
    seed: Annotated[int, typer.Option(help="Training seed.")] = 0,
) -> None:
    """Train one expert per domain (budget samples of that domain each) and register them in a manifest."""
    from dmo.groundtruth.data_mix import DataFolder
    from dmo.groundtruth.pools import discover_domains

    if domains:
        doms = [d.strip() for d in domains.split(",") if d.strip()]
    else:
        folder = DataFolder(training.data)
        doms = folder.domains() if folder.is_dmo() else discover_domains(training.data)
    _launch(training.plan("experts", domains=doms, seeds=[seed]), "experts", training)


@train_app.command("mixtures")
@_training
def train_mixtures(
    training: _Training,
    space: Annotated[Path | None, typer.Argument(help="Train every candidate mixture of this search space.")] = None,
    mixture: Annotated[
        list[str], typer.Option(help="general=0.25,ocr=0.75, an id, or a paper name (repeatable).")
    ] = [],  # noqa: B006
    seeds: Annotated[str, typer.Option(help="Comma-separated training seeds, one model per mixture and seed.")] = "0",
    strategy: Annotated[
        str,
        typer.Option(
            help="exact (default: exactly round(w_i * budget) rows per domain) or interleave "
            "(LLaMA-Factory's interleave_under, the paper's way)."
        ),
    ] = "exact",
) -> None:
    """Train one model per mixture and seed (the ground truth) and register them in the manifest's trained list."""
    checked = _strategy(strategy)
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise DmoError(f"cannot read --seeds {seeds!r}: give whole numbers such as 0,1") from None
    training.recipe()  # a bad recipe fails before the mixtures are read
    mixtures, _ = _mixtures(mixture, space)
    planned = training.plan("mixtures", mixtures=mixtures, seeds=seed_list, strategy=checked)
    _launch(planned, "mixtures", training)


def _default_lf_bin() -> Path | None:
    from dmo.groundtruth.recipe import DEFAULT_LF_BIN

    return DEFAULT_LF_BIN if DEFAULT_LF_BIN.is_file() else None


@train_app.command("run")
def train_run(
    folder: Annotated[Path, typer.Argument(help="A run folder planned by 'dmo train experts|mixtures'.")],
    run: Annotated[list[str], typer.Option(help="Only this run (repeatable; default: every unfinished one).")] = [],  # noqa: B006
    lf_bin: _LF_BIN = None,
    overwrite: _OVERWRITE = False,
) -> None:
    """Train planned runs (what each SLURM array task calls): check, train, move into place, register."""
    from dmo.groundtruth.llamafactory import train_runs
    from dmo.groundtruth.runs import RunFolder

    results = train_runs(RunFolder(folder), lf_bin, only=run or None, overwrite=overwrite, echo=_say)
    for r in results:
        if r.skipped:
            console.print(f"{r.run.name}: already finished")


@train_app.command("register")
def train_register(folder: Annotated[Path, typer.Argument(help="A run folder.")]) -> None:
    """Register every finished run of a run folder in its expert manifest(s)."""
    from dmo.groundtruth.register import register
    from dmo.groundtruth.runs import RunFolder

    done = register(RunFolder(folder), echo=_note)
    if not done:
        console.print(f"nothing finished to register in {folder}")
    for path, names in done.items():
        console.print(f"{path}: {len(names)} run(s) registered ({', '.join(names)})")


# ------------------------------------------------------------------------------------------------ dmo ingest


def ingest_command(
    root: Annotated[
        Path,
        typer.Argument(
            help="lmms-eval outputs: ROOT/<model>/<benchmark>/**/*_results.json, or the DMO paper's eval_bench/ "
            "(or one experiment folder of it); or a dmo run folder (dmo train --out): LLaMA-Factory's validation "
            "losses of its finished runs as loss:<domain> rows."
        ),
    ],
    results: Annotated[
        Path | None, typer.Option(help="Results table (folder or scores.jsonl; default: results/<space>).")
    ] = None,
    space: Annotated[
        Path | None, typer.Option(help="Search space: its domains, name (group), candidates and results folder.")
    ] = None,
    manifest: Annotated[Path | None, typer.Option(help="Expert manifest whose domains the mixtures use.")] = None,
    domains: Annotated[str | None, typer.Option(help="Comma-separated domains of the mixtures.")] = None,
    group: Annotated[str | None, typer.Option(help="Group recorded in the rows (default: the space's name).")] = None,
    metric_map: Annotated[
        Path | None, typer.Option(help="Metric map YAML (default: dmo/scoring/metrics.yaml).")
    ] = None,
    budget: Annotated[
        int | None,
        typer.Option(
            min=1, help="Training samples per model, for the paper's names (default: its experts' n or the manifest's)."
        ),
    ] = None,
    skip_unknown: Annotated[
        bool, typer.Option(help="Skip folders whose names or benchmarks are unknown (listed) and ingest the rest.")
    ] = False,
    dry_run: Annotated[bool, typer.Option(help="Read and check everything, write nothing.")] = False,
) -> None:
    """Read lmms-eval results of the base, experts, trained mixtures and merged proxies into a results table (or the
    validation losses of a dmo run folder's trainings)."""
    from dmo.groundtruth.ingest import ingest
    from dmo.paths import SpaceFolder, scores_path
    from dmo.results import ResultsTable
    from dmo.scoring.metrics import load_metric_map

    doms: list[str] | None = None
    name = None
    candidates: list = []
    manifest_budget = None
    if space is not None:
        from dmo.config import load_space
        from dmo.manifest import load_manifest
        from dmo.sources import is_source_name

        sp = load_space(space)
        doms, name, candidates = list(sp.domains), sp.name, sp.candidates()
        if manifest is None and sp.experts and not is_source_name(sp.experts) and Path(sp.experts).is_file():
            manifest_budget = load_manifest(sp.experts, check_paths=False).budget
    if manifest is not None:
        from dmo.manifest import load_manifest

        m = load_manifest(manifest, check_paths=False)
        doms, manifest_budget = m.domains, m.budget
    if domains:
        doms = [d.strip() for d in domains.split(",") if d.strip()]
    if results is None:
        if name is None:
            raise DmoError("say where the scores go: pass --results results/<space> (or --space SPACE.yaml)")
        results = SpaceFolder.for_space(name).root
    path = scores_path(results)
    mm = load_metric_map(metric_map) if metric_map is not None else None
    skipped: list[str] = []
    new, known = ingest(
        root,
        ResultsTable(path),
        domains=doms,
        group=group if group is not None else (name or ""),
        metric_map=mm,
        dry_run=dry_run,
        budget=budget if budget is not None else manifest_budget,
        candidates=candidates,
        skip_unknown=skip_unknown,
        report=skipped,
    )
    for line in skipped:
        _note(line)
    kinds: dict[str, int] = {}
    for r in new:
        kinds[r.kind] = kinds.get(r.kind, 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "nothing new"
    verb = "would add" if dry_run else "added"
    console.print(f"{verb} {len(new)} row(s) to {path} ({summary}); {known} already there")
