"""Glue from a search space to a running study: resolve the experts, build a scorer, score references.

A :class:`Session` holds one space, its expert manifest, the scorer and the results table at
``results/<space>/scores.jsonl``. ``experts: NAME`` in a space names an expert source (:mod:`dmo.sources`), e.g.
``tinyworld``: the embedded tiny world, built (or reused from the cache) on first use.

:func:`score_references` scores what is not a proxy (``dmo score``, and the first step of ``dmo demo``): the base, the
space's experts and the manifest's models trained on mixtures of the space, through the cache, each under the same
claim as a study's proxies, in one or several worker processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing as mp
import os
import queue as queue_mod
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dmo.config import SearchSpace, load_space, parse_space
from dmo.errors import DmoError
from dmo.manifest import ExpertManifest, load_manifest
from dmo.mixture import Mixture
from dmo.paths import SpaceFolder, results_dir
from dmo.progress import progress_bar
from dmo.results import ResultsTable
from dmo.scoring.base import Scorer, ScoringContext, Target, TargetRefused, make_scorer, score_targets
from dmo.search.claims import claim_key, scoring_claim
from dmo.search.study import StudyResult, study_paths
from dmo.search.trials import ScoreObjective, proxy_target, run_study
from dmo.sources import is_source_name, resolve_source

if TYPE_CHECKING:
    from rich.console import Console

    from dmo.calibration import CalibrationPoints
    from dmo.scoring.items import ItemStore


#: what ``dmo score --targets`` may name: the references of a space (everything that is not a proxy)
TARGET_KINDS = ("base", "experts", "trained")


def parse_target_kinds(text: str) -> tuple[str, ...]:
    """``base,experts,trained`` (any of them, in any order) as a tuple; anything else is one line."""
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in TARGET_KINDS]
    if unknown or not kinds:
        what = f"unknown target {unknown[0]!r}" if unknown else "no target"
        raise DmoError(f"--targets: {what}: name some of {', '.join(TARGET_KINDS)} (comma-separated)")
    return tuple(k for k in TARGET_KINDS if k in kinds)


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
        context = ScoringContext(
            manifest,
            include_path=include_path,
            limit=space.scoring.limit,
            batch_size=space.scoring.batch_size,
            device=space.scoring.device,
            metric_map=metric_map,
        )
        scorer = make_scorer(space.scoring.backend, context, space.scoring.backend_options())
        if space.benchmarks:
            scorer.check(space.benchmarks)  # metrics, task names, validation data: each backend knows what it needs
        assert space.name is not None
        table = ResultsTable(SpaceFolder.for_space(space.name).scores)
        return cls(space, manifest, scorer, table, include_path)

    def references(self, kinds: Sequence[str] = TARGET_KINDS) -> list[Target]:
        """The base, the space's experts, and every trained model of a mixture in the space (those of ``kinds``)."""
        out = [Target("base")] if "base" in kinds else []
        out += [Target("expert", domain=d) for d in self.space.domains] if "experts" in kinds else []
        return out + (trained_targets(self.space, self.manifest)[0] if "trained" in kinds else [])

    def objective(self, progress: bool = False) -> CalibratedObjective | None:
        """What the space's study maximises: None for the space's aggregate of the proxy's scores, else the
        calibrated objective (:func:`calibrated_objective`), fitted now."""
        if self.space.objective.calibrate is None:
            return None
        return calibrated_objective(self.space, self.manifest, self.scorer, self.table, progress=progress)

    def score(self, targets: list[Target], description: str, progress: bool = True) -> Scored:
        """Score targets through the cache, with a progress bar; a failure is recorded, not fatal."""
        with progress_bar(enabled=progress) as bar:
            task = bar.add_task(description, total=len(targets))
            return self.score_each(targets, lambda n: bar.advance(task, n))

    def score_each(self, targets: Sequence[Target], advance: Callable[[int], None] = lambda n: None) -> Scored:
        """Score targets through the cache, each under its scoring claim (a target being scored by another process
        is waited for, then read from the cache); a failure is recorded, not fatal."""
        if not self.space.benchmarks:
            raise DmoError(f"search space {self.space.name!r} lists no benchmarks: add 'benchmarks: [...]' to it")
        done = Scored()
        count = lambda _: setattr(done, "evaluated", done.evaluated + 1)  # noqa: E731
        folder = self.table.path.parent
        # in groups, so that a backend that can score several targets together (vllm: one engine batch for several
        # LoRA-served models) does; each group is recorded as soon as it is scored
        step = max(1, self.scorer.max_batch)
        store = self._item_store()
        for k in range(0, len(targets), step):
            group = list(targets[k : k + step])
            with contextlib.ExitStack() as claims:
                # in the group's order (every process claims in the references' order: no two wait on each other),
                # each key once (a second flock on one file blocks even within a process)
                for key in dict.fromkeys(claim_key(self.scorer, t) for t in group):
                    claims.enter_context(scoring_claim(folder, key))
                try:
                    if store is None:
                        results = score_targets(
                            self.scorer, self.table, group, self.space.benchmarks, group=self.space.name or "",
                            on_evaluate=count,
                        )  # fmt: skip
                    else:  # a staged space keeps every model's item scores, in the one item order
                        from dmo.scoring.items import score_items

                        items = score_items(self.scorer, self.table, store, group, store.totals,
                                            group=self.space.name or "", on_evaluate=count)  # fmt: skip
                        results = [(i.means, i.errors) for i in items]
                except TargetRefused:  # one by one, to keep the others
                    results = []
                    for t in group:
                        try:
                            results += score_targets(self.scorer, self.table, [t], self.space.benchmarks,
                                                     group=self.space.name or "", on_evaluate=count)  # fmt: skip
                        except TargetRefused as exc:
                            results.append(({}, {"": str(exc)}))
            for t, (_, errors) in zip(group, results):
                done.targets += 1
                if errors:
                    seed = f" seed {t.seed}" if t.kind == "trained" else ""
                    done.failed.append(f"{t.kind} {t.label}{seed}: {next(iter(errors.values()))}")
            advance(len(group))
        return done

    def _item_store(self) -> ItemStore | None:
        from dmo.scoring.items import ItemStore
        from dmo.search.stages import stages_of

        if not stages_of(self.space):
            return None
        assert self.space.name is not None
        return ItemStore.open(SpaceFolder.for_space(self.space.name), self.scorer, self.space.benchmarks)

    def run_study(
        self,
        n_trials: int | None = None,
        storage: str | None = None,
        study_name: str | None = None,
        progress: bool = True,
        batch: int | None = None,
        objective: ScoreObjective | None = None,
    ) -> StudyResult:
        """Run the space's study; ``objective``: one fitted by :meth:`objective` already (else fitted here)."""
        paths = study_paths(self.space, storage, study_name)
        return run_study(
            self.space, self.scorer, paths, n_trials=n_trials, progress=progress, batch=study_batch(self.scorer, batch),
            objective=objective or self.objective(),
        )  # fmt: skip

    def rescore_pruned(
        self, storage: str | None = None, study_name: str | None = None, progress: bool = True
    ) -> list[tuple[str, float | None, float]]:
        """Score in full the proxies the space's study pruned, each continuing from its last scored item (item
        scores are never computed twice); returns (mixture, partial value, full value) per pruned mixture. The
        trials stay pruned in the study (Optuna's finished trials do not change); the full scores go to the results
        table, where every reader finds them."""
        import optuna

        from dmo.scoring.items import score_items
        from dmo.search.stages import ITEMS_ATTR
        from dmo.search.storage import make_storage, storage_errors
        from dmo.search.study import MIXTURE_ATTR

        paths = study_paths(self.space, storage, study_name)
        with storage_errors(paths.storage):
            try:
                study = optuna.load_study(study_name=paths.study_name, storage=make_storage(paths.storage))
            except KeyError:
                raise DmoError(
                    f"no study {paths.study_name!r} in {paths.storage}: pass the --study-name (and --storage) of the "
                    "study whose pruned proxies to score"
                ) from None
            pruned = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.PRUNED,))
        mixtures: dict[str, float | None] = {}
        for t in pruned:
            if ITEMS_ATTR in t.user_attrs and MIXTURE_ATTR in t.user_attrs:
                mixtures.setdefault(t.user_attrs[MIXTURE_ATTR], t.value)
        from dmo.scoring.items import ItemStore

        store = ItemStore.open(paths.folder, self.scorer, self.space.benchmarks)
        make, out = proxy_target(self.space), []
        with progress_bar(enabled=progress) as bar:
            task = bar.add_task("pruned proxies, in full", total=len(mixtures))
            for label, partial in mixtures.items():
                target = make(Mixture.parse(label, self.space.domains))
                (res,) = score_items(self.scorer, self.table, store, [target], store.totals, self.space.name or "")
                if res.errors:
                    raise DmoError(f"scoring {label} in full failed: {next(iter(res.errors.values()))}")
                out.append((label, partial, float(self.space.objective(res.means))))
                bar.advance(task)
        return out


@dataclass
class Scored:
    """What a round of scoring did: targets seen, of them evaluated now (the rest came from the cache), failures."""

    targets: int = 0
    evaluated: int = 0
    failed: list[str] = field(default_factory=list)

    def add(self, other: Scored) -> None:
        self.targets += other.targets
        self.evaluated += other.evaluated
        self.failed += other.failed


def score_references(
    session: Session,
    kinds: Sequence[str] = TARGET_KINDS,
    workers: int = 1,
    progress: bool = True,
    console: Console | None = None,
) -> Scored:
    """Score the space's references of ``kinds`` (``dmo score``): through the cache (a target scored before, by any
    command, is read, not scored again, so running it again resumes), each under a scoring claim, so that ``dmo
    score`` runs on other hosts sharing the results folder never score one target twice; with ``workers``, in that
    many processes, each with its own scorer and every ``workers``-th target.

    A target that fails is recorded as failed and reported; the others go on. Raises only for bad input, or when
    every worker process stopped.
    """
    targets = session.references(kinds)
    if not targets:
        return Scored()
    if workers < 1:
        raise DmoError(f"--workers must be at least 1, got {workers}")
    if workers == 1:
        return session.score(targets, f"{', '.join(kinds)} of {session.space.name}", progress=progress)
    from rich.console import Console

    return _score_in_workers(session, kinds, len(targets), workers, progress, console or Console(stderr=True))


def _score_in_workers(
    session: Session, kinds: Sequence[str], total: int, workers: int, progress: bool, console: Console
) -> Scored:
    ctx = mp.get_context("spawn")
    messages: Any = ctx.Queue()
    root = str(results_dir().resolve())
    procs = [
        ctx.Process(target=_score_worker, args=(session.space, tuple(kinds), i, workers, root, messages))
        for i in range(workers)
    ]
    out, errors = Scored(), {}
    try:
        for p in procs:
            p.start()
        with progress_bar(console=console, enabled=progress) as bar:
            task = bar.add_task(f"{', '.join(kinds)} of {session.space.name} ({workers} workers)", total=total)
            while any(p.exitcode is None for p in procs) or not messages.empty():
                try:
                    kind, index, payload = messages.get(timeout=0.3)
                except queue_mod.Empty:
                    continue
                if kind == "scored":
                    bar.advance(task, payload.targets)
                    out.add(payload)
                else:
                    errors[index] = payload
    except BaseException:
        for p in procs:
            if p.is_alive():
                p.terminate()  # its claims pass on; what it recorded stays, the rest is scored by the next run
        raise
    for p in procs:
        p.join()
    stopped = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode != 0]
    for i, code in stopped:
        console.print(
            f"[bold yellow]warning:[/] worker {i} stopped (exit code {code}){': ' + errors[i] if i in errors else ''}",
            highlight=False, soft_wrap=True,
        )  # fmt: skip
    if stopped and len(stopped) == len(procs):
        i, code = stopped[0]
        raise DmoError(
            f"all {workers} scoring workers stopped; first: worker {i} (exit code {code}){': ' + errors.get(i, '')}; "
            "fix the cause and run the same command to resume"
        )
    return out


def _score_worker(
    space: SearchSpace, kinds: tuple[str, ...], index: int, workers: int, results: str, messages: Any
) -> None:
    """Body of one ``dmo score --workers N`` process: its own session and scorer, and every ``workers``-th target
    (the claims keep it from scoring one that a ``dmo score`` elsewhere is scoring at the same time)."""
    os.environ["DMO_RESULTS"] = results
    try:
        session = Session.open("", space=space)
        share = session.references(kinds)[index::workers]
        step = max(1, session.scorer.max_batch)
        for k in range(0, len(share), step):
            messages.put(("scored", index, session.score_each(share[k : k + step])))
    except DmoError as exc:
        messages.put(("error", index, str(exc)))
        _leave(messages, 2)
    except BaseException as exc:  # a bug: the traceback is what the user must send
        messages.put(("error", index, f"{type(exc).__name__}: {exc}"))
        traceback.print_exc()
        _leave(messages, 1)


def _leave(messages: Any, code: int) -> None:
    messages.close()
    messages.join_thread()  # the parent must get the message before the process is gone
    sys.exit(code)


def trained_targets(space: SearchSpace, manifest: ExpertManifest) -> tuple[list[Target], list[str]]:
    """The manifest's trained models of mixtures in the space, and the ids of those trained on other domains."""
    kept, other = [], []
    for mixture, seed, _ in manifest.trained_mixtures():
        weights = mixture.as_dict()
        if any(w > 0 and d not in space.domains for d, w in weights.items()):
            other.append(mixture.id)
            continue
        m = Mixture.from_mapping({d: w for d, w in weights.items() if d in space.domains}, space.domains)
        kept.append(Target("trained", mixture=m, seed=seed))
    return kept, other


@dataclass
class CalibratedObjective:
    """A trial's objective under ``objective: {calibrate: ...}``: the space's aggregate of the trained scores that the
    calibration predicts from the mixture and its proxy's scores, fitted on the points below (the results table's
    :func:`dmo.calibration.calibration_points`: the experts at the vertices, then the trained mixtures)."""

    space: SearchSpace
    method: str
    weights: np.ndarray  # (points, K)
    proxy: np.ndarray  # (points, B)
    truth: np.ndarray  # (points, B)
    n_trained: int  # trained mixtures inside the simplex among the points
    notes: list[str] = field(default_factory=list)

    def predict(self, mixture: Mixture, scores: dict[str, float]) -> dict[str, float]:
        """Predicted trained score per benchmark."""
        from dmo.calibration import calibrated_predict

        benches = self.space.benchmarks
        w = np.array([[mixture[d] for d in self.space.domains]])
        p = np.array([[scores[b] for b in benches]])
        pred = calibrated_predict(self.method, self.weights, self.proxy, self.truth, w, p)[0]
        return {b: float(v) for b, v in zip(benches, pred)}

    def __call__(self, mixture: Mixture, scores: dict[str, float]) -> float:
        return float(self.space.objective(self.predict(mixture, scores)))

    @property
    def fit_id(self) -> str:
        """The method and every point it was fitted on (rounded past float noise): new ground truth, new id."""
        h = hashlib.sha256(self.method.encode())
        for a in (self.weights, self.proxy, self.truth):
            h.update(np.round(np.asarray(a, dtype=np.float64), 9).tobytes())
        return h.hexdigest()[:16]


def calibrated_objective(
    space: SearchSpace, manifest: ExpertManifest, scorer: Scorer, table: ResultsTable, progress: bool = False
) -> CalibratedObjective:
    """The calibrated objective of ``space`` (``objective.calibrate``), fitted on its ground truth.

    Scores, through the cache, the experts, the manifest's trained models of mixtures in the space and the proxies
    (the space's merge method) of every trained mixture of the space in the results table (also those ingested from
    lmms-eval output) that has none yet; then fits on the table's calibration points
    (:func:`dmo.calibration.calibration_points`, the rule ``dmo correlate`` and ``dmo suggest`` use too).
    Deterministic in the table, so every worker of a study rebuilds the same one. Refuses, in one line, a space with
    no trained mixture, or fewer than the method needs.
    """
    from dmo.calibration import FOREIGN_NOTE, calibration_points, check_trained

    assert space.objective.calibrate is not None
    method = space.objective.calibrate.method
    domains, benches, group = list(space.domains), list(space.benchmarks), space.name or ""
    where = f"space {space.name!r}: objective.calibrate {method}"
    if not benches:
        raise DmoError(f"search space {space.name!r} lists no benchmarks: add 'benchmarks: [...]' to it")
    kept, other = trained_targets(space, manifest)
    experts = [Target("expert", domain=d) for d in domains]
    with progress_bar(enabled=progress) as bar:
        task = bar.add_task("ground truth for the calibration", total=len(experts) + len(kept))
        _score_each(scorer, table, experts, benches, group)  # an expert that fails: its vertex is left out (a note)
        bar.advance(task, len(experts))
        trained_errors = _score_each(scorer, table, kept, benches, group)
        bar.advance(task, len(kept))

    def points() -> CalibrationPoints:
        return calibration_points(table.frame(), domains, benches, space.merge.method, group=group)

    found = points()
    if found.without_proxy:  # the proxies of trained mixtures not scored yet (a failure leaves its mixture out)
        make = proxy_target(space)
        targets = [make(Mixture(tuple(domains), tuple(w))) for w in found.without_proxy.values()]
        _score_each(scorer, table, targets, benches, group)
        found = points()
    # the table's mixtures over other domains are noted below, together with the manifest's
    notes = [f"{where}: {n}" for n in found.notes if not n.startswith(FOREIGN_NOTE)]
    if trained_errors:  # like any reference that fails: the others still count
        notes.append(
            f"{where}: {len(trained_errors)} trained model(s) of the manifest could not be scored and are left out; "
            f"first: {trained_errors[0]}"
        )
    foreign = sorted({*other, *found.foreign})
    if foreign:
        notes.append(
            f"{where}: ignored {len(foreign)} trained mixture(s) over other domains than {domains}: "
            + ", ".join(foreign[:5])
            + (", ..." if len(foreign) > 5 else "")
        )
    if len(found.names) == found.n_vertices:
        why = f" (the {len(foreign)} found are over other domains)" if foreign and not found.trained else ""
        raise DmoError(
            f"space {space.name!r} has no trained mixtures{why}: train some (dmo train mixtures, or dmo ingest their "
            "scores) or drop objective.calibrate"
        )
    try:
        check_trained(method, found.n_trained)
    except DmoError as exc:
        raise DmoError(f"space {space.name!r}: objective.calibrate: {exc}") from None
    return CalibratedObjective(
        space, method, weights=found.weights, proxy=found.proxy, truth=found.truth, n_trained=found.n_trained,
        notes=notes,
    )  # fmt: skip


def _score_each(
    scorer: Scorer, table: ResultsTable, targets: list[Target], benches: list[str], group: str
) -> list[str]:
    """Score targets through the cache, each failure kept apart from the others; what went wrong with each one."""
    try:
        results = score_targets(scorer, table, targets, benches, group=group)
    except TargetRefused:  # a backend that refuses a target (replay: not recorded): one by one, to keep the others
        results = []
        for t in targets:
            try:
                results.append(score_targets(scorer, table, [t], benches, group=group)[0])
            except TargetRefused as exc:
                results.append(({}, {"": str(exc)}))
    return [
        f"{t.label} seed {t.seed}: {next(iter(errors.values()))}" for t, (_, errors) in zip(targets, results) if errors
    ]


def objective_for(space: SearchSpace, scorer: Scorer) -> ScoreObjective | None:
    """The study objective of a space (what each worker process of :func:`dmo.search.launch.run_workers` builds):
    None for the space's aggregate, else its calibrated objective, from the space's results table."""
    if space.objective.calibrate is None:
        return None
    assert space.name is not None
    manifest, _ = resolve_experts(space)
    return calibrated_objective(space, manifest, scorer, ResultsTable(SpaceFolder.for_space(space.name).scores))


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
    from dmo.merge.registry import expert_at_vertex_methods
    from dmo.paths import scores_path
    from dmo.search.history import study_history

    folder = SpaceFolder.of(scores_path(Path(results)))
    url = storage or (folder.study_url if folder.study_db.exists() else None)
    studies, note = study_history(url) if url else (None, None)
    vertex = expert_at_vertex_methods()
    return write_report(results, output, studies=studies, studies_note=note, expert_at_vertex=vertex, **kwargs)
