"""The front's maths (dmo.pareto) against references written from the definitions, and the fidelity table of
``dmo pareto`` (dmo.analysis.pareto) against an independent recomputation on random tables."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from dmo.analysis.correlate import regression_loo
from dmo.analysis.pareto import Objectives, front_fidelity_table, proxy_front
from dmo.calibration import RIDGE_ALPHAS, loo_predict, regression_features, ridge_loo_many, ridge_predict
from dmo.mixture import Mixture
from dmo.pareto import front_fidelity, hypervolume, non_dominated, reference_point

# ------------------------------------------------------------------------------------------------ references


def naive_non_dominated(points: list[tuple[float, ...]]) -> list[bool]:
    """Row i is kept unless some row j is >= on every objective and > on one (the definition, loop by loop)."""
    keep = []
    for i, p in enumerate(points):
        dominated = False
        for j, q in enumerate(points):
            if i != j and all(b >= a for a, b in zip(p, q)) and any(b > a for a, b in zip(p, q)):
                dominated = True
        keep.append(not dominated)
    return keep


def inclusion_exclusion_hypervolume(points: np.ndarray, ref: np.ndarray) -> float:
    """The volume of the union of the boxes [ref, p]: sum over non-empty subsets S of (-1)^(|S|+1) times the volume
    of their intersection, the box [ref, min over S]."""
    total = 0.0
    n = len(points)
    for k in range(1, n + 1):
        for subset in itertools.combinations(range(n), k):
            corner = points[list(subset)].min(axis=0)
            total += (-1) ** (k + 1) * float(np.prod(np.clip(corner - ref, 0, None)))
    return total


def grid_count_hypervolume(points: list[tuple[int, ...]], ref: tuple[int, ...]) -> int:
    """Integer points: the number of unit cells [c, c + 1] above ``ref`` lying under some point."""
    top = [max(p[j] for p in points) for j in range(len(ref))]
    count = 0
    for cell in itertools.product(*(range(r, t) for r, t in zip(ref, top))):
        if any(all(c + 1 <= x for c, x in zip(cell, p)) for p in points):
            count += 1
    return count


# ------------------------------------------------------------------------------------------------ dmo.pareto


@pytest.mark.parametrize("seed", range(6))
def test_non_dominated_matches_the_definition_with_ties_and_duplicates(seed: int) -> None:
    rng = np.random.default_rng(seed)
    d = 2 + seed % 3
    points = rng.integers(0, 4, size=(25, d)).astype(float)  # few values: ties and duplicate rows
    got = non_dominated(points)
    assert got.tolist() == naive_non_dominated([tuple(p) for p in points])
    assert got.any()


def test_non_dominated_on_hand_made_fronts() -> None:
    pts = np.array([[1, 5], [2, 4], [2, 4], [3, 1], [1, 1], [3, 3], [0, 6]], float)
    assert non_dominated(pts).tolist() == [True, True, True, False, False, True, True]  # duplicates both stay
    assert non_dominated(np.zeros((0, 3))).tolist() == []
    with pytest.raises(ValueError, match="finite"):
        non_dominated(np.array([[1.0, math.nan]]))


@pytest.mark.parametrize(("points", "ref", "volume"), [
    ([(3, 1), (1, 3)], (0, 0), 5),  # two boxes of 3 overlapping in 1
    ([(2, 2), (2, 2), (1, 1)], (0, 0), 4),  # a duplicate and a dominated point add nothing
    ([(4, 1), (3, 2), (2, 3), (1, 4)], (0, 0), 10),  # a staircase
    ([(2, 2, 2)], (0, 0, 0), 8),
    ([(3, 1, 1), (1, 3, 1), (1, 1, 3)], (0, 0, 0), 7),  # 3 + 3 + 3 boxes minus their unit overlaps, plus one
    ([(2, 2, 1), (1, 1, 3), (3, 1, 1)], (0, 0, 0), 7),
    ([(2, 1, 1, 1), (1, 2, 1, 1), (1, 1, 1, 2)], (0, 0, 0, 0), 4),
    ([(3, 3), (1, 5)], (1, 1), 4),  # a point on the reference line adds nothing
    ([(0, 5)], (1, 1), 0),  # below the reference on one objective: nothing
])  # fmt: skip
def test_hypervolume_of_hand_made_fronts_by_counting_cells(points, ref, volume) -> None:
    assert grid_count_hypervolume(points, ref) == volume  # the reference agrees with the hand count
    assert hypervolume(np.array(points, float), np.array(ref, float)) == pytest.approx(volume)


@pytest.mark.parametrize("seed", range(12))
def test_hypervolume_equals_inclusion_exclusion_on_random_points(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    d = 2 + seed % 3
    n = 2 + seed % 7
    points = rng.random((n, d))
    ref = rng.random(d) * 0.3 - 0.1  # some points partly below it on an objective
    assert hypervolume(points, ref) == pytest.approx(inclusion_exclusion_hypervolume(points, ref), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("seed", range(4))
def test_hypervolume_on_integer_grids_equals_cell_counting(seed: int) -> None:
    rng = np.random.default_rng(200 + seed)
    d = 2 + seed % 3
    pts = [tuple(int(x) for x in p) for p in rng.integers(1, 6, size=(8, d))]
    ref = tuple([0] * d)
    assert hypervolume(np.array(pts, float), np.zeros(d)) == pytest.approx(grid_count_hypervolume(pts, ref))


def test_reference_point_and_front_fidelity_by_hand() -> None:
    truth = np.array([[0.9, 0.1], [0.5, 0.5], [0.1, 0.9], [0.4, 0.4], [0.2, 0.2]])
    ref = reference_point(truth)
    assert ref == pytest.approx([0.1 - 0.08, 0.1 - 0.08])
    assert reference_point(np.array([[0.5, 0.1], [0.5, 0.3]])) == pytest.approx([0.49, 0.08])
    # the predictor picks rows 0, 3 (both predicted non-dominated); only row 0 is on the true front (0, 1, 2)
    pred = np.array([[1.0, 0.3], [0.2, 0.2], [0.1, 0.1], [0.5, 0.9], [0.0, 0.0]])
    f = front_fidelity(pred, truth)
    assert (f.picks, f.front) == (2, 3)
    assert f.precision == pytest.approx(1 / 2) and f.recall == pytest.approx(1 / 3)
    r = 0.02
    picked = (0.9 - r) * (0.1 - r) + (0.4 - r) * (0.4 - r) - (0.4 - r) * (0.1 - r)
    whole = inclusion_exclusion_hypervolume(truth[:3], np.array([r, r]))
    assert f.hypervolume_ratio == pytest.approx(picked / whole)
    perfect = front_fidelity(truth, truth)
    assert (perfect.precision, perfect.recall, perfect.hypervolume_ratio) == (1.0, 1.0, 1.0)


# ---------------------------------------------------------------------------------- bootstrapped regressions


@pytest.mark.parametrize("seed", range(3))
def test_ridge_loo_many_equals_one_ridge_fit_per_held_out_row_and_column(seed: int) -> None:
    rng = np.random.default_rng(seed)
    w = rng.dirichlet(np.ones(3), size=9)
    x = regression_features(w)
    y = rng.random((9, 4))
    ax, ay = regression_features(np.eye(3)), rng.random((3, 4))
    got = ridge_loo_many(x, y, ax, ay)
    for i in range(9):
        rest = np.arange(9) != i
        for c in range(4):
            want = ridge_predict(np.vstack([ax, x[rest]]), np.concatenate([ay[:, c], y[rest, c]]), x[i : i + 1])[0]
            assert got[i, c] == pytest.approx(want, rel=1e-9, abs=1e-12)
    plain = ridge_loo_many(x, y)
    assert plain[:, 0] == pytest.approx(regression_loo(w, y[:, 0]), rel=1e-9, abs=1e-12)
    assert len(RIDGE_ALPHAS) > 1


# ------------------------------------------------------------------------------------------ the fidelity table

DOMAINS = ["a", "b", "c"]
BENCHES = ["b1", "b2", "b3"]


def random_table(rng: np.random.Generator, n: int = 10, seeds: int = 2) -> pd.DataFrame:
    """Experts, proxies and trained models (``seeds`` seeds) of ``n`` random mixtures, random scores."""
    rows = []
    for d in DOMAINS:
        rows += [dict(kind="expert", mixture=d, benchmark=b, score=rng.random()) for b in BENCHES]
    for _ in range(n):
        a, b = np.round(rng.dirichlet([1, 1, 1])[:2], 4)
        m = Mixture.from_mapping({"a": a, "b": b, "c": 1 - a - b}, DOMAINS)
        w = {f"w_{d}": m[d] for d in DOMAINS}
        for bench in BENCHES:
            rows.append(dict(kind="proxy", mixture=m.id, method="linear", benchmark=bench, score=rng.random(), **w))
            for seed in range(seeds):
                rows.append(dict(kind="trained", mixture=m.id, seed=seed, benchmark=bench, score=rng.random(), **w))
    df = pd.DataFrame(rows)
    df["group"], df["status"] = "g", "ok"
    df.loc[df["kind"] != "proxy", "method"] = ""
    return df


def _by_mixture(df: pd.DataFrame, kind: str) -> pd.DataFrame:
    return df[df["kind"] == kind].groupby(["mixture", "benchmark"])["score"].mean().unstack()


@pytest.mark.parametrize("seed", range(3))
def test_fidelity_rows_equal_an_independent_recomputation(seed: int) -> None:
    rng = np.random.default_rng(seed)
    df = random_table(rng, n=9, seeds=2 + seed % 2)
    objectives = Objectives(("b1", "b23"), ({"b1": 1.0}, {"b2": 1.0, "b3": 3.0}))
    n_boot = 60
    result = front_fidelity_table(df, objectives, n_boot=n_boot, seed=seed, calibration="residual")
    table = result.table.set_index("source")

    def objective_matrix(frame: pd.DataFrame) -> np.ndarray:
        return np.column_stack([frame["b1"], (frame["b2"] + 3 * frame["b3"]) / 4])

    proxy = _by_mixture(df, "proxy")
    mixtures = sorted(proxy.index)
    trained = df[df["kind"] == "trained"]
    per_seed = {
        m: objective_matrix(trained[trained["mixture"] == m].pivot(index="seed", columns="benchmark", values="score"))
        for m in mixtures
    }
    truth = np.array([per_seed[m].mean(axis=0) for m in mixtures])
    p = objective_matrix(proxy.loc[mixtures])
    weights = df[df["kind"] == "proxy"].drop_duplicates("mixture").set_index("mixture").loc[mixtures]
    w = weights[[f"w_{d}" for d in DOMAINS]].to_numpy(float)
    experts = objective_matrix(_by_mixture(df, "expert").loc[DOMAINS])

    def check(source: str, pick, ci_source: np.ndarray | None = None) -> None:
        f = front_fidelity(pick(truth), truth)
        row = table.loc[source]
        assert (row["precision"], row["recall"], row["hypervolume_ratio"]) == pytest.approx(
            (f.precision, f.recall, f.hypervolume_ratio)
        )
        # the seed bootstrap, redrawn mixture by mixture in the same order as the implementation draws it
        rng_b = np.random.default_rng(seed)
        draws = [rng_b.integers(0, len(per_seed[m]), size=(n_boot, len(per_seed[m]))) for m in mixtures]
        samples = []
        for b in range(n_boot):
            t = np.array([per_seed[m][draws[i][b]].mean(axis=0) for i, m in enumerate(mixtures)])
            g = front_fidelity(pick(t), t)
            samples.append((g.precision, g.recall, g.hypervolume_ratio))
        lo, hi = np.percentile(np.array(samples), [2.5, 97.5], axis=0)
        assert (row["precision_lo"], row["recall_lo"], row["hypervolume_ratio_lo"]) == pytest.approx(tuple(lo))
        assert (row["precision_hi"], row["recall_hi"], row["hypervolume_ratio_hi"]) == pytest.approx(tuple(hi))

    check("proxy", lambda t: p)
    check("expert mix", lambda t: w @ experts)
    check("regression", lambda t: np.column_stack([regression_loo(w, t[:, j]) for j in range(2)]))
    anchors = (np.eye(3), experts, experts)  # the vertices' proxy is the expert (no proxy scored there)
    check("calibrated (residual)", lambda t: loo_predict("residual", w, p, t, *anchors))
    # the seed ceiling: each seed's front judged by the mean of the others, averaged over the picking seed
    n_seeds = len(next(iter(per_seed.values())))
    figs = []
    for s in range(n_seeds):
        picked = np.array([per_seed[m][s] for m in mixtures])
        other = np.array([np.delete(per_seed[m], s, axis=0).mean(axis=0) for m in mixtures])
        g = front_fidelity(picked, other)
        figs.append((g.precision, g.recall, g.hypervolume_ratio))
    row = table.loc["seed ceiling"]
    assert (row["precision"], row["recall"], row["hypervolume_ratio"]) == pytest.approx(tuple(np.mean(figs, axis=0)))
    assert math.isnan(row["precision_lo"])
    assert result.boot[("g", "linear", "proxy")].shape == (n_boot, 3)


def test_proxy_front_lists_the_non_dominated_proxies_with_their_trained_scores() -> None:
    rng = np.random.default_rng(7)
    df = random_table(rng, n=12)
    extra = df[(df["kind"] == "proxy")].copy()
    extra["mixture"] = extra["mixture"] + "x"  # proxies without a trained model: on the front or not, no trained
    df = pd.concat([df, extra.assign(score=extra["score"] * 0.5)], ignore_index=True)
    objectives = Objectives.each(BENCHES)
    front = proxy_front(df, objectives)
    proxy = _by_mixture(df, "proxy")
    keep = naive_non_dominated([tuple(r) for r in proxy[BENCHES].to_numpy()])
    assert set(front["mixture"]) == {m for m, k in zip(proxy.index, keep) if k}
    trained = _by_mixture(df, "trained")
    both = sorted(set(proxy.index) & set(trained.index))
    on = dict(zip(both, naive_non_dominated([tuple(r) for r in trained.loc[both, BENCHES].to_numpy()])))
    for r in front.to_dict("records"):
        if r["mixture"] in trained.index:
            assert r["trained:b1"] == pytest.approx(trained.at[r["mixture"], "b1"])
            assert r["on_trained_front"] == on[r["mixture"]]
        else:
            assert math.isnan(r["trained:b1"]) and r["on_trained_front"] is None
    values = front["proxy:b1"].tolist()
    assert values == sorted(values, reverse=True)
