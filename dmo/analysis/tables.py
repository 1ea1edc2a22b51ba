"""Readable output of correlation tables: a rich terminal table, Markdown, CSV or JSON."""

from __future__ import annotations

import math

import pandas as pd
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from dmo.analysis.compare import COLUMNS
from dmo.calibration import DEFAULT_CALIBRATION
from dmo.errors import DmoError

FORMATS = ("table", "markdown", "csv", "json")


def _f(x: float, digits: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.{digits}f}"


def _ci(rho: float, lo: float, hi: float) -> str:
    if isinstance(rho, float) and math.isnan(rho):
        return "-"
    if math.isnan(lo):
        return _f(rho)
    return f"{_f(rho)} [{_f(lo)}, {_f(hi)}]"


def _p(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.3f}" if x >= 0.001 else f"{x:.0e}"


def _share(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def correlation_rows(table: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells of a correlation table (shared by the terminal, Markdown and HTML)."""
    k = int(table["k"].iloc[0]) if "k" in table and len(table) else 3
    head = [
        "group",
        "method",
        "benchmark",
        "n",
        "proxy rho [95% CI]",
        "calibrated rho [95% CI]",
        "p",
        "tau",
        "r",
        f"top-{k}",
        "expert-mix rho [95% CI]",
        "regression rho [95% CI]",
        "seed rho",
        "regret@1",
    ]
    rows = []
    for r in table.itertuples():
        rows.append(
            [
                r.group,
                r.method,
                r.benchmark,
                str(r.n),
                _ci(r.spearman, r.spearman_lo, r.spearman_hi),
                _ci(r.calibrated_spearman, r.calibrated_lo, r.calibrated_hi),
                _p(r.spearman_p),
                _f(r.kendall),
                _f(r.pearson),
                _share(r.topk_overlap),
                _ci(r.baseline_spearman, r.baseline_lo, r.baseline_hi),
                _ci(r.regression_spearman, r.regression_lo, r.regression_hi),
                _f(r.seed_spearman),
                "-" if math.isnan(r.regret_at_1) else f"{r.regret_at_1:.3f}",
            ]
        )
    return head, rows


LEGEND = (
    "p = two-sided permutation p-value of the proxy's rho; r = Pearson; top-k = share of the trained top k in the "
    "proxy's top k; expert-mix = sum_i w_i * score(expert_i), a free baseline; regression = ridge on the weights "
    "fitted on the other trained mixtures (RegMix-style, leave-one-out); calibrated = mean score only: the proxy's "
    f"scores mapped to trained ones by a calibration ({DEFAULT_CALIBRATION} unless told otherwise; the CSV's "
    "'calibration' column) fitted on the experts and the other trained mixtures (leave-one-out), what a study with "
    "'objective: {calibrate: ...}' optimises; seed rho = agreement of two training seeds (the ceiling); regret@1 = "
    "best trained score minus that of the proxy's top mixture."
)


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _printed_as_data(console: Console, frame: pd.DataFrame, fmt: str) -> bool:
    """Print ``frame`` as CSV or JSON (or say it is empty); False when a table is still to be drawn."""
    if fmt not in FORMATS:
        raise DmoError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if fmt == "csv":
        console.print(frame.to_csv(index=False), end="", highlight=False, soft_wrap=True)
    elif fmt == "json":
        console.print(frame.to_json(orient="records", indent=2), highlight=False, soft_wrap=True)
    elif frame.empty:
        console.print("no mixture has both a proxy score and a trained score yet")
    else:
        return False
    return True


def render_correlation(console: Console, table: pd.DataFrame, fmt: str = "table") -> None:
    if _printed_as_data(console, table, fmt):
        return
    head, rows = correlation_rows(table)
    if fmt == "markdown":
        console.print(markdown_table(head, rows), highlight=False, soft_wrap=True)
        return
    title = "proxy vs trained mixtures: rank correlation (Spearman rho \\[bootstrap 95% CI])"
    # A column that says the same on every row (one space, one merge method) goes into the title instead.
    drop = [i for i, h in enumerate(head[:2]) if len({r[i] for r in rows}) == 1]
    if drop:
        title += " - " + ", ".join(f"{head[i]} {escape(rows[0][i])}" for i in drop)
    # the widest layout that fits the terminal without cutting a cell: CIs on a second line of their cell; then
    # without CIs, tau and r; then one block per row (its cells as "name value", packed into the width)
    wide = _correlation_rich(title, head, rows, drop, compact=False)
    narrow = _correlation_rich(title, head, rows, [*drop, head.index("tau"), head.index("r")], compact=True)
    if _fits(console, wide):
        console.print(wide)
        console.print(LEGEND, highlight=False)
    elif _fits(console, narrow):
        console.print(narrow)
        console.print(LEGEND, highlight=False)
        console.print(
            "(CIs, tau and r left out to fit this terminal: widen it, or use --format markdown, csv or json)",
            highlight=False,
        )
    else:
        _print_stacked(console, title, head, rows, drop)
        console.print(LEGEND, highlight=False)


def _fits(console: Console, table: Table) -> bool:
    """Whether ``table`` fits the console at its natural width, so that rich need not squeeze (and cut) a column."""
    return Measurement.get(console, console.options.update_width(10_000), table).maximum <= console.width


def _print_stacked(console: Console, title: str, head: list[str], rows: list[list[str]], drop: list[int]) -> None:
    """One block per row: its name, then every cell as ``name value``, packed into lines of the console's width
    (a cell wider than the console wraps onto the next line; nothing is cut)."""
    console.print(title)
    width = console.width - 2
    for r in rows:
        name = " / ".join(r[i] for i in range(3) if i not in drop)
        console.print(Text(f"{name}  (n {r[3]})", style="bold" if r[2] in ("mean score", "mean rho") else ""))
        line = ""
        for h, cell in zip(head[4:], r[4:]):
            item = f"{_SHORT.get(h, h)} {cell}"
            if line and len(line) + 3 + len(item) > width:
                console.print(Text("  " + line), overflow="fold")
                line = ""
            line = f"{line}   {item}" if line else item
        if line:
            console.print(Text("  " + line), overflow="fold")


#: Shorter headers for the terminal, where width is scarce.
_SHORT = {
    "proxy rho [95% CI]": "proxy rho",
    "calibrated rho [95% CI]": "calibrated",
    "expert-mix rho [95% CI]": "expert-mix",
    "regression rho [95% CI]": "regression",
}
_SHORTER = {
    "proxy rho [95% CI]": "proxy",
    "calibrated rho [95% CI]": "calib",
    "expert-mix rho [95% CI]": "exp-mix",
    "regression rho [95% CI]": "regress",
    "seed rho": "seed",
    "regret@1": "regret",
}


def _correlation_rich(title: str, head: list[str], rows: list[list[str]], drop: list[int], compact: bool) -> Table:
    keep = [i for i in range(len(head)) if i not in drop]
    names = _SHORTER if compact else _SHORT
    # compact: columns apart by the box's one-space divider only, no edges (what lets 10 columns fit 80 characters)
    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, show_edge=not compact,
              padding=0 if compact else (0, 1))  # fmt: skip
    for i in keep:
        h = head[i]
        left = h in ("group", "method", "benchmark")
        t.add_column(names.get(h, h), justify="left" if left else "right", overflow="fold", no_wrap=compact or not left)
    for r in rows:
        # CIs go on a second line of their cell (they would double the table's width), or away
        cells = [escape(r[i].split(" [")[0] if compact else r[i].replace(" [", "\n[")) for i in keep]
        t.add_row(*cells, style="bold" if r[2] in ("mean score", "mean rho") else None)
    return t


def _num(x, digits: int = 4) -> str:
    return "-" if x is None or pd.isna(x) else f"{float(x):.{digits}f}"


def _int(x) -> str:
    return "-" if x is None or pd.isna(x) else str(int(x))


def _signed(x) -> str:
    return "-" if x is None or pd.isna(x) else f"{int(x):+d}"


#: ``dmo.analysis.compare.COLUMNS`` as table headers
COMPARE_HEAD = [c.replace("expert_mix", "expert-mix").replace("_", " ") for c in COLUMNS]


def compare_rows(frame: pd.DataFrame) -> list[list[str]]:
    return [
        [
            r.group,
            r.method,
            r.benchmark,
            r.mixture,
            _num(r.trained),
            _int(r.seeds),
            _num(r.proxy),
            _num(r.expert_mix),
            _int(r.trained_rank),
            _int(r.proxy_rank),
            _signed(r.rank_diff),
        ]
        for r in frame.itertuples()
    ]


def render_compare(console: Console, frame: pd.DataFrame, fmt: str = "table") -> None:
    """Proxy vs trained per mixture: one rich table per (group, method, benchmark), or one flat table."""
    if _printed_as_data(console, frame, fmt):
        return
    if fmt == "markdown":
        console.print(markdown_table(COMPARE_HEAD, compare_rows(frame)), highlight=False, soft_wrap=True)
        return
    from dmo.analysis.correlate import spearman

    for (group, method, bench), part in frame.groupby(["group", "method", "benchmark"], sort=False):
        both = part.dropna(subset=["proxy", "trained"])
        rho = spearman(both["proxy"].to_numpy(float), both["trained"].to_numpy(float))
        title = f"{group} / {method} / {bench}: proxy rho {_f(rho)} over {len(both)} mixtures"
        t = Table(title=escape(title), title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
        for h in COMPARE_HEAD[3:]:
            if h == "mixture":
                t.add_column(h, overflow="fold", min_width=16)
            else:
                t.add_column(h.replace("expert-", "exp-").replace(" ", "\n"), justify="right", no_wrap=True)
        for cells, r in zip(compare_rows(part), part.itertuples()):
            proxy_first = not pd.isna(r.proxy_rank) and int(r.proxy_rank) == 1
            trained_first = not pd.isna(r.trained_rank) and int(r.trained_rank) == 1
            style = None
            if proxy_first and trained_first:
                style = "bold green"
            elif proxy_first:
                style = "bold yellow"
            elif trained_first:
                style = "bold"
            t.add_row(*map(escape, cells[3:]), style=style)
        console.print(t)
    console.print(
        "rank 1 = best (ties share the better rank); rank diff = proxy rank - trained rank (positive: the proxy "
        "under-rates the mixture); exp-mix = the expert-mix baseline sum_i w_i * score(expert_i); bold = best "
        "trained, yellow = the proxy's pick, green = both."
    )


# ------------------------------------------------------------------------------------------------- dmo pareto

#: What the fidelity figures mean, printed under the table.
PARETO_LEGEND = (
    "n = mixtures with both scores; picks = the front picked; front = the trained front; "
    "precision = share of the picks on the trained front; recall = share of the trained front picked; "
    "hypervolume = trained hypervolume of the picks / of the trained front (reference: per objective the worst "
    "trained score minus 10% of the range); [95% CI]: bootstrap over training seeds; seed ceiling: one seed's front "
    "judged by the other seeds."
)


def pareto_front_rows(front: pd.DataFrame, names: list[str]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the proxies' front: mixture, proxy objectives, trained objectives, on the trained front."""
    head = ["group", "method", "mixture", *(f"proxy {n}" for n in names), *(f"trained {n}" for n in names),
            "on trained front"]  # fmt: skip
    rows = []
    for r in front.to_dict("records"):
        on = r.get("on_trained_front")
        rows.append(
            [str(r["group"]), str(r["method"]), str(r["mixture"]),
             *(_num(r[f"proxy:{n}"]) for n in names), *(_num(r[f"trained:{n}"]) for n in names),
             "-" if on is None or (isinstance(on, float) and math.isnan(on)) else ("yes" if on else "no")]
        )  # fmt: skip
    return head, rows


def pareto_fidelity_rows(table: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    head = ["group", "method", "front of", "n", "picks", "front", "precision [95% CI]", "recall [95% CI]",
            "hypervolume [95% CI]"]  # fmt: skip

    def cell(x: float, lo: float, hi: float) -> str:
        if math.isnan(x):
            return "-"
        return f"{x:.2f}" if math.isnan(lo) else f"{x:.2f} [{lo:.2f}, {hi:.2f}]"

    rows = [
        [str(r.group), str(r.method), str(r.source), str(r.n), str(r.picks), str(r.front),
         cell(r.precision, r.precision_lo, r.precision_hi), cell(r.recall, r.recall_lo, r.recall_hi),
         cell(r.hypervolume_ratio, r.hypervolume_ratio_lo, r.hypervolume_ratio_hi)]
        for r in table.itertuples()
    ]  # fmt: skip
    return head, rows


def render_pareto(
    console: Console, front: pd.DataFrame, fidelity: pd.DataFrame, names: list[str], fmt: str = "table"
) -> None:
    """The proxies' front and, where trained mixtures exist, its fidelity; CSV: two blocks, JSON: one object."""
    if fmt not in FORMATS:
        raise DmoError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if fmt == "json":
        import json

        text = json.dumps(
            {"objectives": names, "front": json.loads(front.to_json(orient="records")),
             "fidelity": json.loads(fidelity.to_json(orient="records"))}, indent=2,
        )  # fmt: skip
        console.print(text, highlight=False, soft_wrap=True)
        return
    if fmt == "csv":
        console.print(front.to_csv(index=False), highlight=False, soft_wrap=True)
        console.print(fidelity.to_csv(index=False), end="", highlight=False, soft_wrap=True)
        return
    if front.empty:
        console.print(f"no proxy has a score on every objective ({', '.join(names)})")
        return
    head, rows = pareto_front_rows(front, names)
    f_head, f_rows = pareto_fidelity_rows(fidelity)
    if fmt == "markdown":
        console.print(markdown_table(head, rows), highlight=False, soft_wrap=True)
        if f_rows:
            console.print("\n" + markdown_table(f_head, f_rows), highlight=False, soft_wrap=True)
        return
    for (group, method), part in front.groupby(["group", "method"], sort=False):
        t = Table(title=escape(f"{group} / {method}: the proxies' front ({len(part)} mixtures)"), title_justify="left",
                  box=box.SIMPLE_HEAD, pad_edge=False)  # fmt: skip
        for h in head[2:]:
            if h == "mixture":
                t.add_column(h, overflow="fold", min_width=16)
            else:
                t.add_column(escape(h.replace(" ", "\n", 1)), justify="right", no_wrap=True)
        for cells in pareto_front_rows(part, names)[1]:
            t.add_row(*map(escape, cells[2:]))
        console.print(t)
    if not f_rows:
        console.print("no mixture has both a proxy and a trained score on every objective: no fidelity figures")
        return
    t = Table(title="front fidelity: the proxy's front against the trained front", title_justify="left",
              box=box.SIMPLE_HEAD, pad_edge=False)  # fmt: skip
    drop = [i for i in (0, 1) if len({r[i] for r in f_rows}) == 1]  # one space, one method: said in the title
    if drop:
        t.title = escape(f"{t.title} - " + ", ".join(f"{f_head[i]} {f_rows[0][i]}" for i in drop))
    keep = [i for i in range(len(f_head)) if i not in drop]
    for i in keep:
        h = f_head[i]
        left = h in ("group", "method", "front of")
        t.add_column(escape(h.replace(" [", "\n[")), justify="left" if left else "right", overflow="fold")
    for cells in f_rows:
        t.add_row(*(escape(cells[i].replace(" [", "\n[")) for i in keep))
    console.print(t)
    console.print(PARETO_LEGEND, highlight=False)
