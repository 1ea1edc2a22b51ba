"""One rule for the calibration points: a study's calibrated objective, ``dmo correlate``'s calibrated rho and
``dmo suggest`` fit the same points of one results table, and the rule is the one written down in
:func:`dmo.calibration.calibration_points` (checked against points written out by hand).

The table has every case the rule decides: an expert without a score on one benchmark, a proxy scored at a pure
mixture (unlike its expert), a trained mixture without a proxy, a trained mixture over another domain, a trained
model at a vertex, two seeds per mixture and a superseded (older) row of one seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from dmo import calibration as cal
from dmo.analysis import correlate as corr
from dmo.analysis import suggest as sg
from dmo.calibration import calibration_points
from dmo.cli import app
from dmo.mixture import Mixture
from dmo.results import ResultsTable, ScoreRow
from dmo.session import Session

DOMAINS = ["a", "b", "c"]
BENCH = ["x", "y"]
SPACE = "pts"


def mix(*w: float) -> Mixture:
    return Mixture(tuple(DOMAINS), w)


def proxy_score(m: Mixture, b: str) -> float:
    return 0.3 + 0.4 * m["a"] + (0.2 if b == "x" else -0.1) * m["b"] + 0.05 * m["c"]


def trained_score(m: Mixture, b: str) -> float:
    return 0.35 + 0.3 * m["a"] * m["b"] + 0.2 * m["b"] + (0.1 if b == "y" else 0.0) * m["c"]


EXPERTS = {"a": {"x": 0.9, "y": 0.7}, "b": {"x": 0.4, "y": 0.6}, "c": {"x": 0.5}}  # c: no score on y
PURE_A = {"x": 0.85, "y": 0.65}  # the proxy scored at the pure mixture a, not equal to expert a
T_WITH = [mix(0.5, 0.5, 0.0), mix(0.25, 0.25, 0.5), mix(0.125, 0.625, 0.25)]
T_WITHOUT = mix(0.5, 0.25, 0.25)  # trained, no proxy scored
T_VERTEX = mix(1.0, 0.0, 0.0)  # trained at vertex a: its proxy is the pure mixture's
CANDIDATES = [mix(0.25, 0.5, 0.25), mix(0.75, 0.25, 0.0), mix(0.0, 0.5, 0.5), mix(0.375, 0.375, 0.25)]
SEED_NOISE = {0: -0.02, 1: 0.04}


def rows() -> list[ScoreRow]:
    out = []
    for d, scores in EXPERTS.items():
        out += [ScoreRow("expert", d, b, s, metric="acc") for b, s in scores.items()]
    out += [ScoreRow("proxy", "a-1+b-0+c-0", b, PURE_A[b], weights={"a": 1.0, "b": 0.0, "c": 0.0}, group=SPACE,
                     method="linear") for b in BENCH]  # fmt: skip
    for m in [*T_WITH, *CANDIDATES]:
        out += [ScoreRow("proxy", m.id, b, proxy_score(m, b), weights=m.as_dict(), group=SPACE, method="linear")
                for b in BENCH]  # fmt: skip
    # another method's proxy of the mixture without a linear proxy: not a linear proxy
    out += [ScoreRow("proxy", T_WITHOUT.id, b, 0.99, weights=T_WITHOUT.as_dict(), group=SPACE, method="ties")
            for b in BENCH]  # fmt: skip
    for m in [*T_WITH, T_WITHOUT, T_VERTEX]:
        for seed, noise in SEED_NOISE.items():
            if seed == 0:  # an older row of this seed, superseded by the one after it (another cache key)
                out += [ScoreRow("trained", m.id, b, 0.01, weights=m.as_dict(), seed=0, key=f"old-{m.id}-{b}")
                        for b in BENCH]  # fmt: skip
            out += [ScoreRow("trained", m.id, b, trained_score(m, b) + noise, weights=m.as_dict(), seed=seed,
                             key=f"new-{m.id}-{seed}-{b}") for b in BENCH]  # fmt: skip
    other = {"a": 0.5, "d": 0.5}  # over a domain the space does not have
    out += [ScoreRow("trained", "a-0.5+d-0.5", b, 0.8, weights=other, seed=0) for b in BENCH]
    return out


def by_hand() -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """The points as the rule says, written out: vertices a, b (c lacks y); then the trained mixtures with a linear
    proxy, by id; each trained score the mean over both seeds' newest rows."""
    seed_mean = float(np.mean(list(SEED_NOISE.values())))
    names = ["a", "b"]
    weights = [[1, 0, 0], [0, 1, 0]]
    proxy = [[PURE_A[b] for b in BENCH], [EXPERTS["b"][b] for b in BENCH]]
    truth = [[EXPERTS["a"][b] for b in BENCH], [EXPERTS["b"][b] for b in BENCH]]
    for m in sorted([*T_WITH, T_VERTEX], key=lambda m: m.id):
        names.append(m.id)
        weights.append(list(m.weights))
        proxy.append([PURE_A[b] if m == T_VERTEX else proxy_score(m, b) for b in BENCH])
        truth.append([trained_score(m, b) + seed_mean for b in BENCH])
    return names, np.array(weights, float), np.array(proxy), np.array(truth)


@pytest.fixture
def table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ResultsTable:
    monkeypatch.setenv("DMO_RESULTS", str(tmp_path / "results"))
    t = ResultsTable(tmp_path / "results" / SPACE / "scores.jsonl")
    t.append(rows())
    return t


def test_the_points_follow_the_written_rule(table: ResultsTable) -> None:
    pts = calibration_points(table.frame(), DOMAINS, BENCH, "linear", group=SPACE)
    names, weights, proxy, truth = by_hand()
    assert list(pts.names) == names and pts.n_vertices == 2
    np.testing.assert_allclose(pts.weights, weights)
    np.testing.assert_allclose(pts.proxy, proxy, rtol=1e-12)
    np.testing.assert_allclose(pts.truth, truth, rtol=1e-12)
    assert pts.n_trained == len(T_WITH)  # the one at the vertex is not inside the simplex
    assert list(pts.without_proxy) == [T_WITHOUT.id] and T_WITHOUT.id in pts.trained
    assert pts.foreign == ("a-0.5+d-0.5",)
    text = " | ".join(pts.notes)
    assert "expert(s) c without a score" in text and T_WITHOUT.id in text and "a-0.5+d-0.5" in text
    # without the group filter the same (one group here); another method's proxies are another fit
    same = calibration_points(table.frame(), DOMAINS, BENCH, "linear")
    np.testing.assert_array_equal(same.proxy, pts.proxy)
    ties = calibration_points(table.frame(), DOMAINS, BENCH, "ties")
    # its only proxy, and the trained model at vertex a, whose proxy there is the expert (no ties proxy at the vertex)
    assert list(ties.names) == ["a", "b", T_WITHOUT.id, T_VERTEX.id]
    np.testing.assert_allclose(ties.proxy[-1], [EXPERTS["a"][b] for b in BENCH])


def _space(tmp_path: Path, table: ResultsTable) -> Path:
    for d in ("base", "ea", "eb", "ec"):
        (tmp_path / "models" / d).mkdir(parents=True, exist_ok=True)
    (tmp_path / "experts.yaml").write_text(
        "name: fake\nbase: ./models/base\nexperts: {a: ./models/ea, b: ./models/eb, c: ./models/ec}\n"
    )
    path = tmp_path / f"{SPACE}.yaml"
    path.write_text(
        f"name: {SPACE}\ndomains: [a, b, c]\nexperts: experts.yaml\nmixtures: {{lattice: {{resolution: 4}}}}\n"
        "benchmarks: [x, y]\nsampler: {name: grid}\n"
        f"scoring: {{backend: replay, replay: {{table: {table.path}, nearest: false}}}}\n"
        "objective: {aggregate: mean, calibrate: {method: residual}}\n"
    )
    return path


def test_study_correlate_and_suggest_fit_the_same_points(
    table: ResultsTable, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the study's objective: scores through the replay backend what is missing (expert c on y and the proxy of the
    # mixture without one are not recorded: both stay left out), then fits on the table's points
    recorded = ResultsTable(tmp_path / "recorded.jsonl")
    recorded.append(rows())
    session = Session.open(_space(tmp_path, recorded))
    assert session.table.path == table.path
    objective = session.objective()
    assert objective is not None
    names, weights, proxy, truth = by_hand()
    np.testing.assert_allclose(objective.weights, weights)
    np.testing.assert_allclose(objective.proxy, proxy, rtol=1e-12)
    np.testing.assert_allclose(objective.truth, truth, rtol=1e-12)
    assert objective.n_trained == len(T_WITH)
    assert any(T_WITHOUT.id in n for n in objective.notes) and any("expert(s) c" in n for n in objective.notes)
    frame = session.table.frame()  # what the study's scoring added included

    # dmo suggest: its known points (the posterior's inputs), objective = the mean over benchmarks
    seen: dict[str, np.ndarray] = {}
    real_posterior = sg.posterior

    def spy_posterior(known_w, known_y, known_p, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.update(w=np.array(known_w), y=np.array(known_y), p=np.array(known_p), n_fixed=kwargs["n_fixed"])
        return real_posterior(known_w, known_y, known_p, *args, **kwargs)

    monkeypatch.setattr(sg, "posterior", spy_posterior)
    s = sg.suggest(frame, k=1, domains=DOMAINS, benchmarks=BENCH, n_boot=0)
    np.testing.assert_allclose(seen["w"], weights)
    np.testing.assert_allclose(seen["p"], proxy.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(seen["y"], truth.mean(axis=1), rtol=1e-12)
    assert seen["n_fixed"] == 2 and s.n_experts == 2 and s.n_trained == len(names) - 2
    assert T_WITHOUT.id not in set(s.table["mixture"]) and any(T_WITHOUT.id in n for n in s.notes)

    # dmo correlate: the calibrated rho's leave-one-out fits (anchors = the vertices, the rest = trained mixtures)
    fits: list[tuple[np.ndarray, ...]] = []
    real_loo = corr.loo_predict

    def spy_loo(method, w, p, t, aw, ap, at):  # type: ignore[no-untyped-def]
        fits.append((np.vstack([aw, w]), np.vstack([ap, p]), np.vstack([at, t])))
        return real_loo(method, w, p, t, aw, ap, at)

    monkeypatch.setattr(corr, "loo_predict", spy_loo)
    table_rows = corr.correlate(frame, n_boot=50, n_perm=50, calibration="residual")
    assert len(fits) == 1  # the linear group (the ties group has one mixture: no mean-score row)
    np.testing.assert_allclose(fits[0][0], weights)
    np.testing.assert_allclose(fits[0][1], proxy, rtol=1e-12)
    np.testing.assert_allclose(fits[0][2], truth, rtol=1e-12)
    row = table_rows[(table_rows["method"] == "linear") & (table_rows["benchmark"] == corr.MEAN_SCORE)].iloc[0]
    # its rho: leave-one-out residual predictions of the trained points against their truth, by hand
    pred = [
        cal.residual_predict(np.delete(weights, i, 0), np.delete(proxy, i, 0), np.delete(truth, i, 0),
                             weights[i : i + 1], proxy[i : i + 1]).mean()
        for i in range(2, len(names))
    ]  # fmt: skip
    assert row["calibrated_spearman"] == pytest.approx(cal.spearman(np.array(pred), truth[2:].mean(axis=1)))


def test_suggest_works_on_a_table_shaped_like_the_demos(tmp_path: Path) -> None:
    """``dmo demo --space tiny-3d``'s table: the manifest's trained mixtures on the 2-domain edge have no proxy (the
    preset's are scored by the study). ``dmo suggest`` leaves them out with a note instead of refusing."""
    doms = ["counting", "general", "ocr"]
    rows = []
    for i, d in enumerate(doms):
        rows += [ScoreRow("expert", d, b, 0.3 + 0.1 * i + 0.05 * j) for j, b in enumerate(BENCH)]
    inside = [Mixture(tuple(doms), w) for w in [(0.2, 0.4, 0.4), (0.4, 0.3, 0.3), (0.1, 0.6, 0.3), (0.5, 0.25, 0.25)]]
    edge = [Mixture(tuple(doms), (0.0, 0.125, 0.875)), Mixture(tuple(doms), (0.0, 0.5, 0.5))]
    for m in [*inside, Mixture(tuple(doms), (1 / 3, 1 / 3, 1 / 3))]:
        rows += [ScoreRow("proxy", m.id, b, 0.4 + 0.1 * m["general"] - 0.05 * j * m["counting"], weights=m.as_dict(),
                          group="tiny-3d", method="linear") for j, b in enumerate(BENCH)]  # fmt: skip
    for m in inside[:2] + edge:
        rows += [ScoreRow("trained", m.id, b, 0.45 + 0.1 * m["ocr"] + 0.01 * seed, weights=m.as_dict(), seed=seed)
                 for seed in (0, 1) for b in BENCH]  # fmt: skip
    ResultsTable(tmp_path / "tiny-3d" / "scores.jsonl").append(rows)
    res = CliRunner().invoke(app, ["suggest", str(tmp_path / "tiny-3d"), "--k", "2", "--n-boot", "0"])
    assert res.exit_code == 0, res.output
    flat = " ".join(res.output.split())
    assert "2 trained mixtures + 3 experts known" in flat
    assert "2 trained mixture(s) without a 'linear' proxy score" in flat and edge[0].id in flat
    frame = ResultsTable(tmp_path / "tiny-3d" / "scores.jsonl").frame()
    picked = sg.suggest(frame, k=2, n_boot=0).table["mixture"].tolist()
    assert len(picked) == 2 and not set(picked) & {m.id for m in inside[:2] + edge}
    assert isinstance(frame, pd.DataFrame)
