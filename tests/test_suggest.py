"""`dmo suggest`: the acquisition picks what a naive reference computation picks; the CLI prints it; bad input is
one line."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from dmo import calibration as cal
from dmo.analysis import suggest as sg
from dmo.cli import app
from dmo.errors import DmoError
from dmo.mixture import lattice
from dmo.results import ResultsTable, ScoreRow

DOMAINS = ["a", "b", "c"]
BENCH = ("x", "y")


def truth(w: dict[str, float], bench: str) -> float:
    # a bowl with its optimum inside the simplex, different per benchmark
    opt = {"a": 0.2, "b": 0.5, "c": 0.3} if bench == "x" else {"a": 0.4, "b": 0.3, "c": 0.3}
    return 0.9 - sum((w[d] - opt[d]) ** 2 for d in DOMAINS)


def proxy(w: dict[str, float], bench: str) -> float:
    # a proxy that forgets: it loses in proportion to c's weight on benchmark x
    return truth(w, bench) - (0.15 * w["c"] if bench == "x" else 0.0)


TRAINED = ["a-0.5+b-0.25+c-0.25", "a-0.25+b-0.25+c-0.5", "a-0.125+b-0.75+c-0.125"]


def _rows() -> list[ScoreRow]:
    rows = []
    for b in BENCH:
        for d in DOMAINS:
            pure = {e: float(e == d) for e in DOMAINS}
            rows.append(ScoreRow("expert", d, b, truth(pure, b)))
        for m in lattice(DOMAINS, 8):
            rows.append(ScoreRow("proxy", m.id, b, proxy(m.as_dict(), b), weights=m.as_dict(), group="g",
                                 method="linear"))  # fmt: skip
        for m in lattice(DOMAINS, 8):
            if m.id in TRAINED:
                for seed, noise in ((0, -0.01), (1, 0.01)):
                    rows.append(ScoreRow("trained", m.id, b, truth(m.as_dict(), b) + noise, weights=m.as_dict(),
                                         seed=seed))  # fmt: skip
    return rows


@pytest.fixture()
def table(tmp_path):
    ResultsTable(tmp_path / "scores.jsonl").append(_rows())
    return tmp_path


def _ei_reference(mu: float, sigma: float, best: float) -> float:
    if sigma == 0:
        return max(mu - best, 0.0)
    z = (mu - best) / sigma
    cdf = 0.5 * (1 + math.erf(z / math.sqrt(2)))
    pdf = math.exp(-z * z / 2) / math.sqrt(2 * math.pi)
    return (mu - best) * cdf + sigma * pdf


def test_expected_improvement_is_the_closed_form_and_matches_monte_carlo():
    mu, sigma = np.array([0.5, 0.6, 0.55, 0.7]), np.array([0.2, 0.0, 0.01, 0.05])
    ei = sg.expected_improvement(mu, sigma, 0.58)
    assert ei == pytest.approx([_ei_reference(m, s, 0.58) for m, s in zip(mu, sigma)])
    draws = np.random.default_rng(0).normal(mu[0], sigma[0], 400_000)
    assert ei[0] == pytest.approx(np.maximum(draws - 0.58, 0).mean(), abs=1e-3)
    assert ei[1] == pytest.approx(0.02)  # no uncertainty: the plain gain


def test_batch_spreads_out_by_the_diversity_rule():
    # two near-identical candidates with the highest EI and a distant one slightly worse
    w = np.array([[0.5, 0.5, 0.0], [0.5, 0.45, 0.05], [0.0, 0.2, 0.8]])
    post = sg.Posterior(mu=np.array([0.60, 0.60, 0.59]), sigma=np.array([0.05, 0.05, 0.05]),
                        regression=np.zeros(3), calibrated=np.zeros(3))  # fmt: skip
    assert sg.pick(post, w, best=0.6, k=1)[0] == [0]  # tie in EI and mu: the earlier candidate
    assert sg.pick(post, w, best=0.6, k=2)[0] == [0, 2]  # the near twin lost its uncertainty to the first pick
    assert sg.pick(post, w, best=0.6, k=2, radius=0)[0] == [0, 1]  # without the rule: the twin


def test_suggestion_is_what_a_naive_reference_computation_picks(table):
    frame = ResultsTable(table / "scores.jsonl").frame()
    s = sg.suggest(frame, k=1, n_boot=0)
    # the reference, written out by hand: known points are the experts and the trained mixtures (seed means); the
    # proxy at a vertex is the proxy scored there (the lattice has the vertices)
    pure = [{e: float(e == d) for e in DOMAINS} for d in DOMAINS]
    tmix = [m for m in lattice(DOMAINS, 8) if m.id in TRAINED]
    known_w = np.array([[p[d] for d in DOMAINS] for p in pure] + [list(m.weights) for m in tmix])
    mean = lambda f, w: sum(f(w, b) for b in BENCH) / len(BENCH)  # noqa: E731
    known_y = np.array([mean(truth, p) for p in pure] + [mean(truth, m.as_dict()) for m in tmix])
    known_p = np.array([mean(proxy, p) for p in pure] + [mean(proxy, m.as_dict()) for m in tmix])
    best = max(known_y[3:])
    ref_best, ref_ei = None, -1.0
    for m in lattice(DOMAINS, 8):
        if m.id in TRAINED or max(m.weights) == 1:
            continue
        w = np.array([m.weights])
        r = cal.regression_predict(known_w, known_y, w)[0, 0]
        c = mean(proxy, m.as_dict()) + cal.regression_predict(known_w, known_y - known_p, w)[0, 0]
        ei = _ei_reference((r + c) / 2, abs(r - c) / 2, best)
        if ei > ref_ei + 1e-15:
            ref_best, ref_ei = m.id, ei
    assert s.table["mixture"].tolist() == [ref_best]
    assert s.table["expected_improvement"].iloc[0] == pytest.approx(ref_ei)
    assert s.n_trained == 3 and s.n_experts == 3 and s.method == "linear"
    assert s.n_candidates == 45 - 3 - 3  # the 8-lattice minus the trained mixtures and the vertices


def test_bootstrap_uncertainty_is_reproducible_and_adds_to_disagreement(table):
    frame = ResultsTable(table / "scores.jsonl").frame()
    a, b = sg.suggest(frame, k=3, n_boot=30, seed=1), sg.suggest(frame, k=3, n_boot=30, seed=1)
    assert a.table.equals(b.table)
    none = sg.suggest(frame, k=45, n_boot=0).table.set_index("mixture")["uncertainty"]
    boot = sg.suggest(frame, k=45, n_boot=30).table.set_index("mixture")["uncertainty"]
    # the first pick's sigma is untouched by the diversity rule in both: sigma with bootstrap >= without
    first = sg.suggest(frame, k=1, n_boot=30).table["mixture"].iloc[0]
    assert boot[first] >= none.get(first, 0.0) - 1e-12


def test_cli_prints_table_and_json(table):
    res = CliRunner().invoke(app, ["suggest", str(table), "--k", "2", "--n-boot", "0"])
    assert res.exit_code == 0, res.output
    want = sg.suggest(ResultsTable(table / "scores.jsonl").frame(), k=2, n_boot=0).table["mixture"].tolist()
    flat = res.output.replace("\n", "").replace(" ", "")
    assert "trainnext" in flat and "3trainedmixtures" in flat
    res = CliRunner().invoke(app, ["suggest", str(table), "--k", "2", "--n-boot", "0", "--format", "json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert [r["mixture"] for r in doc["suggestions"]] == want
    assert {"predicted", "uncertainty", "expected_improvement"} <= set(doc["suggestions"][0])
    assert doc["best_known"] in TRAINED


def test_cli_with_a_space_chooses_among_its_candidates(table, tmp_path):
    space = tmp_path / "s.yaml"
    space.write_text("domains: [a, b, c]\nmixtures: [{a: 0.25, b: 0.5, c: 0.25}, {a: 0.5, b: 0.25, c: 0.25}]\n"
                     "benchmarks: [x, y]\n")  # fmt: skip
    res = CliRunner().invoke(app, ["suggest", str(table), "--k", "3", "--space", str(space), "--format", "json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    # the second candidate is trained already: one left
    assert [r["mixture"] for r in doc["suggestions"]] == ["a-0.25+b-0.5+c-0.25"]


def _one_line_error(args: list[str]) -> str:
    res = CliRunner().invoke(app, args)
    assert res.exit_code != 0
    assert isinstance(res.exception, DmoError), res.output
    msg = str(res.exception)
    assert "\n" not in msg
    return msg


def test_bad_input_is_one_line(tmp_path):
    rows = [r for r in _rows() if r.kind != "proxy"]
    ResultsTable(tmp_path / "noproxy" / "scores.jsonl").append(rows)
    assert "no proxy scores" in _one_line_error(["suggest", str(tmp_path / "noproxy")])
    # every proxy is trained already (or a vertex): nothing to suggest
    rows = []
    for m in lattice(["a", "b"], 2):
        rows.append(ScoreRow("proxy", m.id, "x", m["a"], weights=m.as_dict(), method="linear"))
        rows.append(ScoreRow("trained", m.id, "x", m["a"], weights=m.as_dict(), seed=0))
    ResultsTable(tmp_path / "done" / "scores.jsonl").append(rows)
    assert "no candidate mixture" in _one_line_error(["suggest", str(tmp_path / "done")])
    assert "no results table" in _one_line_error(["suggest", str(tmp_path / "nothing")])
    ResultsTable(tmp_path / "t" / "scores.jsonl").append(_rows())
    assert "no proxy scores of method" in _one_line_error(["suggest", str(tmp_path / "t"), "--method", "ties"])
    with pytest.raises(DmoError, match="at least 1"):
        sg.suggest(ResultsTable(tmp_path / "t" / "scores.jsonl").frame(), k=0)
