"""Glue from a search space to a running study: resolve the experts, build a scorer, score references.

A :class:`Session` holds one space, its expert manifest, the scorer and the results table at
``results/<space>/scores.jsonl``. ``experts: NAME`` in a space names an expert source (:mod:`dmo.sources`), e.g.
``tinyworld``: the embedded tiny world, built (or reused from the cache) on first use.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dmo.config import ExpertManifest, SearchSpace, load_manifest, load_space, parse_space
from dmo.errors import DmoError
from dmo.mixture import Mixture
from dmo.paths import SpaceFolder
from dmo.progress import progress_bar
from dmo.results import ResultsTable
from dmo.scoring.base import Scorer, Target, make_scorer, score_targets
from dmo.search.study import StudyResult, study_paths
from dmo.search.trials import run_study
from dmo.sources import is_source_name, resolve_source


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
        if space.benchmarks:
            scorer.check(space.benchmarks)
        check_metrics(space, metric_map)
        assert space.name is not None
        table = ResultsTable(SpaceFolder.for_space(space.name).scores)
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
        with progress_bar(enabled=progress) as bar:
            task = bar.add_task(description, total=len(targets))
            # in groups, so that a backend that can score several proxies together (vllm: one engine batch for
            # several LoRA-served proxies) does; each group is recorded as soon as it is scored
            step = max(1, self.scorer.max_batch)
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
    most = scorer.max_batch
    if batch is None:
        return min(most, scorer.default_batch)
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
    from dmo.scoring.loss import split_benchmarks
    from dmo.scoring.metrics import metric_spec

    for b in split_benchmarks(space.benchmarks)[0]:  # a loss:<domain> has no lmms-eval metric
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
    """The space's expert manifest and lmms-eval include path (a named source's tasks, e.g. the tiny world's)."""
    if space.experts and is_source_name(space.experts):
        found = resolve_source(space.experts, space)
        return found.manifest, found.tasks
    if not space.experts:
        raise DmoError(f"space {space.name!r} names no expert manifest: add 'experts: FILE' or pass --experts FILE")
    return load_manifest(space.experts), None


def scorer_for(space: SearchSpace) -> Scorer:
    """A fresh scorer for a space (what each worker process of :func:`dmo.search.launch.run_workers` builds)."""
    return Session.open("", space=space).scorer


def write_results_report(results: Path, output: Path | None = None, storage: str | None = None, **kwargs: Any) -> Path:
    """``dmo report``: the HTML report of a results folder, with the studies of ``storage`` (default: its study.db)."""
    from dmo.analysis.html_report import write_report
    from dmo.paths import scores_path
    from dmo.search.history import study_history

    folder = SpaceFolder.of(scores_path(Path(results)))
    url = storage or (folder.study_url if folder.study_db.exists() else None)
    studies, note = study_history(url) if url else (None, None)
    return write_report(results, output, studies=studies, studies_note=note, **kwargs)
