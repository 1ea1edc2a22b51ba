"""Glue from a search space to a running study: resolve the experts, build a scorer, score references.

A :class:`Session` holds one space, its expert manifest, the scorer and the results table at
``results/<space>/scores.jsonl``. ``experts: tinyworld`` (or ``tinyworld-small``) in a space means the
embedded tiny world, built (or reused from the cache) on first use, with the ground truth the space needs.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dmo.config import (
    TINYWORLD,
    TINYWORLD_SMALL,
    ExpertManifest,
    SearchSpace,
    load_manifest,
    load_space,
    parse_space,
)
from dmo.errors import DmoError
from dmo.mixture import Mixture
from dmo.paths import results_dir
from dmo.results import ResultsTable
from dmo.scorer import Scorer, Target, make_scorer, score_targets
from dmo.study import StudyResult, run_study, study_paths

#: Targets scored together by a backend with ``evaluate_many`` (the vllm backend's default ``max_loras``).
SCORE_GROUP = 4
DEFAULT_SPACE = Path(__file__).resolve().parent.parent / "search_spaces" / "tiny-2d.yaml"


def ground_truth_for(space: SearchSpace) -> tuple[str, ...]:
    """Which of the tiny world's ground-truth sets ("2d", "3d", "4d") a space's candidates come from."""
    src = space.mixtures
    if not isinstance(src, list) and src.preset is not None and src.preset.name.startswith("paper-"):
        return (src.preset.name.removeprefix("paper-"),)
    return ()


@dataclass
class Session:
    space: SearchSpace
    manifest: ExpertManifest
    scorer: Scorer
    table: ResultsTable
    include_path: Path | list[Path] | None = None  # lmms-eval task folders: the space's own, then the tiny world's

    @classmethod
    def open(
        cls,
        space_file: Path | str,
        sampler: str | None = None,
        experts: Path | None = None,
        backend: str | None = None,
        limit: int | None = None,
        space: SearchSpace | None = None,
        tasks: Sequence[Path] = (),
    ) -> Session:
        space = space or load_space(space_file)
        updates: dict[str, Any] = {}
        if sampler:
            updates["sampler"] = space.sampler.model_copy(update={"name": sampler})
        if experts:
            updates["experts"] = str(Path(experts).resolve())
        scoring = space.scoring.model_copy(update={k: v for k, v in (("backend", backend), ("limit", limit)) if v})
        if tasks:  # --tasks-dir: relative to where the command runs, before the space's own folders
            scoring = scoring.model_copy(update={"tasks": [*(Path(t).resolve() for t in tasks), *scoring.tasks]})
        updates["scoring"] = scoring
        merged = {**space.model_dump(), **{k: _dump(v) for k, v in updates.items()}}
        space = parse_space(merged, f"{space_file or space.name} with the command-line options")
        metric_map = own_task_folders(space)
        manifest, world_tasks = resolve_experts(space)
        for d in space.domains:
            if d not in manifest.experts:
                raise DmoError(f"domain {d!r} of space {space.name!r} has no expert in manifest {manifest.name!r}")
        folders = [*space.scoring.tasks, *([world_tasks] if world_tasks is not None else [])]
        include_path = folders[0] if len(folders) == 1 else (folders or None)
        own = {"metric_map": metric_map} if metric_map is not None else {}
        try:
            scorer = make_scorer(
                space.scoring.backend,
                manifest=manifest,
                include_path=include_path,
                limit=space.scoring.limit,
                batch_size=space.scoring.batch_size,
                device=space.scoring.device,
                **space.scoring.backend_options(),
                **own,
            )
        except TypeError as exc:
            if "metric_map" not in str(exc):
                raise
            raise DmoError(
                f"the {space.scoring.backend} backend does not take a space's own metric entries (scoring.metrics) "
                "yet: score with backend hf, or add them to dmo/scoring/metrics.yaml"
            ) from None
        check = getattr(scorer, "check", None)
        if check is not None and space.benchmarks:
            check(space.benchmarks)
        check_metrics(space, metric_map)
        assert space.name is not None
        table = ResultsTable(results_dir() / space.name / "scores.jsonl")
        return cls(space, manifest, scorer, table, include_path)

    def references(self) -> list[Target]:
        """The base, the space's experts, and every trained model of a mixture in the space."""
        out = [Target("base")]
        out += [Target("expert", domain=d) for d in self.space.domains]
        for mixture, seed, _ in self.manifest.trained_mixtures():
            extra = [d for d, w in mixture.as_dict().items() if w > 0 and d not in self.space.domains]
            if not extra:
                m = Mixture.from_mapping(
                    {d: w for d, w in mixture.as_dict().items() if d in self.space.domains}, self.space.domains
                )
                out.append(Target("trained", mixture=m, seed=seed))
        return out

    def score(self, targets: list[Target], description: str, progress: bool = True) -> None:
        """Score targets through the cache, with a progress bar; a failure is recorded, not fatal."""
        with _bar(progress) as bar:
            task = bar.add_task(description, total=len(targets))
            # in groups, so that a backend that can score several proxies together (vllm: one engine batch for
            # several LoRA-served proxies) does; each group is recorded as soon as it is scored
            step = SCORE_GROUP if hasattr(self.scorer, "evaluate_many") else 1
            for k in range(0, len(targets), step):
                group = targets[k : k + step]
                score_targets(self.scorer, self.table, group, self.space.benchmarks, group=self.space.name or "")
                bar.advance(task, len(group))

    def run_study(
        self,
        n_trials: int | None = None,
        storage: str | None = None,
        study_name: str | None = None,
        progress: bool = True,
        batch: int | None = None,
    ) -> StudyResult:
        paths = study_paths(self.space, storage, study_name)
        return run_study(
            self.space, self.scorer, paths, n_trials=n_trials, progress=progress, batch=study_batch(self.scorer, batch)
        )


def study_batch(scorer: Scorer, batch: int | None) -> int:
    """Trials run at once per worker: ``batch``, or the backend's own (how many targets it scores in one call)."""
    most = int(getattr(scorer, "max_batch", 1))
    if batch is None:
        return min(most, int(getattr(scorer, "default_batch", 1)))
    if batch > most:
        raise DmoError(
            f"--batch {batch} is more than the {scorer.name} backend scores in one call ({most})"
            + (": raise scoring.vllm.max_loras, or lower --batch" if scorer.name == "vllm" else ": use --batch 1")
        )
    return batch


def own_task_folders(space: SearchSpace) -> dict[str, Any] | None:
    """Every task folder of the space exists; returns the merged metric map (None: the space has no entries)."""
    if space.scoring.tasks:
        from dmo.scoring.evaluate import include_paths

        include_paths(space.scoring.tasks)
    return space.scoring.metric_map()


def check_metrics(space: SearchSpace, metric_map: dict[str, Any] | None) -> None:
    """Before a study opens: every benchmark has a score metric in the shipped map or the space's own entries."""
    if space.scoring.backend == "replay":  # recorded scores: no metric is read
        return
    from dmo.scoring.metrics import metric_spec

    for b in space.benchmarks:
        try:
            metric_spec(b, metric_map)
        except DmoError:
            raise DmoError(
                f"no score metric known for benchmark {b!r} of space {space.name!r}: add it to the space's scoring "
                f"section, e.g. 'scoring: {{metrics: {{{b}: {{metric: <lmms-eval metric name>}}}}}}' "
                "(or to dmo/scoring/metrics.yaml)"
            ) from None


def _dump(value: Any) -> Any:
    return value.model_dump() if hasattr(value, "model_dump") else value


def resolve_experts(space: SearchSpace) -> tuple[ExpertManifest, Path | None]:
    """The space's expert manifest and lmms-eval include path (the tiny world's tasks, when it is used)."""
    if space.experts in (TINYWORLD, TINYWORLD_SMALL):
        from dmo.scoring.tasks import write_tiny_tasks
        from dmo.tinyworld.build import build_world
        from dmo.tinyworld.config import WorldConfig

        config = WorldConfig.small() if space.experts == TINYWORLD_SMALL else WorldConfig()
        world = build_world(config, ground_truth=ground_truth_for(space))
        tasks = world.root / "tasks"
        if not tasks.is_dir():
            write_tiny_tasks(world.root / "data", tasks, list(config.domains), max_new_tokens=config.max_new_tokens)
        return load_manifest(world.manifest_path), tasks
    if not space.experts:
        raise DmoError(f"space {space.name!r} names no expert manifest: add 'experts: FILE' or pass --experts FILE")
    return load_manifest(space.experts), None


class _bar:
    def __init__(self, enabled: bool) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            disable=not enabled,
        )

    def __enter__(self) -> Progress:
        self.progress.start()
        return self.progress

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()


def print_study_result(console: Console, session: Session, result: StudyResult) -> None:
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


def run_demo(
    console: Console,
    space_file: Path | None = None,
    n_trials: int = 12,
    small: bool = False,
    tasks: Sequence[Path] = (),
) -> Path:
    """The README's main command: world -> references -> preset proxies -> study (CMA-ES by default) -> correlations."""
    from dmo.correlate import correlate
    from dmo.report import render_correlation

    t0 = time.perf_counter()
    space = load_space(space_file or DEFAULT_SPACE)
    if small and space.experts == TINYWORLD:
        space = space.model_copy(update={"experts": TINYWORLD_SMALL})
    session = Session.open(space_file or DEFAULT_SPACE, space=space, tasks=tasks)
    console.print(f"[bold]dmo demo[/] on space [bold]{space.name}[/] with experts from {session.manifest.name}")
    session.score(session.references(), "base, experts, trained mixtures")
    grid_space = space.model_copy(update={"sampler": space.sampler.model_copy(update={"name": "grid"})})
    grid = dataclasses.replace(session, space=grid_space).run_study()
    study = session.run_study(n_trials=n_trials)
    console.print()
    table = correlate(session.table.frame())
    render_correlation(console, table[table["group"] == space.name] if not table.empty else table)
    _print_choice(console, session, grid, study)
    from dmo.html_report import write_report

    report = write_report(session.table.path.parent)
    console.print(f"done in {time.perf_counter() - t0:.0f} s; results table: [bold]{session.table.path}[/]")
    console.print(f"report: [bold]{report}[/]")
    return session.table.path


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
