import math
from math import comb

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dmo.errors import DmoError
from dmo.mixture import Mixture, dirichlet, from_paper_name, lattice, uniform
from dmo.presets import PAPER_4D_DOMAINS, paper_2d, paper_3d, paper_4d, preset
from dmo.search.simplex import from_box, to_box


def test_validation_messages_are_one_line_and_specific():
    cases = {
        (0.5, -0.5, 1.0): ">= 0",
        (0.5, float("nan"), 0.5): "finite",
        (0.5, 0.3, 0.3): "sum to 1.1",
        (0.5, float("inf"), 0.5): "finite",
    }
    for weights, needle in cases.items():
        with pytest.raises(DmoError) as exc:
            Mixture(("a", "b", "c"), weights)
        assert needle in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(DmoError, match="unknown domain 'oc'"):
        Mixture.from_mapping({"general": 0.5, "oc": 0.5}, ["general", "ocr"])
    with pytest.raises(DmoError, match="invalid domain name"):
        Mixture(("../x", "b"), (0.5, 0.5))


def test_tolerance_is_1e6():
    Mixture(("a", "b"), (0.3333333, 0.6666663))  # off by 4e-7: accepted
    with pytest.raises(DmoError):
        Mixture(("a", "b"), (0.333, 0.666))  # off by 1e-3


def test_id_is_canonical_and_parses_back():
    a = Mixture(("ocr", "general"), (0.75, 0.25))
    b = Mixture.parse("general=0.25, ocr=0.75")
    assert a.id == b.id == "general-0.25+ocr-0.75"
    assert Mixture.parse(a.id, ["general", "ocr"]).as_dict() == {"general": 0.25, "ocr": 0.75}
    assert from_paper_name("general-25600++ocr-76800", ["general", "ocr"]).id == a.id


@given(st.lists(st.floats(0.001, 1000, allow_nan=False), min_size=1, max_size=6))
def test_any_normalised_vector_is_a_mixture_with_a_safe_stable_id(raw):
    total = math.fsum(raw)
    domains = tuple(f"d{i}" for i in range(len(raw)))
    m = Mixture(domains, tuple(x / total for x in raw))
    assert "/" not in m.id and ".." not in m.id.replace("0..", "")
    again = Mixture.parse(m.id, domains)
    # the id rounds to 6 decimals: parsing it back gives the same id
    assert again.id == m.id
    assert max(abs(x - y) for x, y in zip(again.weights, m.weights)) < 1e-5


@pytest.mark.parametrize("k,n", [(2, 8), (3, 8), (4, 5), (3, 16)])
def test_lattice_size(k, n):
    pts = lattice([f"d{i}" for i in range(k)], n)
    assert len(pts) == comb(n + k - 1, k - 1)
    assert len({p.id for p in pts}) == len(pts)
    for p in pts:
        assert all(abs(w * n - round(w * n)) < 1e-9 for w in p.weights)


def test_lattice_bounds_and_vertices():
    pts = lattice(["a", "b", "c"], 4, drop_vertices=True)
    assert len(pts) == comb(6, 2) - 3
    assert all(max(p.weights) < 1 for p in pts)
    pts = lattice(["a", "b", "c"], 8, min_weight=0.125, max_weight=0.75)
    assert all(0.125 <= w <= 0.75 for p in pts for w in p.weights)


def test_paper_presets():
    assert [m["general"] for m in paper_2d()] == [0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]
    p3 = paper_3d()
    assert len(p3) == 21 and all(w in {k / 8 for k in range(1, 7)} for m in p3 for w in m.weights)
    assert len(paper_3d(with_uniform=True)) == 22
    assert paper_4d(with_uniform=True)[-1].weights == (0.25, 0.25, 0.25, 0.25)
    with pytest.raises(DmoError, match="unknown mixture preset"):
        preset("paper-5d")


def test_paper_4d_regenerates_from_numpy():
    """The paper's 4-domain mixtures are the first 20 of 30 Dirichlet(1) draws with seed 42."""
    regen = dirichlet(PAPER_4D_DOMAINS, 30, seed=42, decimals=4)[:20]
    assert [m.weights for m in regen] == [m.weights for m in paper_4d()]
    raw = np.random.default_rng(42).dirichlet([1] * 4, size=30)[:20]
    assert np.allclose(raw, [m.weights for m in paper_4d()], atol=1e-4 + 1e-9 + 4e-4)


def test_uniform_sums_exactly():
    assert uniform(["a", "b", "c"]).weights == (0.333333, 0.333333, 0.333334)


def test_budget_rounding_matches_the_paper():
    m = Mixture(("a", "b", "c"), (0.3333, 0.3334, 0.3333))
    assert m.rounded_to_budget(100) == {"a": 0.33, "b": 0.33, "c": 0.33}  # sums to 0.99: not renormalised
    assert Mixture(("a", "b"), (0.0, 1.0)).rounded_to_budget(100) == {"b": 1.0}  # zero weight dropped
    assert m.counts(102400) == {"a": 34130, "b": 34140, "c": 34130}


@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=5))
def test_stick_breaking_always_gives_a_valid_mixture(u):
    domains = [f"d{i}" for i in range(len(u) + 1)]
    m = from_box(domains, u)  # validation in Mixture() is the assertion
    assert len(m.weights) == len(domains)
    assert m.canonical().id == m.id


def test_stick_breaking_round_trip_and_uniformity():
    for m in paper_3d() + paper_4d() + lattice(["a", "b", "c", "d"], 6):
        assert from_box(m.domains, to_box(m)).id == m.id
    rng = np.random.default_rng(0)
    w = np.array([from_box("abcd", rng.random(3)).weights for _ in range(20000)])
    # Dirichlet(1) on 4 domains: mean 1/4 each, P(w_i > 1/2) = (1/2)^3
    assert np.allclose(w.mean(axis=0), 0.25, atol=0.01)
    assert np.allclose((w > 0.5).mean(axis=0), 0.125, atol=0.01)
