"""``dmo demo``: the whole pipeline on the embedded tiny world, and the printouts of a study's result."""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from dmo.config import SearchSpace, load_space
from dmo.search.study import StudyResult
from dmo.session import Scored, Session, score_references, write_results_report
from dmo.tinyworld.build import World, default_root
from dmo.tinyworld.source import TINYWORLD, TINYWORLD_SMALL, world_config, world_experts

DEFAULT_SPACE = Path(__file__).resolve().parents[2] / "search_spaces" / "tiny-2d.yaml"


def print_study_result(console: Console, session: Session, result: StudyResult) -> None:
    if result.tradeoffs is not None:
        print_tradeoffs(console, session, result)
        return
    if result.best is None:
        console.print("no completed trial yet")
        return
    console.print(
        f"best mixture of study [bold]{result.study.study_name}[/]: [bold green]{result.best.id}[/] "
        f"(objective {result.best_value:.4f}; {result.evaluated} new evaluations, {len(result.study.trials)} trials)"
    )
    for b, s in sorted(result.best_scores.items()):
        console.print(f"  {b}: {s:.4f}")
    console.print(f"results table: {session.table.path}")


def print_scored(console: Console, session: Session, scored: Scored) -> None:
    """What a round of reference scoring did, and its failures (each on one line)."""
    cached = scored.targets - scored.evaluated
    console.print(
        f"scored {scored.targets} models of space [bold]{session.space.name}[/] on {len(session.space.benchmarks)} "
        f"benchmarks: {scored.evaluated} evaluated now, {cached} from the cache, {len(scored.failed)} failed",
        highlight=False,
    )
    for line in scored.failed:
        console.print(f"[bold yellow]failed:[/] {escape(line)}", highlight=False, soft_wrap=True)
    console.print(f"results table: {session.table.path}", highlight=False, soft_wrap=True)


def print_tradeoffs(console: Console, session: Session, result: StudyResult) -> None:
    """A multi-objective study's front, or a constrained study's best feasible trial, and its constraints."""
    t = result.tradeoffs
    assert t is not None
    name = result.study.study_name
    counts = f"{result.evaluated} new evaluations, {len(result.study.trials)} trials"
    for c in t.constraints:
        console.print(f"constraint: {c}", highlight=False)
    if t.note:
        console.print(("[bold yellow]" if not t.feasible else "") + escape(t.note), highlight=False)
    if len(t.objectives) > 1:
        if t.front:
            console.print(
                f"front of study [bold]{name}[/]: {len(t.front)} non-dominated feasible mixture(s) ({counts})",
                highlight=False,
            )
            head = ["#", "mixture", *t.objectives]
            rows = [[str(f.number), f.mixture.id, *(f"{v:.4f}" for v in f.values)] for f in t.front]
            widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
            console.print("  " + "  ".join(h.ljust(w) for h, w in zip(head, widths)), highlight=False)
            for r in rows:
                console.print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)), highlight=False)
        elif t.feasible + t.infeasible == 0:
            console.print("no completed trial yet")
    elif result.best is not None:
        console.print(
            f"best feasible mixture of study [bold]{name}[/]: [bold green]{result.best.id}[/] "
            f"(objective {result.best_value:.4f}; {counts})"
        )
        for b, s in sorted(result.best_scores.items()):
            console.print(f"  {b}: {s:.4f}")
    elif t.feasible + t.infeasible == 0:
        console.print("no completed trial yet")
    console.print(f"results table: {session.table.path}")


def run_demo(
    console: Console,
    space_file: Path | None = None,
    n_trials: int = 12,
    small: bool = False,
    tasks: Sequence[Path] = (),
    seeds: int | None = 1,
) -> Path:
    """The README's main command: world -> references -> preset proxies -> study (TPE by default) -> correlations.

    ``seeds``: training seeds of each trained mixture the demo builds on the tiny world (None: all of the world's,
    which the seed ceiling needs). A model trained by an earlier build is used whatever this says.
    """
    from dmo.analysis.correlate import correlate
    from dmo.analysis.tables import render_correlation

    t0 = time.perf_counter()
    space = load_space(space_file or DEFAULT_SPACE)
    if small and space.experts == TINYWORLD:
        space = space.model_copy(update={"experts": TINYWORLD_SMALL})
    experts = None
    if space.experts in (TINYWORLD, TINYWORLD_SMALL):
        # built here rather than by the expert source, which trains every seed of the ground truth
        config = world_config(space.experts)
        tasks = [*tasks, *filter(None, [world_experts(config, space, seeds, evaluate=False).tasks])]
        experts = World(default_root(config), config).manifest_path
    session = Session.open(space_file or DEFAULT_SPACE, space=space, tasks=tasks, experts=experts)
    console.print(f"[bold]dmo demo[/] on space [bold]{space.name}[/] with experts from {session.manifest.name}")
    trained_seeds = {t.seed for t in session.references(("trained",))}
    if experts is not None and len(trained_seeds) == 1:
        console.print(
            "ground truth: one training seed per mixture, so no seed ceiling (dmo demo --seeds 2 trains the second)",
            highlight=False,
        )
    # On the tiny world (CPU), the study's proxies need no reference score: a second process runs it while this one
    # scores the references and the grid, one thread each (the tiny model gains nothing from a second thread; a
    # second process halves the wall time of this phase). Elsewhere one process does all, in turn: a second one
    # would load a second model onto the same accelerator.
    child = None
    if experts is not None:
        child = multiprocessing.get_context("spawn").Process(
            target=_run_study_quietly, args=(session.space, n_trials), name="dmo-demo-study"
        )
        child.start()
    try:
        with _one_thread() if child is not None else contextlib.nullcontext():
            print_scored(console, session, score_references(session))
            grid_space = space.model_copy(update={"sampler": space.sampler.model_copy(update={"name": "grid"})})
            grid = dataclasses.replace(session, space=grid_space).run_study()
        if child is not None:
            if child.is_alive():
                console.print(f"waiting for the {space.sampler.name} study ...", highlight=False)
            child.join()
    finally:
        if child is not None and child.is_alive():
            child.terminate()
            child.join()
    # resumes the study: prints its progress and result, and runs whatever the second process did not
    study = session.run_study(n_trials=n_trials)
    console.print()
    table = correlate(session.table.frame())
    render_correlation(console, table[table["group"] == space.name] if not table.empty else table)
    _print_choice(console, session, grid, study)
    report = write_results_report(session.table.path.parent)
    console.print(f"done in {time.perf_counter() - t0:.0f} s; results table: [bold]{session.table.path}[/]")
    console.print(f"report: [bold]{report}[/]")
    return session.table.path


def _run_study_quietly(space: SearchSpace, n_trials: int) -> None:
    """The demo's second process: the space's study, without output (the demo prints its result)."""
    import torch

    torch.set_num_threads(1)
    Session.open("", space=space).run_study(n_trials=n_trials, progress=False)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _print_choice(console: Console, session: Session, grid: StudyResult, study: StudyResult) -> None:
    df = session.table.frame()
    ok = df[(df["status"] == "ok") & (df["group"].isin([session.space.name, ""]) | (df["kind"] != "proxy"))]
    trained = ok[ok["kind"] == "trained"]
    if not trained.empty:
        per_mix = trained.groupby(["mixture", "benchmark"])["score"].mean().unstack().mean(axis=1)
        best = per_mix.idxmax()
        console.print(f"best trained mixture (mean over seeds and benchmarks): [bold]{best}[/] ({per_mix[best]:.4f})")
        if grid.best is not None and grid.best.id in per_mix:
            console.print(
                f"proxy's pick among the trained mixtures: [bold]{grid.best.id}[/], which trained to "
                f"{per_mix[grid.best.id]:.4f} (regret {per_mix[best] - per_mix[grid.best.id]:.4f})"
            )
    if study.best is not None:
        console.print(
            f"best proxy found by the {session.space.sampler.name} study anywhere on the simplex: "
            f"[bold]{study.best.id}[/] (proxy objective {study.best_value:.4f}; not trained, so not verified)"
        )
