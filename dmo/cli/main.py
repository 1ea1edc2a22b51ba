"""The ``dmo`` command line: parses arguments and calls library functions, nothing more.

Heavy stacks (torch, transformers, lmms-eval) are imported inside the commands, so ``dmo --help`` is fast.
Every :class:`DmoError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from typer.core import TyperCommand, TyperOption

from dmo.errors import DmoError
from dmo.scoring.base import scorer_names
from dmo.search.samplers import sampler_names

app = typer.Typer(
    help="Data Mixture Optimization: find the best SFT data mixture by scoring merged expert proxies.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
world_app = typer.Typer(help="The embedded tiny synthetic world (data, base model, experts, ground truth).")
spaces_app = typer.Typer(help="Search spaces: domains and candidate mixtures.")
app.add_typer(world_app, name="world")
app.add_typer(spaces_app, name="spaces")
# Ground truth (mixture datasets, LLaMA-Factory training, lmms-eval ingestion) lives in its own module.
from dmo.cli.ground_truth import data_app, ingest_command, train_app  # noqa: E402

app.add_typer(data_app, name="data")
app.add_typer(train_app, name="train")
app.command("ingest")(ingest_command)
console = Console()
err = Console(stderr=True)
_TASKS_DIR_HELP = "A folder of your own lmms-eval task YAMLs (repeatable), besides the space's scoring.tasks."


@world_app.command("build")
def world_build(
    ground_truth: Annotated[
        str, typer.Option(help="Comma-separated spaces whose trained mixtures to build: 2d, 3d, 4d (or 'none').")
    ] = "2d",
    small: Annotated[bool, typer.Option(help="The small test configuration (seconds, not minutes).")] = False,
    root: Annotated[Path | None, typer.Option(help="Build here instead of the cache folder.")] = None,
    world: Annotated[
        str,
        typer.Option(
            help="Which world: 'current' (the default: format 6, where every benchmark moves), 'v6' (the same) "
            "or 'v5' (format 5, the default before it)."
        ),
    ] = "current",
) -> None:
    """Build the tiny world, or reuse it from the cache (keyed by a hash of its configuration)."""
    from dmo.tinyworld.build import build_world
    from dmo.tinyworld.config import WorldConfig

    gt = () if ground_truth == "none" else tuple(s.strip() for s in ground_truth.split(",") if s.strip())
    config = WorldConfig.named(world, small=small)
    built = build_world(config, root=root, ground_truth=gt)
    console.print(f"tiny world ready at [bold]{built.root}[/] (key {config.key()}, format {config.format_version})")
    console.print(f"expert manifest: {built.manifest_path}")


@spaces_app.command("show")
def spaces_show(file: Annotated[Path, typer.Argument(help="A search space YAML file.")]) -> None:
    """Print a space's settings and its candidate mixtures."""
    from rich.table import Table

    from dmo.config import load_space

    space = load_space(file)
    cands = space.candidates()
    table = Table(title=f"{space.name}: {len(cands)} candidate mixtures", title_justify="left")
    table.add_column("#", justify="right")
    for d in space.domains:
        table.add_column(d, justify="right")
    table.add_column("id")
    for i, m in enumerate(cands):
        table.add_row(str(i), *(f"{w:.4g}" for w in m.weights), m.id)
    console.print(table)
    objective = (
        f"pareto ({', '.join(space.objective.objective_names())})"
        if space.objective.pareto is not None
        else space.objective.aggregate
    )
    constraints = "".join(f"  constraint: {c.benchmark} >= {c.min}" for c in space.constraints)
    console.print(
        f"experts: {space.experts or '-'}  merge: {space.merge.method}  sampler: {space.sampler.name} "
        f"({space.sampler.n_trials} trials)  objective: {objective}"
        f"{f' (calibrated: {space.objective.calibrate.method})' if space.objective.calibrate else ''}  "
        f"benchmarks: {', '.join(space.benchmarks) or '-'}{constraints}"
    )


@app.command()
def study(
    space_file: Annotated[Path, typer.Argument(metavar="SPACE", help="Search space YAML.")],
    sampler: Annotated[
        str | None,
        typer.Option(help=f"{', '.join(sampler_names())} (default: the space's; tpe if it names none)."),
    ] = None,
    n_trials: Annotated[int | None, typer.Option(help="Total trials wanted (a resumed study runs the rest).")] = None,
    storage: Annotated[str | None, typer.Option(help="Optuna storage URL (default: SQLite).")] = None,
    study_name: Annotated[str | None, typer.Option(help="Default: <space>.<sampler>.")] = None,
    experts: Annotated[Path | None, typer.Option(help="Expert manifest, overriding the space's.")] = None,
    backend: Annotated[
        str | None, typer.Option(help=f"Scoring backend: {', '.join(scorer_names())} (default: the space's).")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Evaluate only the first N items of each benchmark.")] = None,
    workers: Annotated[
        int, typer.Option(min=1, help="Local worker processes on the study (more can join from other hosts).")
    ] = 1,
    tasks_dir: Annotated[list[Path], typer.Option(help=_TASKS_DIR_HELP)] = [],  # noqa: B006
    batch: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Trials each worker runs at once, scored in one backend call (default: the "
            "backend's: vllm max_loras, hf 1).",
        ),
    ] = None,
) -> None:
    """Run, resume or join an Optuna study over the space's mixture weights."""
    from dmo.cli.demo import print_study_result
    from dmo.session import Session

    session = Session.open(space_file, sampler=sampler, experts=experts, backend=backend, limit=limit, tasks=tasks_dir)
    objective = session.objective(progress=True)  # a calibrated one is fitted (and refused) before the study opens
    for note in objective.notes if objective is not None else []:
        from rich.markup import escape

        console.print(f"[bold yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)
    if workers > 1:
        from dmo.search.launch import run_workers
        from dmo.session import objective_for, scorer_for, study_batch

        result = run_workers(
            session.space, session.scorer, workers, n_trials=n_trials, storage=storage, study_name=study_name,
            batch=study_batch(session.scorer, batch), open_scorer=scorer_for,
            open_objective=objective_for if objective is not None else None,
        )  # fmt: skip
    else:
        result = session.run_study(
            n_trials=n_trials, storage=storage, study_name=study_name, batch=batch, objective=objective
        )
    print_study_result(console, session, result)


@app.command()
def score(
    space_file: Annotated[Path, typer.Argument(metavar="SPACE", help="Search space YAML.")],
    targets: Annotated[
        str,
        typer.Option(
            help="What to score, comma-separated: base, experts (the space's), trained (the manifest's "
            "models trained on mixtures of the space)."
        ),
    ] = "base,experts,trained",
    experts: Annotated[Path | None, typer.Option(help="Expert manifest, overriding the space's.")] = None,
    backend: Annotated[
        str | None, typer.Option(help=f"Scoring backend: {', '.join(scorer_names())} (default: the space's).")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Evaluate only the first N items of each benchmark.")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Local worker processes, each with its own scorer.")] = 1,
    tasks_dir: Annotated[list[Path], typer.Option(help=_TASKS_DIR_HELP)] = [],  # noqa: B006
) -> None:
    """Score what is not a proxy: the space's base, experts and trained mixtures, on its benchmarks.

    Through the results table's cache: what was scored before (by any command) is read, not scored again, so the
    same command resumes. Then 'dmo correlate' compares the proxies of a study with the trained mixtures.
    """
    from dmo.cli.demo import print_scored
    from dmo.session import Session, parse_target_kinds, score_references

    kinds = parse_target_kinds(targets)
    session = Session.open(space_file, experts=experts, backend=backend, limit=limit, tasks=tasks_dir)
    scored = score_references(session, kinds, workers=workers)
    print_scored(console, session, scored)
    if scored.failed:
        raise typer.Exit(1)


@app.command()
def rescore(
    space_file: Annotated[Path, typer.Argument(metavar="SPACE", help="Search space YAML of the study.")],
    storage: Annotated[str | None, typer.Option(help="Optuna storage URL (default: SQLite).")] = None,
    study_name: Annotated[str | None, typer.Option(help="Default: <space>.<sampler>.")] = None,
    sampler: Annotated[
        str | None, typer.Option(help="The study's sampler, if not the space's (its default name).")
    ] = None,
) -> None:
    """Score in full the proxies a study's pruner stopped, continuing from their last scored item."""
    from rich.table import Table

    from dmo.session import Session

    session = Session.open(space_file, sampler=sampler)
    rows = session.rescore_pruned(storage=storage, study_name=study_name)
    table = Table(title=f"{len(rows)} pruned proxies scored in full", title_justify="left")
    for col in ("mixture", "partial value", "full value"):
        table.add_column(col, justify="left" if col == "mixture" else "right")
    for label, partial, full in sorted(rows, key=lambda r: -r[2]):
        table.add_row(label, "-" if partial is None else f"{partial:.4f}", f"{full:.4f}")
    console.print(table)


@app.command()
def correlate(
    results: Annotated[Path, typer.Argument(help="A results folder (results/<space>) or its scores.jsonl.")],
    fmt: Annotated[str, typer.Option("--format", help="table, markdown, csv or json.")] = "table",
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% CIs.", min=1)] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap and the permutations.")] = 0,
    n_perm: Annotated[int, typer.Option(help="Permutations for the p-values (exact if n! <= this).", min=1)] = 1000,
    top_k: Annotated[int, typer.Option(help="k of the top-k overlap.", min=1)] = 3,
    calibration: Annotated[
        str | None,
        typer.Option(
            help="Calibration of the calibrated rho: regression, isotonic, hybrid or residual (default: the one "
            "benchmarks/proxy_fidelity.py chose, DEFAULT_CALIBRATION in dmo/calibration.py)."
        ),
    ] = None,
    partial: Annotated[bool, typer.Option("--partial", help=_PARTIAL_HELP)] = False,
) -> None:
    """Rank correlation of proxy scores with trained-mixture scores, per benchmark, with baselines."""
    from dmo.analysis.correlate import correlate as run
    from dmo.analysis.tables import render_correlation
    from dmo.calibration import DEFAULT_CALIBRATION, check_score_calibration

    check_score_calibration(calibration or DEFAULT_CALIBRATION)
    table = run(
        _results_frame(results, partial), n_boot=n_boot, seed=seed, n_perm=n_perm, k=top_k,
        calibration=calibration or DEFAULT_CALIBRATION,
    )  # fmt: skip
    render_correlation(console, table, fmt)


_PARTIAL_HELP = "Count partial scores (proxies a pruner stopped, on part of their items) as scores."


def _results_frame(results: Path, partial: bool = False):
    from dmo.paths import scores_path
    from dmo.results import ResultsTable, partial_as_scores, partial_rows

    path = scores_path(results)
    if not path.exists():
        raise DmoError(f"no results table at {path}: run 'dmo study' or 'dmo demo' first")
    frame = ResultsTable(path).frame()
    if partial:
        frame, n = partial_as_scores(frame)
        if n:
            err.print(f"note: {n} partial scores counted as scores (--partial): each is the mean of a proxy's first "
                      "items only, not its full score", highlight=False)  # fmt: skip
    elif n := partial_rows(frame):
        err.print(f"note: full scores only; {n} partial scores (proxies a pruner stopped) are left out: --partial "
                  "counts them, 'dmo rescore SPACE' scores them in full", highlight=False)  # fmt: skip
    return frame


@app.command()
def compare(
    results: Annotated[Path, typer.Argument(help="A results folder (results/<space>) or its scores.jsonl.")],
    benchmark: Annotated[str | None, typer.Option(help="Only this benchmark (or 'mean score').")] = None,
    fmt: Annotated[str, typer.Option("--format", help="table, markdown, csv or json.")] = "table",
    all_mixtures: Annotated[
        bool, typer.Option("--all", help="Also list mixtures that have only a proxy or only a trained score.")
    ] = False,
    partial: Annotated[bool, typer.Option("--partial", help=_PARTIAL_HELP)] = False,
) -> None:
    """Proxy and trained score side by side per mixture and benchmark, sorted, with ranks."""
    from dmo.analysis.compare import compare as run
    from dmo.analysis.tables import render_compare

    frame = _results_frame(results, partial)
    render_compare(console, run(frame, benchmark=benchmark, include_all=all_mixtures), fmt)


@app.command()
def suggest(
    results: Annotated[Path, typer.Argument(help="A results folder (results/<space>) or its scores.jsonl.")],
    k: Annotated[int, typer.Option("--k", help="How many mixtures to suggest.", min=1)] = 3,
    space_file: Annotated[
        Path | None,
        typer.Option("--space", help="Choose among this space's candidates (and use its benchmarks and objective)."),
    ] = None,
    method: Annotated[str | None, typer.Option(help="Proxy method (default: linear, or the only one).")] = None,
    fmt: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples behind the uncertainty.", min=0)] = 100,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = 0,
) -> None:
    """The mixtures whose training would tell most about the best mixture (expected improvement)."""
    from dmo.analysis.suggest import render_suggestion
    from dmo.analysis.suggest import suggest as run

    if space_file is None:
        s = run(_results_frame(results), k, method=method, n_boot=n_boot, seed=seed)
    else:
        from dmo.config import load_space

        sp = load_space(space_file)
        s = run(
            _results_frame(results), k, method=method, n_boot=n_boot, seed=seed, domains=sp.domains,
            candidates=sp.candidates(), objective=sp.objective, benchmarks=sp.benchmarks or None,
        )  # fmt: skip
    render_suggestion(console, s, fmt)


@app.command()
def pareto(
    results: Annotated[Path, typer.Argument(help="A results folder (results/<space>) or its scores.jsonl.")],
    space_file: Annotated[
        Path | None,
        typer.Option("--space", help="Take the objectives from this space's objective.pareto (else its benchmarks)."),
    ] = None,
    objective: Annotated[
        list[str] | None, typer.Option(help="A benchmark as one objective (repeatable; default: every benchmark).")
    ] = None,
    method: Annotated[str | None, typer.Option(help="Only proxies of this merge method.")] = None,
    calibration: Annotated[
        str | None, typer.Option(help="Also the front of this calibration of the proxy (regression, residual, ...).")
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="table, markdown, csv or json.")] = "table",
    n_boot: Annotated[int, typer.Option(help="Seed-bootstrap resamples for the 95% CIs.", min=1)] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = 0,
) -> None:
    """The proxies' non-dominated mixtures, and how well they recover the trained models' front, with baselines."""
    from dmo.analysis.pareto import front_fidelity_table, proxy_front
    from dmo.analysis.tables import render_pareto

    frame = _results_frame(results)
    objectives = _pareto_objectives(frame, space_file, objective)
    if calibration is not None:
        from dmo.calibration import check_score_calibration

        check_score_calibration(calibration)
    front = proxy_front(frame, objectives, method=method)
    fidelity = front_fidelity_table(frame, objectives, n_boot=n_boot, seed=seed, calibration=calibration,
                                    method=method).table  # fmt: skip
    render_pareto(console, front, fidelity, list(objectives.names), fmt)


def _pareto_objectives(frame, space_file: Path | None, objective: list[str] | None):
    from dmo.analysis.pareto import Objectives

    scored = sorted(frame.loc[frame["kind"] == "proxy", "benchmark"].dropna().unique())
    if space_file is not None and objective:
        raise DmoError("give the objectives either by --space or by --objective, not both")
    if space_file is not None:
        from dmo.config import load_space

        sp = load_space(space_file)
        if sp.objective.pareto is not None:
            objectives = Objectives(tuple(sp.objective.objective_names()), tuple(sp.objective.objective_weights()))
        else:
            objectives = Objectives.each(sp.benchmarks)
    else:
        objectives = Objectives.each(objective or scored)
    unknown = [b for b in objectives.benchmarks if b not in scored]
    if unknown:
        raise DmoError(
            f"no proxy in the results table is scored on {', '.join(unknown)} (scored: {', '.join(scored) or 'none'})"
        )
    if len(objectives.names) < 2:
        raise DmoError(f"a front needs at least two objectives, got {', '.join(objectives.names) or 'none'}")
    return objectives


@app.command()
def report(
    results: Annotated[Path, typer.Argument(help="A results folder (results/<space>) or its scores.jsonl.")],
    output: Annotated[Path | None, typer.Option(help="HTML file to write (default: RESULTS/report.html).")] = None,
    storage: Annotated[
        str | None, typer.Option(help="Optuna storage of the studies (default: RESULTS/study.db if present).")
    ] = None,
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% CIs.", min=1)] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap and the permutations.")] = 0,
    n_perm: Annotated[int, typer.Option(help="Permutations for the p-values.", min=1)] = 1000,
    top_k: Annotated[int, typer.Option(help="k of the top-k overlap.", min=1)] = 3,
) -> None:
    """Write one self-contained HTML report (plots embedded) about a results folder."""
    from dmo.session import write_results_report

    path = write_results_report(results, output, storage=storage, n_boot=n_boot, seed=seed, n_perm=n_perm, k=top_k)
    console.print(f"report: [bold]{path}[/]")


@app.command()
def demo(
    space_file: Annotated[Path | None, typer.Option("--space", help="Default: search_spaces/tiny-2d.yaml.")] = None,
    n_trials: Annotated[
        int, typer.Option(help="Trials of the study (the space's sampler, TPE by default) after the preset grid.")
    ] = 12,
    small: Annotated[bool, typer.Option(help="Use the small test world (seconds).")] = False,
    tasks_dir: Annotated[list[Path], typer.Option(help=_TASKS_DIR_HELP)] = [],  # noqa: B006
    seeds: Annotated[
        int,
        typer.Option(
            min=1,
            help="Training seeds of each trained mixture it builds on the tiny world: 2 adds the seed ceiling to "
            "the table (about 3 minutes more on 2 cores).",
        ),
    ] = 1,
) -> None:
    """The whole pipeline on the embedded tiny world: proxies, study, correlation table."""
    from dmo.cli.demo import run_demo

    run_demo(console, space_file, n_trials=n_trials, small=small, tasks=tasks_dir, seeds=seeds)


class _MergeCommand(TyperCommand):
    """``dmo merge``: its ``--method`` help lists the built-in methods, read from their source only when help is
    shown (importing the registry imports torch: ~2 s for a help text)."""

    def complete_help(self) -> None:
        """Fill in the help texts that are computed only when shown (also called by dmo.cli.reference)."""
        from dmo.merge.catalog import builtin_method_names

        for param in self.params:
            if param.name == "method" and isinstance(param, TyperOption):
                param.help = f"Merge method: {', '.join(builtin_method_names())}."

    def format_help(self, ctx: Any, formatter: Any) -> None:  # typer's own click types
        self.complete_help()
        super().format_help(ctx, formatter)


@app.command(cls=_MergeCommand)
def merge(
    experts: Annotated[Path, typer.Option(help="Expert manifest (experts/*.yaml).")],
    weights: Annotated[str, typer.Option(help="Mixture, e.g. general=0.25,ocr=0.75 (missing domains are 0).")],
    out: Annotated[Path, typer.Option(help="Output folder (written atomically).")],
    method: Annotated[str, typer.Option(help="Merge method (the registered ones are listed here).")] = "linear",
    as_: Annotated[str, typer.Option("--as", help="dense: a full model; adapter: one PEFT LoRA adapter.")] = "dense",
    param: Annotated[
        list[str] | None, typer.Option(help="Method parameter name=value (repeatable), e.g. density=0.5, scale=0.8.")
    ] = None,
    paper_rounding: Annotated[
        bool,
        typer.Option(help="The DMO paper's coefficients round(w*budget)/budget (zeros dropped, not renormalised)."),
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
    include: Annotated[
        list[str] | None, typer.Option(help="Regex of tensors to merge (repeatable; default all).")
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option(
            help="Regex of tensors that keep the base value (repeatable; replaces the paper's defaults; "
            "'none' merges everything)."
        ),
    ] = None,
    dtype: Annotated[str | None, typer.Option(help="Output dtype (default: the base's).")] = None,
    max_shard_size: Annotated[str, typer.Option(help="Largest output shard, e.g. 5GB.")] = "5GB",
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu or cuda.")] = "auto",
    threads: Annotated[int | None, typer.Option(min=1, help="Worker threads (default: one per CPU).")] = None,
    allow_bin: Annotated[bool, typer.Option(help="Read .bin weights with torch.load(weights_only=True).")] = False,
) -> None:
    """Merge a manifest's experts for one mixture into a proxy model (dense) or a LoRA adapter."""
    from dmo.merge.proxy import merge_manifest, parse_params, parse_size
    from dmo.progress import progress_bar

    excludes = [] if exclude == ["none"] else exclude
    with progress_bar("tensors  {task.fields[name]}", description="merging", console=err, transient=True) as bar:
        task = bar.add_task("", total=None, name="")

        def progress(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total, name=name)

        stats = merge_manifest(
            experts, weights, out, method=method, params=parse_params(param), as_=as_,  # type: ignore[arg-type]
            paper_rounding=paper_rounding, include=include or None, exclude=excludes, dtype=dtype,
            max_shard_size=parse_size(max_shard_size), overwrite=overwrite, device=device, threads=threads,
            allow_bin=allow_bin, progress=progress,
        )  # fmt: skip
    if stats.excluded_adapted:
        console.print(f"kept the base value of {len(stats.excluded_adapted)} adapted tensors (include/exclude), "
                      f"e.g. {stats.excluded_adapted[0]}", highlight=False)  # fmt: skip
    console.print(f"{stats.out}: {stats.summary()}", highlight=False)


@app.command("fisher")
def fisher_command(
    experts: Annotated[Path, typer.Option(help="Expert manifest (experts/*.yaml).")],
    data: Annotated[
        Path,
        typer.Option(help="Data root holding each expert's domain (<domain>/train.jsonl, <domain>.jsonl, ...)."),
    ],
    samples: Annotated[int, typer.Option(min=1, help="Samples per expert (the paper's 2000; all when fewer).")] = 2000,
    expert: Annotated[
        list[str] | None, typer.Option(help="Only this expert (repeatable; default: every expert of the manifest).")
    ] = None,
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu or cuda.")] = "auto",
    dtype: Annotated[str, typer.Option(help="Model dtype for the gradients.")] = "float32",
    target: Annotated[
        str, typer.Option(help="labels: log-likelihood of the data's answers; predictions: of the model's own.")
    ] = "labels",
    seed: Annotated[int, typer.Option(help="Seed of the sample order (dmo data's per-domain permutation).")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Recompute Fisher files that exist.")] = False,
    update_manifest: Annotated[
        bool, typer.Option(help="Add each expert's 'fisher:' path to the manifest (else print the lines).")
    ] = True,
) -> None:
    """Diagonal Fisher weights of each expert on its domain's data, for 'dmo merge --method fisher / fisher_nn'."""
    from rich.progress import TaskID

    from dmo.groundtruth.fisher_weights import compute_fisher, record_in_manifest
    from dmo.progress import progress_bar

    with progress_bar("samples", description="fisher {task.description}", console=err, transient=True) as bar:
        tasks: dict[str, TaskID] = {}

        def progress(name: str, done: int, total: int) -> None:
            if name not in tasks:
                tasks[name] = bar.add_task(name, total=total)
            bar.update(tasks[name], completed=done)

        results = compute_fisher(
            experts, data, samples=samples, experts=expert or None, device=device, dtype=dtype,
            target=target, seed=seed, overwrite=overwrite, progress=progress,  # type: ignore[arg-type]
        )  # fmt: skip
    for r in results:
        console.print(r.summary(), highlight=False, soft_wrap=True)
    written, lines = record_in_manifest(experts, {r.expert: r.path for r in results}, write=update_manifest)
    if written:
        names = ", ".join(r.expert for r in results)
        console.print(f"{experts}: recorded the 'fisher:' path of {names}", highlight=False, soft_wrap=True)
    else:
        console.print(f"add to the experts of {experts} (paths relative to it):", highlight=False, soft_wrap=True)
        for line in lines:
            console.print(line, highlight=False, soft_wrap=True)


def main() -> None:
    try:
        app()
    except DmoError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
