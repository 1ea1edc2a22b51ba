"""`dmo report`: one self-contained HTML file with valid embedded PNG plots.

The study is a real Optuna SQLite study run by dmo's study code, driven by an analytic scorer (a test double
for the model only), so the report reads the same storage layout and trial attributes as after `dmo study`.
"""

import base64
import io
import os
import re

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from dmo.analysis.html_report import build_report
from dmo.cli import app
from dmo.config import parse_space
from dmo.mixture import lattice
from dmo.paths import SpaceFolder
from dmo.presets import paper_3d
from dmo.results import ResultsTable, ScoreRow
from dmo.scoring.base import Evaluation, Scorer, Target
from dmo.search.study import study_paths
from dmo.search.trials import run_study
from dmo.session import write_results_report

OPT = {"counting": 0.2, "general": 0.3, "ocr": 0.5}


def surface(w, bench):
    return 1 - sum((w[d] - OPT[d]) ** 2 for d in OPT) + (0.05 * w["ocr"] if bench == "b2" else 0.0)


class Bowl(Scorer):
    name = "bowl"

    def fingerprint(self, target: Target) -> str:
        return target.label

    def settings(self) -> dict:
        return {"version": 1}

    def evaluate(self, target: Target, benchmarks):
        return Evaluation({b: surface(target.weights, b) for b in benchmarks})


def _space(sampler, n):
    return parse_space(
        {
            "name": "s3",
            "domains": ["counting", "general", "ocr"],
            "mixtures": {"preset": "paper-3d"},
            "benchmarks": ["b1", "b2"],
            "sampler": {"name": sampler, "n_trials": n, "seed": 1},
        }
    )


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """A 3-domain results folder: a grid study and a TPE study (proxies), trained mixtures with two seeds, experts."""
    root = tmp_path_factory.mktemp("results")
    for sampler, n in (("grid", 21), ("tpe", 6)):
        sp = _space(sampler, n)
        run_study(sp, Bowl(), study_paths(sp, root=root), progress=False)
    rng = np.random.default_rng(0)
    rows = []
    for b in ("b1", "b2"):
        rows += [ScoreRow("expert", d, b, float(rng.random())) for d in OPT]
        for m in paper_3d():
            for seed in (0, 1):
                v = surface(m.as_dict(), b) + float(rng.normal(0, 0.01))
                rows.append(ScoreRow("trained", m.id, b, v, weights=m.as_dict(), seed=seed))
    folder = root / "s3"
    ResultsTable(folder / "scores.jsonl").append(rows)
    return folder


def _pngs(text):
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)]


def _check_png(blob):
    with Image.open(io.BytesIO(blob)) as im:
        im.verify()  # checks the file's structure and CRCs
    with Image.open(io.BytesIO(blob)) as im:
        assert im.format == "PNG"
        im.load()  # decodes every pixel
        w, h = im.size
        assert 300 <= w <= 4000 and 200 <= h <= 6000, im.size
        assert len(np.unique(np.asarray(im.convert("L")))) > 5  # not a blank image


def test_report_is_one_self_contained_html_with_valid_pngs(results, monkeypatch):
    import dmo.analysis.plots

    scatter_titles = []
    real = dmo.analysis.plots.scatter_png

    def spy(panels, suptitle=""):
        scatter_titles.extend(p.title for p in panels)
        return real(panels, suptitle)

    monkeypatch.setattr(dmo.analysis.plots, "scatter_png", spy)
    path = write_results_report(results, n_boot=100, n_perm=100)  # the studies of results/study.db too
    assert path == SpaceFolder(results).report == results / "report.html" and path.is_file()
    assert not [p for p in results.iterdir() if p.name.endswith(".tmp")]  # written atomically, nothing left over
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # a report is for sharing: not the temp file's 0600
    text = path.read_text()
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert not re.search(r'(src|href)="(https?:)?//', text)  # nothing fetched from elsewhere
    pngs = _pngs(text)
    # scatter + ternary maps + the front of the benchmarks; per study (grid, tpe): history, best weights, trials on
    # the simplex
    assert len(pngs) == 3 + 2 * 3
    for blob in pngs:
        _check_png(blob)
    titles = re.findall(r'alt="([^"]+)"', text)
    assert any(t.startswith("Proxy vs trained score") for t in titles)
    assert any(t.startswith("Scores on the simplex") for t in titles)
    assert any(t.startswith("The proxies&#x27; front of") or t.startswith("Front of ") for t in titles)
    for name in ("s3.grid", "s3.tpe"):
        assert f"Study {name}: optimisation history" in titles
        assert f"Study {name}: weights of the" in text
    # one scatter panel per benchmark and one for the mean score, rho in each title
    assert len(scatter_titles) == 3
    assert all(re.search(r"rho = [+-]\d\.\d\d \(n = 21\)", t) for t in scatter_titles), scatter_titles
    # the correlation table, with its baselines, and the best trials of each study
    assert "regression rho [95% CI]" in text and "expert-mix rho [95% CI]" in text and "mean rho" in text
    assert "counting-0.25+general-0.25+ocr-0.5" in text  # the grid's best trial


def test_two_domain_report_without_study_or_trained_rows(tmp_path):
    rows = [
        ScoreRow("proxy", m.id, "x", m["a"], weights=m.as_dict(), group="g2", method="linear")
        for m in lattice(["a", "b"], 4)
    ]
    ResultsTable(tmp_path / "scores.jsonl").append(rows)
    text = build_report(tmp_path, n_boot=10)
    assert "No mixture has both a proxy score and a trained score yet" in text
    assert _pngs(text) == []  # no trained scores, no 3 domains, no study: nothing to plot
    rows = [ScoreRow("trained", m.id, "x", m["a"] ** 2, weights=m.as_dict()) for m in lattice(["a", "b"], 4)]
    ResultsTable(tmp_path / "scores.jsonl").append(rows)
    text = build_report(tmp_path, n_boot=10)
    pngs = _pngs(text)
    # the scatter and the one edge (a 2-domain space is its edge); a 2-domain space has no ternary map
    assert len(pngs) == 2
    for blob in pngs:
        _check_png(blob)


def test_cli_report_writes_where_asked(tmp_path):
    rows = []
    for m in lattice(["a", "b"], 5):
        rows.append(ScoreRow("proxy", m.id, "x", m["a"], weights=m.as_dict(), group="g2", method="linear"))
        rows.append(ScoreRow("trained", m.id, "x", m["a"] ** 2, weights=m.as_dict(), seed=0))
    ResultsTable(tmp_path / "res" / "scores.jsonl").append(rows)
    out = tmp_path / "sub" / "r.html"
    res = CliRunner().invoke(app, ["report", str(tmp_path / "res"), "--output", str(out), "--n-boot", "20"])
    assert res.exit_code == 0, res.output
    assert out.is_file() and str(out) in res.output.replace("\n", "")
    assert len(_pngs(out.read_text())) == 2  # the scatter and the edge a-b
    res = CliRunner().invoke(app, ["report", str(tmp_path / "nothing")])
    assert "no results table" in str(res.exception)


def test_unreadable_study_storage_is_reported_not_fatal(tmp_path):
    rows = [
        ScoreRow("proxy", m.id, "x", m["a"], weights=m.as_dict(), group="g2", method="linear")
        for m in lattice(["a", "b"], 4)
    ]
    ResultsTable(tmp_path / "scores.jsonl").append(rows)
    (tmp_path / "bad.db").write_text("not a database")
    path = write_results_report(tmp_path, storage=f"sqlite:///{tmp_path / 'bad.db'}", n_boot=10)
    assert "cannot read the studies in" in path.read_text()


def _edge_table(folder, edges):
    """3 domains, proxies on the 4-lattice, experts, and trained mixtures (two seeds) on the given edges only,
    plus one interior trained mixture (on no edge)."""
    doms = ["a", "b", "c"]
    rows = []
    for bench in ("x", "y"):
        for d in doms:
            rows.append(ScoreRow("expert", d, bench, 0.5 + 0.1 * doms.index(d)))
        for m in lattice(doms, 4):
            rows.append(ScoreRow("proxy", m.id, bench, m["a"] - 0.2 * m["c"], weights=m.as_dict(), group="g3",
                                 method="linear"))  # fmt: skip
            support = {d for d in doms if m[d] > 0}
            if (len(support) == 2 and tuple(sorted(support)) in edges) or len(support) == 3:
                for seed in (0, 1):
                    rows.append(ScoreRow("trained", m.id, bench, m["a"] + 0.01 * seed, weights=m.as_dict(),
                                         seed=seed))  # fmt: skip
    ResultsTable(folder / "scores.jsonl").append(rows)
    return folder


def test_edges_section_plots_each_edge_with_trained_mixtures(tmp_path, monkeypatch):
    import dmo.analysis.plots

    seen = []
    real = dmo.analysis.plots.edges_png

    def spy(panels, cols, suptitle=""):
        seen.append([(p.title, p.proxy_x.tolist(), p.trained_x.tolist(), p.trained_lo.tolist(),
                      p.trained_hi.tolist()) for p in panels])  # fmt: skip
        return real(panels, cols, suptitle)

    monkeypatch.setattr(dmo.analysis.plots, "edges_png", spy)
    text = build_report(_edge_table(tmp_path, {("a", "b"), ("b", "c")}), n_boot=10, n_perm=10)
    assert "Proxy and trained score along the simplex edges" in text
    titles = re.findall(r'alt="([^"]+)"', text)
    assert titles.count("Along the simplex edges: g3 / linear") == 1
    blob = _pngs(text)[titles.index("Along the simplex edges: g3 / linear")]
    _check_png(blob)
    (panels,) = seen
    # two edges with trained mixtures (a-c has none) x two benchmarks
    assert [t for t, *_ in panels] == [f"{e}: {b} (3 trained)" for e in ("a - b", "b - c") for b in ("x", "y")]
    _title, px, tx, lo, hi = panels[0]
    # the edge's 3 lattice points inside, then the experts at both ends (x = weight of b)
    assert sorted(tx) == [0.0, 0.25, 0.5, 0.75, 1.0] and sorted(px) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert [top - bottom for bottom, top in zip(lo, hi)][:3] == pytest.approx([0.01] * 3)  # the seed range


def test_no_edges_section_without_trained_mixtures_on_an_edge(tmp_path):
    text = build_report(_edge_table(tmp_path, set()), n_boot=10, n_perm=10)  # only an interior trained mixture
    assert "along the simplex edges" not in text
    assert not any(t.startswith("Along the simplex edges") for t in re.findall(r'alt="([^"]+)"', text))


def test_edges_end_at_the_experts_only_for_methods_whose_vertex_is_the_expert(tmp_path, monkeypatch):
    """Without proxy scores at the pure mixtures, an edge's proxy curve ends at the experts' scores exactly for the
    methods the merge registry says merge one expert into itself (linear yes, ties no)."""
    import dmo.analysis.plots
    from dmo.merge.registry import expert_at_vertex_methods

    vertex = expert_at_vertex_methods()
    assert "linear" in vertex and "weight_average" in vertex and "ties" not in vertex
    doms = ["a", "b", "c"]
    for method in ("linear", "ties"):
        rows = [ScoreRow("expert", d, "x", 0.5 + 0.1 * i) for i, d in enumerate(doms)]
        for m in lattice(doms, 4):
            if max(m.as_dict().values()) < 1:  # no proxy at the pure mixtures
                rows.append(ScoreRow("proxy", m.id, "x", m["a"], weights=m.as_dict(), group="g3", method=method))
            if m["c"] == 0 and 0 < m["a"] < 1:
                rows.append(ScoreRow("trained", m.id, "x", m["a"], weights=m.as_dict(), seed=0))
        folder = tmp_path / method
        ResultsTable(folder / "scores.jsonl").append(rows)
        seen = []
        real = dmo.analysis.plots.edges_png

        def spy(panels, cols, suptitle="", seen=seen, real=real):
            seen.append([sorted(p.proxy_x.tolist()) for p in panels])
            return real(panels, cols, suptitle)

        monkeypatch.setattr(dmo.analysis.plots, "edges_png", spy)
        build_report(folder, n_boot=10, n_perm=10, expert_at_vertex=vertex)
        ((px,),) = seen
        assert px == ([0.0, 0.25, 0.5, 0.75, 1.0] if method == "linear" else [0.25, 0.5, 0.75])
