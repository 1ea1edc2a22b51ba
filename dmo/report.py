"""Readable output of correlation tables: a rich terminal table, Markdown, CSV or JSON."""

from __future__ import annotations

import math

import pandas as pd
from rich.console import Console
from rich.table import Table

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


def correlation_rows(table: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    head = [
        "group", "method", "benchmark", "n", "proxy rho [95% CI]", "tau", "expert-mix rho [95% CI]",
        "seed rho", "regret@1",
    ]
    rows = []
    for r in table.itertuples():
        rows.append([
            r.group, r.method, r.benchmark, str(r.n), _ci(r.spearman, r.spearman_lo, r.spearman_hi),
            _f(r.kendall), _ci(r.baseline_spearman, r.baseline_lo, r.baseline_hi), _f(r.seed_spearman),
            "-" if math.isnan(r.regret_at_1) else f"{r.regret_at_1:.3f}",
        ])
    return head, rows


def render_correlation(console: Console, table: pd.DataFrame, fmt: str = "table") -> None:
    if fmt not in FORMATS:
        raise DmoError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if fmt == "csv":
        console.print(table.to_csv(index=False), end="", highlight=False, soft_wrap=True)
        return
    if fmt == "json":
        console.print(table.to_json(orient="records", indent=2), highlight=False, soft_wrap=True)
        return
    if table.empty:
        console.print("no mixture has both a proxy score and a trained score yet")
        return
    head, rows = correlation_rows(table)
    if fmt == "markdown":
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        console.print("\n".join(lines), highlight=False, soft_wrap=True)
        return
    title = "proxy vs trained mixtures: rank correlation (Spearman rho, bootstrap 95% CI)"
    t = Table(title=title, title_justify="left")
    for h in head:
        t.add_column(h, justify="left" if h in ("group", "method", "benchmark") else "right")
    for r in rows:
        t.add_row(*r, style="bold" if r[2] in ("mean score", "mean rho") else None)
    console.print(t)
    console.print(
        "expert-mix = sum_i w_i * score(expert_i), a free baseline; seed rho = agreement of two training seeds "
        "(the ceiling); regret@1 = best trained score minus that of the proxy's top mixture."
    )
