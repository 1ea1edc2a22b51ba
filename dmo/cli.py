"""The ``dmo`` command line: parses arguments and calls library functions, nothing more.

Heavy stacks (torch, transformers, lmms-eval) are imported inside the commands, so ``dmo --help`` is fast.
Every :class:`DmoError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from dmo.errors import DmoError

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
console = Console()
err = Console(stderr=True)


@world_app.command("build")
def world_build(
    ground_truth: Annotated[
        str, typer.Option(help="Comma-separated spaces whose trained mixtures to build: 2d, 3d, 4d (or 'none').")
    ] = "2d",
    small: Annotated[bool, typer.Option(help="The small test configuration (seconds, not minutes).")] = False,
    root: Annotated[Path | None, typer.Option(help="Build here instead of the cache folder.")] = None,
) -> None:
    """Build the tiny world, or reuse it from the cache (keyed by a hash of its configuration)."""
    from dmo.tinyworld.build import build_world
    from dmo.tinyworld.config import WorldConfig

    gt = () if ground_truth == "none" else tuple(s.strip() for s in ground_truth.split(",") if s.strip())
    config = WorldConfig.small() if small else WorldConfig()
    world = build_world(config, root=root, ground_truth=gt)
    console.print(f"tiny world ready at [bold]{world.root}[/]")
    console.print(f"expert manifest: {world.manifest_path}")


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
    console.print(
        f"experts: {space.experts or '-'}  merge: {space.merge.method}  sampler: {space.sampler.name} "
        f"({space.sampler.n_trials} trials)  objective: {space.objective.aggregate}  "
        f"benchmarks: {', '.join(space.benchmarks) or '-'}"
    )


@app.command()
def study(
    space_file: Annotated[Path, typer.Argument(metavar="SPACE", help="Search space YAML.")],
    sampler: Annotated[str | None, typer.Option(help="grid, random, tpe, gp, cmaes, qmc.")] = None,
    n_trials: Annotated[int | None, typer.Option(help="Total trials wanted (a resumed study runs the rest).")] = None,
    storage: Annotated[str | None, typer.Option(help="Optuna storage URL (default: SQLite).")] = None,
    study_name: Annotated[str | None, typer.Option(help="Default: <space>.<sampler>.")] = None,
    experts: Annotated[Path | None, typer.Option(help="Expert manifest, overriding the space's.")] = None,
    backend: Annotated[str | None, typer.Option(help="Scoring backend: hf or vllm (default: the space's).")] = None,
    limit: Annotated[int | None, typer.Option(help="Evaluate only the first N items of each benchmark.")] = None,
) -> None:
    """Run or resume an Optuna study over the space's mixture weights."""
    from dmo.pipeline import Session, print_study_result

    session = Session.open(space_file, sampler=sampler, experts=experts, backend=backend, limit=limit)
    result = session.run_study(n_trials=n_trials, storage=storage, study_name=study_name)
    print_study_result(console, session, result)


@app.command()
def correlate(
    results: Annotated[Path, typer.Argument(help="A results folder (results/<space>) or its scores.jsonl.")],
    fmt: Annotated[str, typer.Option("--format", help="table, markdown, csv or json.")] = "table",
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% CIs.")] = 1000,
    seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
) -> None:
    """Rank correlation of proxy scores with trained-mixture scores, per benchmark, with baselines."""
    from dmo.correlate import correlate as run
    from dmo.report import render_correlation
    from dmo.results import ResultsTable

    path = results / "scores.jsonl" if results.is_dir() else results
    if not path.exists():
        raise DmoError(f"no results table at {path}: run 'dmo study' or 'dmo demo' first")
    table = run(ResultsTable(path).frame(), n_boot=n_boot, seed=seed)
    render_correlation(console, table, fmt)


@app.command()
def demo(
    space_file: Annotated[Path | None, typer.Option("--space", help="Default: search_spaces/tiny-2d.yaml.")] = None,
    n_trials: Annotated[int, typer.Option(help="Trials of the TPE study after the preset grid.")] = 12,
    small: Annotated[bool, typer.Option(help="Use the small test world (seconds).")] = False,
) -> None:
    """The whole pipeline on the embedded tiny world: proxies, study, correlation table."""
    from dmo.pipeline import run_demo

    run_demo(console, space_file, n_trials=n_trials, small=small)


def main() -> None:
    try:
        app()
    except DmoError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
