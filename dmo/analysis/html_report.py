"""``dmo report``: one self-contained HTML file about a results folder, plots embedded as base64 PNGs.

Contents: the correlation table (with its baselines), per proxy group a scatter of proxy against trained
score per benchmark (rho in each title), for 3-domain spaces ternary heat maps of proxy and trained scores,
per proxy group the proxy and trained score of each benchmark along every simplex edge with trained mixtures on it,
for each Optuna study (given as a table of its trials) its optimisation history and the weights of its best trials,
and the per-mixture comparison table. Written atomically: a crash never leaves half a report.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import itertools
import math
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from dmo.analysis.compare import compare
from dmo.analysis.correlate import MEAN_SCORE, correlate, spearman
from dmo.analysis.tables import COMPARE_HEAD, LEGEND, compare_rows, correlation_rows
from dmo.atomic import write_text
from dmo.errors import DmoError
from dmo.mixture import Mixture
from dmo.paths import SpaceFolder, scores_path

TOP_TRIALS = 10

_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1300px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.3em; border-bottom: 1px solid #ddd; margin-top: 2em; }
h3 { font-size: 1.1em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: right; white-space: nowrap; }
th { background: #f4f4f4; } td.l, th.l { text-align: left; }
tr.summary td { font-weight: bold; background: #fafafa; }
img { max-width: 100%; height: auto; display: block; margin: 0.5em 0 1.5em; }
.note { color: #555; font-size: 0.9em; max-width: 70em; }
details summary { cursor: pointer; margin: 0.5em 0; }
"""


@dataclass
class Figure:
    title: str
    png: bytes
    caption: str = ""


@dataclass
class Section:
    title: str
    items: list[str | Figure] = field(default_factory=list)  # HTML snippets and figures, in order


def _img(fig: Figure) -> str:
    data = base64.b64encode(fig.png).decode("ascii")
    alt = html.escape(fig.title, quote=True)
    cap = f'<p class="note">{html.escape(fig.caption)}</p>' if fig.caption else ""
    return f'<h3>{html.escape(fig.title)}</h3>{cap}<img alt="{alt}" src="data:image/png;base64,{data}">'


def _table(head: list[str], rows: list[list[str]], left: set[str], summary_col: int | None = None) -> str:
    cls = {h: ' class="l"' if h in left else "" for h in head}
    out = ["<table><thead><tr>", *(f"<th{cls[h]}>{html.escape(h)}</th>" for h in head), "</tr></thead><tbody>"]
    for r in rows:
        summary = summary_col is not None and r[summary_col] in (MEAN_SCORE, "mean rho")
        out.append('<tr class="summary">' if summary else "<tr>")
        out += [f"<td{cls[h]}>{html.escape(str(c))}</td>" for h, c in zip(head, r)]
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _domains_of(part: pd.DataFrame) -> list[str]:
    return [c.removeprefix("w_") for c in part.columns if c.startswith("w_") and part[c].notna().any()]


def _scatter_section(ok: pd.DataFrame, corr: pd.DataFrame) -> list[Figure]:
    from dmo.analysis.plots import ScatterPanel, scatter_png

    trained = ok[ok["kind"] == "trained"]
    if trained.empty:
        return []
    # a trained row without a seed is one seed of its own, not dropped
    trained = trained.assign(seed=trained["seed"].astype("Int64").fillna(-1))
    per_seed = trained.pivot_table(index=["mixture", "seed"], columns="benchmark", values="score", aggfunc="mean")
    figures = []
    for (group, method), part in ok[ok["kind"] == "proxy"].groupby(["group", "method"], sort=True):
        p = part.pivot_table(index="mixture", columns="benchmark", values="score", aggfunc="mean")
        benches = [b for b in p.columns if b in per_seed.columns]
        panels = []
        for b in [*benches, MEAN_SCORE] if len(benches) > 1 else benches:
            cols = benches if b == MEAN_SCORE else [b]
            seeds = per_seed[cols].mean(axis=1, skipna=False).dropna().unstack("seed") if cols else None
            prox = p[cols].mean(axis=1, skipna=False).dropna()
            if seeds is None or seeds.empty:
                continue
            mix = sorted(set(prox.index) & set(seeds.index))
            if len(mix) < 2:
                continue
            y_all = seeds.loc[mix]
            x, y = prox.loc[mix].to_numpy(float), y_all.mean(axis=1).to_numpy(float)
            rho = _lookup(corr, str(group), str(method), b, "spearman")
            if rho is None:
                rho = spearman(x, y)
            title = f"{b}: rho = {_fmt(rho)} (n = {len(mix)})"
            panels.append(
                ScatterPanel(title, x, y, y_all.min(axis=1).to_numpy(float), y_all.max(axis=1).to_numpy(float), mix)
            )
        if panels:
            png = scatter_png(panels, suptitle=f"{group} / {method}")
            figures.append(
                Figure(
                    f"Proxy vs trained score: {group} / {method}",
                    png,
                    "One dot per mixture with a trained model; y = mean over training seeds, bar = range over seeds. "
                    "Star: best trained mixture; circle: the proxy's top mixture.",
                )
            )
    return figures


def _ternary_section(ok: pd.DataFrame) -> list[Figure]:
    from dmo.analysis.plots import TernaryPanel, ternary_png

    figures = []
    trained = ok[ok["kind"] == "trained"]
    for (group, method), part in ok[ok["kind"] == "proxy"].groupby(["group", "method"], sort=True):
        domains = _domains_of(part)
        if len(domains) != 3:
            continue
        w_cols = [f"w_{d}" for d in domains]
        tr = trained[trained["benchmark"].isin(part["benchmark"].unique())]
        tr = tr[
            tr[w_cols].notna().all(axis=1)
            & (tr[[c for c in tr.columns if c.startswith("w_")]].fillna(0).sum(axis=1) - tr[w_cols].sum(axis=1))
            .abs()
            .lt(1e-6)
        ]
        benches = sorted(part["benchmark"].unique())
        panels = []
        fronts = {kind: _front_of(frame, benches) for kind, frame in (("proxy", part), ("trained", tr))}
        for b in [MEAN_SCORE, *benches] if len(benches) > 1 else benches:
            for kind, frame in (("proxy", part), ("trained", tr)):
                pv = frame.pivot_table(index="mixture", columns="benchmark", values="score", aggfunc="mean")
                cols = benches if b == MEAN_SCORE else [b]
                if frame.empty or any(c not in pv.columns for c in cols):
                    panels.append(TernaryPanel(f"{kind}: {b}", np.zeros((0, 3)), np.zeros(0)))
                    continue
                vals = pv[cols].mean(axis=1, skipna=False).dropna()
                w = frame.drop_duplicates("mixture").set_index("mixture").loc[vals.index, w_cols].to_numpy(float)
                marked = np.array([m in fronts[kind] for m in vals.index], bool)
                panels.append(TernaryPanel(f"{kind}: {b} ({len(vals)} mixtures)", w, vals.to_numpy(float),
                                           marked=marked))  # fmt: skip
        if any(len(p.values) for p in panels):
            figures.append(
                Figure(
                    f"Scores on the simplex: {group} / {method}",
                    ternary_png(domains, panels, cols=2),
                    "Left: merged proxies (every mixture scored, study trials included); right: models trained on "
                    "mixtures. Colour interpolated between the scored mixtures (dots); star = the highest score; "
                    "black rings: the mixtures on the front of all benchmarks (no other mixture of the panel's kind "
                    "scores at least as well on every benchmark and better on one).",
                )
            )
    return figures


def _front_of(frame: pd.DataFrame, benches: list[str]) -> set[str]:
    """The mixtures of ``frame`` (proxy or trained rows, the mean over seeds) on the front of ``benches``."""
    from dmo.pareto import non_dominated

    if frame.empty or len(benches) < 2:
        return set()
    pv = frame.pivot_table(index="mixture", columns="benchmark", values="score", aggfunc="mean")
    if any(b not in pv.columns for b in benches):
        return set()
    vals = pv[benches].dropna()
    return set(vals.index[non_dominated(vals.to_numpy(float))]) if len(vals) else set()


def _front_section(df: pd.DataFrame, ok: pd.DataFrame, n_boot: int, seed: int) -> list[str | Figure]:
    """Per proxy group with two or more benchmarks: the front of the benchmarks (2: proxy and trained scores with
    both fronts; 3 or more: parallel coordinates of the proxies' front), and its fidelity table."""
    from dmo.analysis.pareto import Objectives, front_fidelity_table
    from dmo.analysis.plots import FrontPanel, front_png, parallel_png
    from dmo.analysis.tables import PARETO_LEGEND, pareto_fidelity_rows

    items: list[str | Figure] = []
    trained = ok[ok["kind"] == "trained"]
    t_mean = trained.pivot_table(index="mixture", columns="benchmark", values="score", aggfunc="mean")
    for (group, method), part in ok[ok["kind"] == "proxy"].groupby(["group", "method"], sort=True):
        benches = sorted(part["benchmark"].unique())
        if len(benches) < 2:
            continue
        pv = part.pivot_table(index="mixture", columns="benchmark", values="score", aggfunc="mean")[benches].dropna()
        if pv.empty:
            continue
        proxy_front = _front_of(part, benches)
        both = [m for m in pv.index if m in t_mean.index and t_mean.loc[m].reindex(benches).notna().all()]
        trained_front = _front_of(trained[trained["mixture"].isin(both)], benches)
        tv = t_mean.reindex(index=pv.index, columns=benches)
        name = f"{group} / {method}"
        if len(benches) == 2:
            panel = FrontPanel(
                f"{name}: {len(pv)} proxies, {len(both)} trained", (benches[0], benches[1]), pv.to_numpy(float),
                tv.to_numpy(float), np.array([m in proxy_front for m in pv.index]),
                np.array([m in trained_front for m in pv.index]),
            )  # fmt: skip
            items.append(
                Figure(
                    f"Front of {benches[0]} and {benches[1]}: {name}",
                    front_png([panel]),
                    "Orange: merged proxies, blue: models trained on the mixtures (mean over seeds); a grey line joins "
                    "one mixture's two points; the staircases are the two fronts (both objectives maximised); orange "
                    "rings: the trained scores of the mixtures on the proxies' front.",
                )
            )
        else:
            order = sorted(proxy_front, key=lambda m: (-float(pv.at[m, benches[0]]), m))
            items.append(
                Figure(
                    f"The proxies' front of {len(benches)} benchmarks: {name}",
                    parallel_png(
                        benches,
                        pv.loc[order].to_numpy(float),
                        order,
                        f"{name}: {len(order)} mixtures",
                        trained=tv.loc[order].to_numpy(float),
                    ),
                    "One line per mixture on the proxies' front (no other proxy scores at least as well on every "
                    "benchmark and better on one), across the benchmarks, each axis scaled to the values drawn on it; "
                    "dashed: the same mixture's trained scores, where it was trained.",
                )
            )
        fid = front_fidelity_table(df[df["group"].isin([group]) | (df["kind"] != "proxy")], Objectives.each(benches),
                                   n_boot=n_boot, seed=seed, method=str(method)).table  # fmt: skip
        fid = fid[(fid["group"] == group) & (fid["method"] == method)]
        if not fid.empty:
            head, rows = pareto_fidelity_rows(fid)
            table = _table(head, rows, {"group", "method", "front of"})
            items.append(f"<h3>Front fidelity: {html.escape(name)}</h3>" + table)
            items.append(f'<p class="note">{html.escape(PARETO_LEGEND)} ({n_boot} resamples, seed {seed}).</p>')
    return items


#: a weight counts as zero below this (mixture ids round weights to 4 digits)
_ZERO = 1e-9


def _edge_points(frame: pd.DataFrame, a: str, b: str) -> pd.DataFrame:
    """The rows of ``frame`` on the edge between domains a and b: both weights positive, every other weight 0."""
    cols = [c for c in frame.columns if c.startswith("w_")]
    if f"w_{a}" not in cols or f"w_{b}" not in cols:
        return frame.iloc[:0]
    w = frame[cols].astype(float).fillna(0.0)
    others = [c for c in cols if c not in (f"w_{a}", f"w_{b}")]
    on = (w[f"w_{a}"] > _ZERO) & (w[f"w_{b}"] > _ZERO)
    if others:
        on &= w[others].abs().max(axis=1) <= _ZERO
    return frame[on]


def _vertex_rows(frame: pd.DataFrame, d: str) -> pd.DataFrame:
    """The rows of ``frame`` at the pure mixture of domain d."""
    cols = [c for c in frame.columns if c.startswith("w_")]
    if f"w_{d}" not in cols:
        return frame.iloc[:0]
    w = frame[cols].astype(float).fillna(0.0)
    return frame[(w[f"w_{d}"] - 1).abs().le(1e-6) & (w.sum(axis=1) - 1).abs().le(1e-6)]


def _edges_section(ok: pd.DataFrame, expert_at_vertex: Collection[str]) -> list[Figure]:
    """Per proxy group, each edge of the simplex with trained mixtures on it: per benchmark the proxy and the
    trained score against the weight, the experts at the ends. Forgetting shows here: a proxy that falls towards
    one end faster than the trained models do is an expert that forgets the other domain when merged."""
    from dmo.analysis.plots import EdgePanel, edges_png

    trained = ok[ok["kind"] == "trained"]
    if trained.empty:
        return []
    trained = trained.assign(seed=trained["seed"].astype("Int64").fillna(-1))
    experts = ok[ok["kind"] == "expert"].groupby(["mixture", "benchmark"])["score"].mean()
    figures = []
    for (group, method), part in ok[ok["kind"] == "proxy"].groupby(["group", "method"], sort=True):
        domains = _domains_of(part)
        benches = sorted(set(part["benchmark"]) & set(trained["benchmark"]))
        panels, n_edges = [], 0
        for a, b in itertools.combinations(domains, 2):
            tr_edge = _edge_points(trained[trained["benchmark"].isin(benches)], a, b)
            if tr_edge.empty:  # the experts alone are no curve: only edges with trained mixtures on them
                continue
            n_edges += 1
            px_edge = _edge_points(part, a, b)
            for bench in benches:
                t = tr_edge[tr_edge["benchmark"] == bench]
                per_seed = t.groupby(["mixture", "seed"])["score"].mean().unstack("seed")
                wt = t.drop_duplicates("mixture").set_index("mixture")[f"w_{b}"].astype(float)
                tx, ty = list(wt.loc[per_seed.index]), list(per_seed.mean(axis=1))
                lo, hi = list(per_seed.min(axis=1)), list(per_seed.max(axis=1))
                is_exp = [False] * len(tx)
                p = px_edge[px_edge["benchmark"] == bench]
                pm = p.groupby("mixture")["score"].mean()
                wp = p.drop_duplicates("mixture").set_index("mixture")[f"w_{b}"].astype(float)
                px, py = list(wp.loc[pm.index]), list(pm)
                for d, x in ((a, 0.0), (b, 1.0)):
                    e = experts.get((d, bench))
                    if e is not None:  # an expert is the model trained on its domain alone: the edge's end
                        tx, ty, lo, hi, is_exp = [*tx, x], [*ty, e], [*lo, e], [*hi, e], [*is_exp, True]
                    v = _vertex_rows(part[part["benchmark"] == bench], d)
                    if not v.empty:
                        px, py = [*px, x], [*py, float(v["score"].mean())]
                    elif e is not None and method in expert_at_vertex:
                        # this method's one-expert merge is that expert: its proxy score is the expert's
                        px, py = [*px, x], [*py, e]
                panels.append(
                    EdgePanel(
                        f"{a} - {b}: {bench} ({len(per_seed)} trained)",
                        np.array(px), np.array(py), np.array(tx), np.array(ty), np.array(lo), np.array(hi),
                        xlabel=f"weight of {b} (0 = {a}, 1 = {b})", expert=np.array(is_exp),
                    )
                )  # fmt: skip
        if panels:
            figures.append(
                Figure(
                    f"Along the simplex edges: {group} / {method}",
                    edges_png(panels, cols=len(benches), suptitle=f"{group} / {method}"),
                    f"{n_edges} edge{'s' if n_edges != 1 else ''} with trained mixtures, one row each, one panel per "
                    "benchmark: the proxy (orange) and the trained models (blue: mean over seeds, band: seed range) "
                    "against the weight of the edge's second domain; diamonds: the experts at the ends. Where the "
                    "proxy falls off faster than training towards one end, merging forgets what training keeps.",
                )
            )
    return figures


def _study_section(history: pd.DataFrame) -> list[str | Figure]:
    """Per study: optimisation history, weights of the best trials, ternary of the trials, best-trials table."""
    from dmo.analysis.plots import TernaryPanel, history_png, ternary_png, weights_png

    items: list[str | Figure] = []
    for name, trials in history.groupby("study", sort=True):
        objectives = [c for c in trials.columns if c.startswith(OBJECTIVE_COLUMN) and trials[c].notna().any()]
        if len(objectives) > 1:
            items += _multi_objective_study(str(name), trials, objectives)
            continue
        done = trials[trials["value"].notna()].sort_values("number")
        if done.empty:
            items.append(f"<p>study <b>{html.escape(str(name))}</b>: no completed trial yet</p>")
            continue
        named = str(done["domains"].iloc[0])
        domains = named.split(",") if named else list(Mixture.parse(done["mixture"].iloc[0]).domains)
        mixtures = [Mixture.parse(m, domains) for m in done["mixture"]]
        numbers, values = done["number"].astype(int).tolist(), done["value"].astype(float).tolist()
        items.append(
            Figure(
                f"Study {name}: optimisation history",
                history_png(numbers, values, f"{name} ({len(done)} completed trials)"),
            )
        )
        feasible = _feasible(done)
        order = sorted(range(len(done)), key=lambda i: (not feasible[i], -values[i], numbers[i]))[:TOP_TRIALS]
        labels = [f"#{numbers[i]}  {values[i]:.4f}" for i in order]
        weights = np.array([mixtures[i].weights for i in order])
        items.append(
            Figure(
                f"Study {name}: weights of the {len(order)} best trials",
                weights_png(domains, labels, weights, f"{name}: best trials (trial number, objective)"),
            )
        )
        if len(domains) == 3:
            w = np.array([m.weights for m in mixtures])
            panel = TernaryPanel(f"{name}: objective of each trial", w, np.array(values), interpolate=False)
            items.append(
                Figure(
                    f"Study {name}: where the sampler looked",
                    ternary_png(domains, [panel], cols=1),
                    "One dot per completed trial, coloured by its objective; star = the best trial.",
                )
            )
        score_cols = sorted(c for c in done.columns if c.startswith("score:") and done[c].notna().any())
        constrained = FEASIBLE_COLUMN in done.columns and done[FEASIBLE_COLUMN].notna().any()
        head = ["rank", "trial", "objective", *(["feasible"] if constrained else []), "mixture",
                *(c.removeprefix("score:") for c in score_cols)]  # fmt: skip
        rows = [
            [
                str(r + 1),
                str(numbers[i]),
                f"{values[i]:.4f}",
                *(["yes" if feasible[i] else "no"] if constrained else []),
                str(done["mixture"].iloc[i]),
                *(_fmt(_value(done[c].iloc[i]), signed=False) for c in score_cols),
            ]
            for r, i in enumerate(order)
        ]
        items.append(f"<h3>Study {html.escape(str(name))}: best trials</h3>" + _table(head, rows, {"mixture"}))
    return items


#: the study table's columns (dmo.search.history): one per objective of a multi-objective study, and feasibility
OBJECTIVE_COLUMN = "objective:"
FEASIBLE_COLUMN = "feasible"


def _feasible(trials: pd.DataFrame) -> list[bool]:
    if FEASIBLE_COLUMN not in trials.columns:
        return [True] * len(trials)
    # True, False, or NaN for a trial of an unconstrained study
    return [not (isinstance(v, (bool, np.bool_)) and not v) for v in trials[FEASIBLE_COLUMN].tolist()]


def _multi_objective_study(name: str, trials: pd.DataFrame, columns: list[str]) -> list[str | Figure]:
    """A multi-objective study: its trials and its feasible front (2 objectives: in the plane; more: parallel
    coordinates of the front), and the front as a table."""
    from dmo.analysis.plots import FrontPanel, front_png, parallel_png
    from dmo.pareto import non_dominated

    done = trials.dropna(subset=columns).sort_values("number")
    if done.empty:
        return [f"<p>study <b>{html.escape(name)}</b>: no completed trial yet</p>"]
    names = [c.removeprefix(OBJECTIVE_COLUMN) for c in columns]
    values = done[columns].to_numpy(float)
    feasible = np.array(_feasible(done), bool)
    front = np.zeros(len(done), bool)
    if feasible.any():
        front[np.flatnonzero(feasible)[non_dominated(values[feasible])]] = True
    infeasible = int((~feasible).sum())
    note = f"; {infeasible} infeasible trial(s) left out of the front" if infeasible else ""
    items: list[str | Figure] = []
    if len(columns) == 2:
        panel = FrontPanel(f"{name}: {len(done)} trials, {int(front.sum())} on the front", (names[0], names[1]),
                           values, np.full_like(values, np.nan), front, np.zeros(len(done), bool))  # fmt: skip
        items.append(Figure(f"Study {name}: trials and front", front_png([panel]),
                            f"One dot per completed trial (its proxy's objectives); the staircase is the study's "
                            f"front{note}."))  # fmt: skip
    elif front.any():
        idx = sorted(np.flatnonzero(front), key=lambda i: (-values[i, 0], int(done["number"].iloc[i])))
        labels = [f"#{int(done['number'].iloc[i])} {done['mixture'].iloc[i]}" for i in idx]
        items.append(Figure(f"Study {name}: its front", parallel_png(names, values[idx], labels, name),
                            f"One line per trial on the study's front, across its objectives{note}."))  # fmt: skip
    idx = sorted(np.flatnonzero(front), key=lambda i: (-values[i, 0], int(done["number"].iloc[i])))
    head = ["trial", "mixture", *names]
    rows = [[str(int(done["number"].iloc[i])), str(done["mixture"].iloc[i]), *(f"{v:.4f}" for v in values[i])]
            for i in idx]  # fmt: skip
    if rows:
        items.append(f"<h3>Study {html.escape(name)}: front</h3>" + _table(head, rows, {"mixture"}))
    else:
        items.append(f"<p>study <b>{html.escape(name)}</b>: no feasible trial{html.escape(note)}</p>")
    return items


def _value(x: object) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)  # type: ignore[arg-type]


def _fmt(x, signed: bool = True) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:+.2f}" if signed else f"{x:.4f}"


def _lookup(corr: pd.DataFrame, group: str, method: str, bench: str, col: str) -> float | None:
    if corr.empty:
        return None
    hit = corr[(corr["group"] == group) & (corr["method"] == method) & (corr["benchmark"] == bench)]
    return None if hit.empty else float(hit[col].iloc[0])


def build_report(
    results: Path,
    studies: pd.DataFrame | None = None,
    studies_note: str | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    n_perm: int = 1000,
    k: int = 3,
    expert_at_vertex: Collection[str] = (),
) -> str:
    """The report's HTML text for a results folder (or its ``scores.jsonl``).

    ``expert_at_vertex``: the merge methods whose merge of one expert with weight 1 is the expert itself (the merge
    registry's :attr:`~dmo.merge.registry.MergeMethod.expert_at_vertex`): their edge curves end at the experts' scores
    where the pure mixture has no proxy score of its own.
    ``studies``: the completed trials of the studies to show (:func:`dmo.search.history.study_history`'s table);
    ``studies_note``: why they could not be read.
    """
    from dmo.results import ResultsTable

    path = scores_path(Path(results))
    if not path.exists():
        raise DmoError(f"no results table at {path}: run 'dmo study' or 'dmo demo' first")
    folder = path.parent
    df = ResultsTable(path).frame()
    ok = df[(df["status"] == "ok") & df["score"].notna()].copy()
    ok["score"] = ok["score"].astype(float)
    corr = correlate(df, n_boot=n_boot, seed=seed, n_perm=n_perm, k=k)

    sections: list[Section] = []
    counts = ", ".join(
        f"{n} {kind}"
        for kind, n in ok.drop_duplicates(["kind", "mixture", "seed"])["kind"].value_counts().sort_index().items()
    )
    failed = int((df["status"] == "failed").sum())
    partial = int((df["status"] == "partial").sum())
    overview = Section(
        "Overview",
        [
            f"<p>Results table <code>{html.escape(str(path))}</code>: {len(ok)} scores "
            f"({html.escape(counts or 'none')} models){f', {failed} failed evaluations' if failed else ''}.</p>"
            + (
                f"<p>Full scores only: {partial} partial scores (proxies a pruner stopped, scored on part of their "
                "items) are left out of every table and figure; <code>dmo rescore</code> scores them in full.</p>"
                if partial
                else ""
            )
        ],
    )
    sections.append(overview)

    corr_sec = Section("Rank correlation of proxy and trained scores")
    if corr.empty:
        corr_sec.items.append("<p>No mixture has both a proxy score and a trained score yet.</p>")
    else:
        head, rows = correlation_rows(corr)
        corr_sec.items.append(_table(head, rows, {"group", "method", "benchmark"}, summary_col=2))
        corr_sec.items.append(
            f'<p class="note">{html.escape(LEGEND)} 95% CIs: bootstrap over mixtures '
            f"({n_boot} resamples, seed {seed}); p-values: {n_perm} permutations.</p>"
        )
    sections.append(corr_sec)

    scatter = _scatter_section(ok, corr)
    if scatter:
        sections.append(Section("Proxy against trained score", list(scatter)))
    ternary = _ternary_section(ok)
    if ternary:
        sections.append(Section("Three-domain spaces on the simplex", list(ternary)))
    front = _front_section(df, ok, n_boot, seed)
    if front:
        sections.append(Section("Trade-offs: the front of the benchmarks", front))
    edges = _edges_section(ok, expert_at_vertex)
    if edges:
        sections.append(Section("Proxy and trained score along the simplex edges", list(edges)))

    if studies_note:
        sections.append(Section("Studies", [f'<p class="note">{html.escape(studies_note)}</p>']))
    elif studies is not None and not studies.empty:
        sections.append(Section("Studies", _study_section(studies)))

    comp = compare(df)
    if not comp.empty:
        body = _table(COMPARE_HEAD, compare_rows(comp), {"group", "method", "benchmark", "mixture"})
        sections.append(
            Section(
                "Per mixture",
                [
                    "<details><summary>proxy and trained score of every mixture, with ranks (rank 1 = best; "
                    "rank diff = proxy rank - trained rank)</summary>" + body + "</details>"
                ],
            )
        )

    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>dmo report: {html.escape(folder.name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>dmo report: {html.escape(folder.name)}</h1>",
        f'<p class="note">generated {now}. The proxy is only worth its cost where its rho beats the free '
        "expert-mix baseline and the regression fitted on trained mixtures; the seed rho is the ceiling.</p>",
    ]
    for s in sections:
        out.append(f"<h2>{html.escape(s.title)}</h2>")
        out += [_img(i) if isinstance(i, Figure) else i for i in s.items]
    out.append("</body></html>")
    return "\n".join(out)


def write_report(results: Path, output: Path | None = None, **kwargs) -> Path:
    """Render the report of a results folder and write it atomically; returns its path."""
    target = Path(output) if output else SpaceFolder.of(scores_path(Path(results))).report
    text = build_report(Path(results), **kwargs)
    write_text(target, text)
    return target
