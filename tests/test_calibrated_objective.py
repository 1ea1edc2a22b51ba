"""``objective: {calibrate: ...}``: the study maximises the trained score a calibration predicts from the proxy's
scores, and ``dmo correlate`` reports the calibrated rho next to the raw one.

The studies run on the ``replay`` backend over a constructed table in which the proxy (a linear merge: exact at
the vertices, linear in the weights) and training disagree: training is concave in the proxy's score, so the
trained optimum is inside the simplex, while a linear proxy's optimum is always a vertex.
"""

from __future__ import annotations

import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from scipy import stats
from sklearn.isotonic import IsotonicRegression

from dmo.analysis.correlate import MEAN_SCORE, correlate
from dmo.analysis.tables import correlation_rows
from dmo.calibration import DEFAULT_CALIBRATION
from dmo.config import load_space
from dmo.errors import DmoError
from dmo.mixture import Mixture, lattice
from dmo.results import ResultsTable, ScoreRow
from dmo.search.launch import WorkerSpec
from dmo.search.storage import make_storage
from dmo.search.study import FIT_ATTR, MIXTURE_ATTR, PROXY_VALUE_ATTR, space_hash, study_paths
from dmo.session import Session, objective_for, scorer_for

ROOT = Path(__file__).resolve().parent.parent
DOMAINS = ["a", "b", "c"]
BENCHMARKS = ["b1", "b2"]
#: expert scores per benchmark: the proxy of w is sum_i w_i * expert_i (a vertex's proxy is its expert)
EXPERTS = {"a": (1.0, 0.0), "b": (0.0, 0.9), "c": (0.0, 0.0)}
#: trained mixtures (two seeds each, scores +- 0.01 around the truth, so the mean is the truth)
TRAINED = [(0.25, 0.75, 0.0), (0.5, 0.5, 0.0), (0.75, 0.25, 0.0), (0.5, 0.0, 0.5), (0.0, 0.5, 0.5)]


def proxy_scores(w: Mixture) -> tuple[float, float]:
    return tuple(sum(w[d] * EXPERTS[d][i] for d in DOMAINS) for i in range(len(BENCHMARKS)))  # type: ignore[return-value]


def truth_scores(w: Mixture) -> tuple[float, float]:
    # concave and increasing in the proxy's score, equal to it at the vertices (the experts): cube root, scaled
    tops = [max(e[i] for e in EXPERTS.values()) for i in range(len(BENCHMARKS))]
    return tuple(t * (p / t) ** (1 / 3) for p, t in zip(proxy_scores(w), tops))  # type: ignore[return-value]


def mix(w: tuple[float, ...], domains: list[str] = DOMAINS) -> Mixture:
    return Mixture.from_mapping(dict(zip(domains, w)), domains)


def write_recorded(path: Path, trained: list[tuple[float, ...]] = TRAINED) -> Path:
    rows = []
    for m in lattice(DOMAINS, 8):
        rows += [ScoreRow("proxy", m.id, b, s, weights=m.as_dict(), method="linear", metric="acc")
                 for b, s in zip(BENCHMARKS, proxy_scores(m))]  # fmt: skip
    for d, scores in EXPERTS.items():
        rows += [ScoreRow("expert", d, b, s, metric="acc") for b, s in zip(BENCHMARKS, scores)]
    for w in trained:
        m = mix(w)
        for seed, noise in ((0, 0.01), (1, -0.01)):
            rows += [ScoreRow("trained", m.id, b, s + noise, weights=m.as_dict(), seed=seed, metric="acc")
                     for b, s in zip(BENCHMARKS, truth_scores(m))]  # fmt: skip
    ResultsTable(path).append(rows)
    return path


def write_space(
    root: Path,
    recorded: Path,
    calibrate: str | None = "{method: isotonic}",
    trained: list[tuple[float, ...]] = TRAINED,
    domains: list[str] = DOMAINS,
    name: str = "rp",
) -> Path:
    """A grid over the lattice of resolution 4 of ``domains``, with a manifest that lists ``trained``."""
    for d in ("base", "ea", "eb", "ec"):
        (root / "models" / d).mkdir(parents=True, exist_ok=True)
    listed = "".join(
        f"  - {{mixture: {{{', '.join(f'{d}: {x}' for d, x in zip(DOMAINS, w))}}}, seed: {seed}, hub: fake/t}}\n"
        for w in trained
        for seed in (0, 1)
    )
    (root / "experts.yaml").write_text(
        "name: fake\nbase: ./models/base\nexperts: {a: ./models/ea, b: ./models/eb, c: ./models/ec}\n"
        + (f"trained:\n{listed}" if listed else "")
    )
    objective = f"objective: {{aggregate: mean, calibrate: {calibrate}}}\n" if calibrate else ""
    path = root / f"{name}.yaml"
    path.write_text(
        f"name: {name}\ndomains: [{', '.join(domains)}]\nexperts: experts.yaml\n"
        "mixtures: {lattice: {resolution: 4}}\nbenchmarks: [b1, b2]\nsampler: {name: grid}\n"
        f"scoring: {{backend: replay, replay: {{table: {recorded}, nearest: true}}}}\n{objective}"
    )
    return path


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DMO_RESULTS", str(tmp_path / "results"))
    write_recorded(tmp_path / "recorded.jsonl")
    return tmp_path


def best_of(session: Session, study_name: str) -> tuple[str, float, optuna.Study]:
    session.run_study(progress=False, study_name=study_name)
    paths = study_paths(session.space, None, study_name)
    study = optuna.load_study(study_name=study_name, storage=make_storage(paths.storage))
    return study.best_trial.user_attrs[MIXTURE_ATTR], study.best_value, study


# ------------------------------------------------------------------------------------------------ the study


def test_the_study_follows_the_calibrated_objective_not_the_proxy(world: Path) -> None:
    recorded = world / "recorded.jsonl"
    raw = Session.open(write_space(world / "raw", recorded, calibrate=None))
    calibrated = Session.open(write_space(world / "cal", recorded))
    assert calibrated.space.objective.calibrate is not None
    assert calibrated.space.objective.calibrate.method == "isotonic"
    assert space_hash(raw.space) != space_hash(calibrated.space)  # a calibrated study is another study

    raw_best, raw_value, _ = best_of(raw, "raw")
    assert raw_best == mix((1, 0, 0)).id and raw_value == pytest.approx(0.5)  # a linear proxy's optimum: a vertex

    cal_best, cal_value, study = best_of(calibrated, "cal")
    inside = mix((0.5, 0.5, 0))
    assert cal_best == inside.id  # the trained optimum among the candidates (a fitted point)
    assert cal_value == pytest.approx(float(np.mean(truth_scores(inside))), abs=1e-9)
    for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        # the proxy's own aggregate stays on the trial, next to the calibrated value
        assert t.user_attrs[PROXY_VALUE_ATTR] == pytest.approx(
            np.mean([t.user_attrs[f"score:{b}"] for b in BENCHMARKS])
        )
        if t.user_attrs[MIXTURE_ATTR] == mix((1, 0, 0)).id:
            assert t.value == pytest.approx(0.5)  # a vertex is an exact point: its expert
    # the trained models and the trained mixtures' proxies went through the cache (the space's results table)
    rows = list(calibrated.table.records())
    assert {r["kind"] for r in rows} >= {"expert", "trained", "proxy"}


def test_the_calibrated_objective_matches_the_calibration_and_is_rebuilt_the_same(world: Path) -> None:
    session = Session.open(write_space(world, world / "recorded.jsonl", calibrate="hybrid"))
    objective = session.objective()
    assert objective is not None and objective.n_trained == len(TRAINED) and objective.notes == []
    # the experts are exact points at the vertices, then the trained mixtures (mean over seeds)
    np.testing.assert_allclose(objective.weights[:3], np.eye(3))
    np.testing.assert_allclose(objective.truth[:3], np.array(list(EXPERTS.values())))
    m = mix((0.25, 0.5, 0.25))
    scores = dict(zip(BENCHMARKS, proxy_scores(m)))
    from dmo.calibration import hybrid_predict

    want = np.mean([
        hybrid_predict(objective.weights, objective.proxy[:, i], objective.truth[:, i], np.array([m.weights]),
                       np.array([scores[b]]))[0, 0]
        for i, b in enumerate(BENCHMARKS)
    ])  # fmt: skip
    assert objective(m, scores) == pytest.approx(want)
    # what a worker process builds from the same space and table (a picklable factory) gives the same values
    again = objective_for(session.space, scorer_for(session.space))
    assert again is not None and again(m, scores) == objective(m, scores)
    spec = WorkerSpec(session.space, "sqlite://", "x", None, str(world), scorer_for, 1, objective_for)
    assert pickle.loads(pickle.dumps(spec)).open_objective is objective_for
    # an uncalibrated space has no objective of its own (the trial loop uses the space's aggregate)
    assert (
        objective_for(load_space(write_space(world / "plain", world / "recorded.jsonl", calibrate=None)), None) is None
    )  # type: ignore[arg-type]


def test_trained_scores_ingested_into_the_table_count_too(world: Path) -> None:
    """Ground truth that is only in the results table (e.g. from dmo ingest), not in the manifest."""
    path = write_space(world, world / "recorded.jsonl", trained=[])
    session = Session.open(path)
    m = mix((0.5, 0.5, 0))
    session.table.append(
        [ScoreRow("trained", m.id, b, s, weights=m.as_dict(), seed=0) for b, s in zip(BENCHMARKS, truth_scores(m))]
    )
    objective = session.objective()
    assert objective is not None and objective.n_trained == 1
    assert objective(m, dict(zip(BENCHMARKS, proxy_scores(m)))) == pytest.approx(np.mean(truth_scores(m)))


# ------------------------------------------------------------------------------------------------ bad input


def test_too_few_trained_mixtures_for_the_method_says_how_many(world: Path) -> None:
    session = Session.open(write_space(world, world / "recorded.jsonl", calibrate="hybrid", trained=TRAINED[:1]))
    with pytest.raises(DmoError, match=r"'hybrid' needs at least 2 trained mixtures .*; got 1") as err:
        session.objective()
    assert "\n" not in str(err.value) and "space 'rp'" in str(err.value)


def test_no_ground_truth_is_a_clear_error(world: Path) -> None:
    session = Session.open(write_space(world, world / "recorded.jsonl", trained=[]))
    with pytest.raises(
        DmoError, match=r"^space 'rp' has no trained mixtures: train some .* or drop objective\.calibrate$"
    ):
        session.objective()
    # ... before the study opens: nothing is recorded in a study storage
    with pytest.raises(DmoError, match="no trained mixtures"):
        session.run_study(progress=False)
    assert not study_paths(session.space).folder.joinpath("study.db").exists()


def test_trained_mixtures_over_other_domains_are_ignored_or_refused(world: Path) -> None:
    recorded = world / "recorded.jsonl"
    two = ["a", "b"]
    # the replay table answers by mixture id, and ids name the space's domains: record the 2-domain models too
    rows = []
    for m in lattice(two, 8):
        scores = proxy_scores(mix((*m.weights, 0.0)))
        rows += [
            ScoreRow("proxy", m.id, b, s, weights=m.as_dict(), method="linear") for b, s in zip(BENCHMARKS, scores)
        ]
    for w in TRAINED:
        m = mix(w[:2], two) if w[2] == 0 else None
        if m is not None:
            rows += [ScoreRow("trained", m.id, b, s, weights=m.as_dict(), seed=seed)
                     for seed in (0, 1) for b, s in zip(BENCHMARKS, truth_scores(mix(w)))]  # fmt: skip
    ResultsTable(recorded).append(rows)
    # (0.5, 0, 0.5) and (0, 0.5, 0.5) weigh domain c, which this 2-domain space does not have
    session = Session.open(write_space(world / "some", recorded, domains=two))
    objective = session.objective()
    assert objective is not None and objective.n_trained == 3
    assert len(objective.notes) == 1 and "ignored 2 trained mixture(s) over other domains" in objective.notes[0]
    only_other = [w for w in TRAINED if w[2] > 0]
    session = Session.open(write_space(world / "none", recorded, domains=two, trained=only_other, name="other"))
    with pytest.raises(DmoError, match=r"has no trained mixtures \(the 2 found are over other domains\)"):
        session.objective()


def test_calibrate_without_a_method_is_the_default(tmp_path: Path) -> None:
    space = load_space(write_space(tmp_path, tmp_path / "recorded.jsonl", calibrate="{}"))
    assert space.objective.calibrate is not None and space.objective.calibrate.method == DEFAULT_CALIBRATION


@pytest.mark.parametrize(
    "calibrate,message",
    [
        ("scale", "'scale' picks a proxy option"),
        ("{method: spline}", "unknown calibration 'spline': choose one of"),
        ("{methd: isotonic}", "calibrate.methd: unknown key"),
    ],
)
def test_bad_calibration_names_are_refused_on_loading(tmp_path: Path, calibrate: str, message: str) -> None:
    path = write_space(tmp_path, tmp_path / "recorded.jsonl", calibrate=calibrate)
    with pytest.raises(DmoError, match=message) as err:
        load_space(path)
    assert "\n" not in str(err.value)


def test_the_command_line_says_it_in_one_line(world: Path) -> None:
    path = write_space(world, world / "recorded.jsonl", calibrate="hybrid", trained=TRAINED[:1])
    env = {**os.environ, "DMO_RESULTS": str(world / "results")}
    out = subprocess.run([sys.executable, "-m", "dmo.cli", "study", str(path)], capture_output=True, text=True,
                         env=env, cwd=world, timeout=300)  # fmt: skip
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "needs at least 2 trained mixtures" in lines[0] and "got 1" in lines[0], out.stderr


# ---------------------------------------------------------------------------------------------- dmo correlate


def random_table(rng: np.random.Generator, n: int, n_bench: int = 3) -> pd.DataFrame:
    rows = []
    benches = [f"b{i}" for i in range(n_bench)]
    for d in DOMAINS:
        rows += [dict(kind="expert", mixture=d, benchmark=b, score=rng.random()) for b in benches]
    for _ in range(n):
        a, b = np.round(rng.dirichlet([1, 1, 1])[:2], 4)
        m = Mixture.from_mapping({"a": a, "b": b, "c": 1 - a - b}, DOMAINS)
        w = {f"w_{d}": m[d] for d in DOMAINS}
        for b in benches:
            rows.append(dict(kind="proxy", mixture=m.id, method="linear", benchmark=b, score=rng.random(), **w))
            for seed in (0, 1):
                rows.append(dict(kind="trained", mixture=m.id, seed=seed, benchmark=b, score=rng.random(), **w))
    df = pd.DataFrame(rows)
    df["group"], df["status"] = "g", "ok"
    df.loc[df["kind"] != "proxy", "method"] = ""
    return df


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_correlate_calibrated_rho_equals_an_independent_leave_one_out(seed: int) -> None:
    rng = np.random.default_rng(seed)
    df = random_table(rng, n=9)
    table = correlate(df, n_boot=200, seed=seed, n_perm=50, calibration="isotonic")
    row = table[table["benchmark"] == MEAN_SCORE].iloc[0]
    assert row["calibration"] == "isotonic"

    ok = df[df["kind"] != "expert"]
    proxy = ok[ok["kind"] == "proxy"].pivot_table(index="mixture", columns="benchmark", values="score")
    truth = ok[ok["kind"] == "trained"].pivot_table(index="mixture", columns="benchmark", values="score")
    experts = df[df["kind"] == "expert"].pivot_table(index="mixture", columns="benchmark", values="score")
    mixtures = sorted(proxy.index)
    pred = []
    for held in mixtures:
        rest = [m for m in mixtures if m != held]
        per_bench = []
        for b in proxy.columns:
            # the experts are exact points (their proxy is the expert), then the other trained mixtures
            x = np.concatenate([experts.loc[DOMAINS, b], proxy.loc[rest, b]])
            y = np.concatenate([experts.loc[DOMAINS, b], truth.loc[rest, b]])
            iso = IsotonicRegression(out_of_bounds="clip").fit(x, y)
            per_bench.append(iso.predict([proxy.at[held, b]])[0])
        pred.append(np.mean(per_bench))
    pred, y = np.array(pred), truth.loc[mixtures].mean(axis=1).to_numpy()
    want = stats.spearmanr(pred, y)[0]
    assert row["calibrated_spearman"] == pytest.approx(want, abs=1e-12)
    # its CI: the same bootstrap resamples of the mixtures as the raw rho's
    sel = np.random.default_rng(seed).integers(0, len(y), size=(200, len(y)))
    boot = [stats.spearmanr(pred[s], y[s])[0] for s in sel]
    boot = np.array([b for b in boot if math.isfinite(b)])
    lo, hi = np.percentile(boot, [2.5, 97.5])
    assert (row["calibrated_lo"], row["calibrated_hi"]) == pytest.approx((lo, hi), abs=1e-9)
    assert row["calibrated_lo"] <= row["calibrated_spearman"] <= row["calibrated_hi"]
    # the raw rho is unchanged, and both are rendered side by side
    assert row["spearman"] == pytest.approx(stats.spearmanr(proxy.loc[mixtures].mean(axis=1), y)[0])
    head, cells = correlation_rows(table)
    i = head.index("calibrated rho [95% CI]")
    assert head[i - 1] == "proxy rho [95% CI]"
    mean_cells = next(c for c in cells if c[2] == MEAN_SCORE)
    assert mean_cells[i].startswith(f"{row['calibrated_spearman']:+.2f} [")
    assert all(c[i] == "-" for c in cells if c[2] != MEAN_SCORE)


def test_correlate_columns_are_appended_and_other_methods_work() -> None:
    df = random_table(np.random.default_rng(5), n=6)
    default = correlate(df, n_boot=50, n_perm=20)
    assert set(default["calibration"]) == {"", DEFAULT_CALIBRATION}  # only the mean-score row has one
    table = correlate(df, n_boot=50, n_perm=20, calibration="hybrid")
    assert list(table.columns)[-4:] == ["calibrated_spearman", "calibrated_lo", "calibrated_hi", "calibration"]
    row = table[table["benchmark"] == MEAN_SCORE].iloc[0]
    assert row["calibration"] == "hybrid" and math.isfinite(row["calibrated_spearman"])
    # too few trained mixtures for the method (hybrid needs 2 besides the held-out one): no calibrated rho
    small = correlate(random_table(np.random.default_rng(5), n=2), n_boot=50, n_perm=20, calibration="hybrid")
    assert math.isnan(small[small["benchmark"] == MEAN_SCORE].iloc[0]["calibrated_spearman"])


def test_dmo_correlate_shows_the_calibrated_column(tmp_path: Path) -> None:
    path = tmp_path / "scores.jsonl"
    write_recorded(path)
    env = {**os.environ, "COLUMNS": "250"}
    out = subprocess.run([sys.executable, "-m", "dmo.cli", "correlate", str(tmp_path), "--format", "markdown"],
                         capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "calibrated rho [95% CI]" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "dmo.cli", "correlate", str(tmp_path), "--calibration", "scale"],
                         capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert bad.returncode == 2 and "picks a proxy option" in bad.stderr


def test_workers_rebuild_the_same_calibrated_objective(world: Path) -> None:
    from dmo.search.launch import run_workers

    session = Session.open(write_space(world, world / "recorded.jsonl"))
    objective = session.objective()
    assert objective is not None
    run_workers(session.space, session.scorer, 2, progress=False, open_scorer=scorer_for, open_objective=objective_for)
    paths = study_paths(session.space)
    study = optuna.load_study(study_name=paths.study_name, storage=make_storage(paths.storage))
    done = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(done) == len(session.space.candidates())
    for t in done:
        m = next(c for c in session.space.candidates() if c.id == t.user_attrs[MIXTURE_ATTR])
        assert t.value == objective(m, {b: t.user_attrs[f"score:{b}"] for b in BENCHMARKS})
    assert study.best_trial.user_attrs[MIXTURE_ATTR] == mix((0.5, 0.5, 0)).id


def test_a_resumed_study_on_changed_ground_truth_says_its_old_values_are_stale(
    world: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """New trained mixtures refit the objective; trials valued under the old fit are flagged, not silently mixed."""
    path = write_space(world, world / "recorded.jsonl", calibrate="{method: residual}")
    space = load_space(path).model_copy(
        update={"sampler": load_space(path).sampler.model_copy(update={"name": "random", "n_trials": 3})}
    )
    session = Session.open(path, space=space)
    first = session.objective()
    session.run_study(progress=False, objective=first, study_name="again")
    study = optuna.load_study(study_name="again", storage=make_storage(study_paths(space, None, "again").storage))
    fits = {t.user_attrs[FIT_ATTR] for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))}
    assert fits == {first.fit_id}
    with caplog.at_level("WARNING", logger="dmo.study"):
        session.run_study(n_trials=4, progress=False, objective=session.objective(), study_name="again")
    assert "valued by a calibration" not in caplog.text  # same ground truth, same fit: nothing to say
    m = mix((0.25, 0.25, 0.5))
    session.table.append(
        [ScoreRow("trained", m.id, b, s, weights=m.as_dict(), seed=0) for b, s in zip(BENCHMARKS, truth_scores(m))]
    )
    refit = session.objective()
    assert refit.fit_id != first.fit_id
    with caplog.at_level("WARNING", logger="dmo.study"):
        session.run_study(n_trials=5, progress=False, objective=refit, study_name="again")
    assert "4 earlier trial(s) were valued by a calibration fitted on other ground truth" in caplog.text
