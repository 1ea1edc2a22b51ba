"""Rendering of the correlation table, `dmo compare`, and the `correlate`/`compare` commands."""

import io
import json
import math

import numpy as np
import pandas as pd
import pytest
from rich.console import Console
from typer.testing import CliRunner

from dmo.analysis.compare import COLUMNS, compare
from dmo.analysis.correlate import MEAN_RHO, MEAN_SCORE, CorrelationRow, correlate
from dmo.analysis.tables import render_compare, render_correlation
from dmo.cli import app
from dmo.errors import DmoError
from dmo.mixture import lattice
from dmo.results import ResultsTable, ScoreRow


@pytest.fixture
def table(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    mixtures = lattice(["general", "ocr"], 8, min_weight=0.125)
    for b in ("bench_a", "bench_b"):
        for d in ("general", "ocr"):
            rows.append(ScoreRow("expert", d, b, float(rng.random())))
        for m in mixtures:
            v = m["general"] if b == "bench_a" else m["ocr"] ** 2
            rows.append(
                ScoreRow(
                    "proxy", m.id, b, v + float(rng.normal(0, 0.1)), weights=m.as_dict(), group="g", method="linear"
                )
            )
            for seed in (0, 1):
                rows.append(
                    ScoreRow("trained", m.id, b, v + float(rng.normal(0, 0.05)), weights=m.as_dict(), seed=seed)
                )
    # a proxy-only mixture (a study trial nobody trained) and a failed row, both left out of the comparison
    rows.append(
        ScoreRow(
            "proxy",
            "general-0.3+ocr-0.7",
            "bench_a",
            0.1,
            weights={"general": 0.3, "ocr": 0.7},
            group="g",
            method="linear",
        )
    )
    rows.append(
        ScoreRow(
            "proxy",
            mixtures[0].id,
            "bench_a",
            None,
            weights=mixtures[0].as_dict(),
            group="g",
            method="linear",
            status="failed",
            error="boom",
            key="k",
        )
    )
    t = ResultsTable(tmp_path / "scores.jsonl")
    t.append(rows)
    return t


def _render(fn, frame, fmt, width=200):
    buf = io.StringIO()
    fn(Console(file=buf, width=width, color_system=None), frame, fmt)
    return buf.getvalue()


def test_every_format_carries_the_new_columns(table):
    corr = correlate(table.frame(), n_boot=100, n_perm=200)
    fields = list(CorrelationRow.__dataclass_fields__)
    assert list(corr.columns) == fields
    csv = pd.read_csv(io.StringIO(_render(render_correlation, corr, "csv")))
    assert list(csv.columns) == fields and len(csv) == len(corr)
    assert np.allclose(csv["spearman_p"], corr["spearman_p"]) and np.allclose(csv["topk_overlap"], corr["topk_overlap"])
    records = json.loads(_render(render_correlation, corr, "json"))
    assert set(records[0]) == set(fields)
    md = _render(render_correlation, corr, "markdown").splitlines()
    head = [c.strip() for c in md[0].strip("|").split("|")]
    assert head == [
        "group",
        "method",
        "benchmark",
        "n",
        "proxy rho [95% CI]",
        "calibrated rho [95% CI]",
        "p",
        "tau",
        "r",
        "top-3",
        "expert-mix rho [95% CI]",
        "regression rho [95% CI]",
        "seed rho",
        "regret@1",
    ]
    assert len(md) == 2 + len(corr) and all(line.count("|") == len(head) + 1 for line in md)
    wide = _render(render_correlation, corr, "table", width=200)
    assert "regression" in wide and "[" in wide and "left out" not in wide
    assert "mean rho" in wide and MEAN_SCORE in wide


def test_terminal_table_fits_a_narrow_terminal(table):
    corr = correlate(table.frame(), n_boot=100, n_perm=200)
    out = _render(render_correlation, corr, "table", width=80)
    body = out.split("p = two-sided")[0].splitlines()
    assert max(len(line.rstrip()) for line in body) <= 80
    assert "left out to fit this terminal" in out
    assert "bench_a" in out and "bench_b" in out  # names are not cut


def test_unknown_format_is_refused(table):
    with pytest.raises(DmoError, match="unknown format"):
        _render(render_correlation, correlate(table.frame(), n_boot=10), "xml")


def test_compare_ranks_and_sorting(table):
    out = compare(table.frame())
    assert list(out.columns) == COLUMNS
    assert set(out["benchmark"]) == {"bench_a", "bench_b", MEAN_SCORE}
    assert "general-0.3+ocr-0.7" not in set(out["mixture"])  # no trained score
    df = table.frame()
    ok = df[df["status"] == "ok"]
    for b, part in out.groupby("benchmark"):
        assert len(part) == 7
        assert list(part["trained_rank"]) == sorted(part["trained_rank"])  # sorted by trained rank
        assert part["trained"].is_monotonic_decreasing
        assert (part["rank_diff"] == part["proxy_rank"] - part["trained_rank"]).all()
        assert (part["seeds"] == 2).all()
        if b == MEAN_SCORE:
            continue
        t = ok[(ok["kind"] == "trained") & (ok["benchmark"] == b)].groupby("mixture")["score"].mean()
        p = ok[(ok["kind"] == "proxy") & (ok["benchmark"] == b)].groupby("mixture")["score"].mean()
        for r in part.itertuples():
            assert r.trained == pytest.approx(t[r.mixture]) and r.proxy == pytest.approx(p[r.mixture])
            assert r.proxy_rank == 1 + (p.loc[part["mixture"]] > p[r.mixture]).sum()
    corr = correlate(df, n_boot=10).set_index("benchmark")
    a = out[out["benchmark"] == "bench_a"]
    assert a.loc[a["proxy_rank"] == 1, "mixture"].iloc[0] == corr.at["bench_a", "proxy_pick"]
    assert a.loc[a["trained_rank"] == 1, "mixture"].iloc[0] == corr.at["bench_a", "trained_best"]


def test_compare_ties_share_the_better_rank(tmp_path):
    t = ResultsTable(tmp_path / "s.jsonl")
    rows = []
    for m, p, y in (("a-1", 0.5, 0.9), ("a-0.5+b-0.5", 0.5, 0.7), ("b-1", 0.2, 0.7)):
        rows += [ScoreRow("proxy", m, "x", p, group="g", method="linear"), ScoreRow("trained", m, "x", y, seed=0)]
    t.append(rows)
    out = compare(t.frame()).set_index("mixture")
    assert list(out.loc[["a-1", "a-0.5+b-0.5", "b-1"], "proxy_rank"]) == [1, 1, 3]
    assert list(out.loc[["a-1", "a-0.5+b-0.5", "b-1"], "trained_rank"]) == [1, 2, 2]


def test_compare_benchmark_filter_all_and_errors(table):
    only = compare(table.frame(), benchmark="bench_b")
    assert set(only["benchmark"]) == {"bench_b"}
    assert set(compare(table.frame(), benchmark=MEAN_SCORE)["benchmark"]) == {MEAN_SCORE}
    with pytest.raises(DmoError, match="choose one of bench_a, bench_b"):
        compare(table.frame(), benchmark="nope")
    every = compare(table.frame(), include_all=True, benchmark="bench_a")
    row = every[every["mixture"] == "general-0.3+ocr-0.7"].iloc[0]
    assert math.isnan(row["trained"]) and pd.isna(row["trained_rank"]) and row["proxy_rank"] >= 1


def test_compare_formats(table):
    frame = compare(table.frame())
    csv = pd.read_csv(io.StringIO(_render(render_compare, frame, "csv")))
    assert list(csv.columns) == COLUMNS and len(csv) == len(frame)
    md = _render(render_compare, frame, "markdown").splitlines()
    assert md[0].startswith("| group | method | benchmark | mixture | trained") and len(md) == 2 + len(frame)
    assert len(json.loads(_render(render_compare, frame, "json"))) == len(frame)
    text = _render(render_compare, frame, "table", width=120)
    assert "g / linear / bench_a: proxy rho" in text and "general-0.125+ocr-0.875" in text
    narrow = _render(render_compare, frame, "table", width=80)
    assert max(len(line.rstrip()) for line in narrow.splitlines()) <= 80


def test_cli_correlate_and_compare(table):
    runner = CliRunner()
    folder = str(table.path.parent)
    res = runner.invoke(
        app, ["correlate", folder, "--format", "csv", "--n-boot", "50", "--n-perm", "100", "--top-k", "2"]
    )
    assert res.exit_code == 0, res.output
    out = pd.read_csv(io.StringIO(res.output))
    assert (out["k"] == 2).all() and MEAN_RHO in set(out["benchmark"])
    res = runner.invoke(app, ["compare", folder, "--benchmark", "bench_a", "--format", "markdown"])
    assert res.exit_code == 0, res.output
    assert res.output.count("| g | linear | bench_a |") == 7
    res = runner.invoke(app, ["compare", folder, "--benchmark", "nope"])
    assert isinstance(res.exception, DmoError)
    res = runner.invoke(app, ["compare", str(table.path.parent / "missing")])
    assert isinstance(res.exception, DmoError) and "no results table" in str(res.exception)


def test_compare_counts_a_seedless_trained_model_as_one_seed(tmp_path):
    t = ResultsTable(tmp_path / "s.jsonl")
    t.append(
        [
            ScoreRow("proxy", "a-1", "x", 0.5, group="g", method="linear"),
            ScoreRow("trained", "a-1", "x", 0.4),
            ScoreRow("proxy", "b-1", "x", 0.1, group="g", method="linear"),
            ScoreRow("trained", "b-1", "x", 0.2),
        ]
    )
    out = compare(t.frame())
    assert list(out["seeds"]) == [1, 1] and list(out["mixture"]) == ["a-1", "b-1"]


def _ten_mixture_table(tmp_path) -> pd.DataFrame:
    """Three tiny-world benchmarks over 10 trained mixtures (n = 10, a two-digit count), with the experts."""
    rng = np.random.default_rng(1)
    benches = ("dmo_tiny_counting", "dmo_tiny_general", "dmo_tiny_ocr")
    rows = [ScoreRow("expert", d, b, float(rng.random())) for d in ("general", "ocr") for b in benches]
    for m in lattice(["general", "ocr"], 11)[1:-1][:10]:
        for b in benches:
            v = m["general"] * (1 + benches.index(b))
            rows.append(ScoreRow("proxy", m.id, b, v + float(rng.normal(0, 0.2)), weights=m.as_dict(), group="tiny-2d",
                                 method="linear"))  # fmt: skip
            rows += [ScoreRow("trained", m.id, b, v + float(rng.normal(0, 0.1)), weights=m.as_dict(), seed=s)
                     for s in (0, 1)]  # fmt: skip
    ResultsTable(tmp_path / "ten.jsonl").append(rows)
    return correlate(ResultsTable(tmp_path / "ten.jsonl").frame(), n_boot=100, n_perm=100)


def _token(text: str, token: str) -> bool:
    import re

    return re.search(rf"(?<!\S){re.escape(token)}(?!\S)", text) is not None


@pytest.mark.parametrize("width", [80, 60, 40])
def test_no_cell_or_header_is_cut_in_a_narrow_terminal(tmp_path, width):
    from dmo.analysis.tables import _SHORT, _SHORTER, correlation_rows

    corr = _ten_mixture_table(tmp_path)
    assert (corr["n"] == 10).any()
    head, rows = correlation_rows(corr)
    out = _render(render_correlation, corr, "table", width=width)
    body = out.split("p = two-sided")[0]
    lines = body.splitlines()
    assert max(len(line.rstrip()) for line in lines) <= width
    # each row's cells, in the part of the output from its name to the next row's
    starts = []
    for r in rows:
        at = next(
            i for i, line in enumerate(lines) if i > (starts[-1] if starts else -1) and line.strip().startswith(r[2])
        )
        starts.append(at)
    compact = "left out to fit this terminal" in out
    stacked = not compact and "(n 10)" in out
    for j, r in enumerate(rows):
        block = lines[starts[j] : starts[j + 1] if j + 1 < len(rows) else len(lines)]
        assert all(line.count("[") == line.count("]") for line in block)  # no CI cut across or off a line
        region = " ".join(block)
        cells = [r[3], *(c for i, c in enumerate(r[4:], 4) if not (compact and head[i] in ("tau", "r")))]
        for c in cells:
            value = c.split(" [")[0]
            assert _token(region, value) or _token(region, f"({value})") or _token(region, f"{value})"), (c, region)
            if stacked and " [" in c:
                assert c in region  # the CI too, whole
    if compact:
        shown = [_SHORTER.get(h, h) for h in head[3:] if h not in ("tau", "r")]
    elif stacked:
        shown = [_SHORT.get(h, h) for h in head[4:]]
    else:
        shown = [_SHORT.get(h, h) for h in head[3:]]
    header_text = " ".join(lines)
    for h in shown:
        assert all(_token(header_text, part) for part in h.split()), h
    assert compact if width == 80 else stacked  # 80 columns: the table without CIs; narrower: stacked
