"""Does the merged proxy's front recover the trained models' front better than the free baselines? (issue 25, item 5)

On the tiny world's 3- and 4-domain ground truth (the DMO paper's mixtures, two training seeds each, built by
``dmo world build --ground-truth 3d,4d``), the figures of ``dmo pareto`` (:mod:`dmo.analysis.pareto`) for the fronts
of every benchmark of the space.

Rules, fixed before the runs:

- **Objectives**: every benchmark of the space, one objective each (3 in 3d, 4 in 4d), all maximised; the mixtures
  are the space's trained mixtures (21 in 3d, 20 in 4d), each with a proxy score.
- **Fronts compared**: the **linear proxy**; the **best calibrated objective** of ``benchmarks/proxy_fidelity.py``
  (its ``decision.winner`` in ``benchmarks/results/proxy_fidelity.json``: ``residual:svd``, the residual calibration
  of the svd proxy, fitted per objective on the experts at the vertices and the other trained mixtures,
  leave-one-out); the free baselines **expert mix** and **regression** (leave-one-out ridge on the weights); the
  **seed ceiling** (one seed's front judged by the other seed).
- **Figures**: precision and recall of the trained non-dominated set among the picks, and the hypervolume of the
  trained scores of the picks relative to the trained front's own (reference: per objective the worst trained score
  minus 10% of the range); 95% CIs by ``N_BOOT`` = 1000 seed-bootstrap resamples (seed 0).
- **Verdict**: a front *beats* a baseline on a figure when the 95% CI of the paired difference (the same seed
  resamples) lies above 0, *loses* when it lies below 0, and is *level* otherwise. The README says the proxy's front
  beats the free baselines only if the linear proxy beats both the expert mix and the regression on the hypervolume
  ratio in both spaces.

Run ``python benchmarks/pareto_fidelity.py`` (scores base, experts, trained models and the linear and svd proxies of
every mixture and vertex through ``results/pareto-fidelity/<space>/scores.jsonl``, which is also the cache; ``--small``
runs on the small test world, whose ``dmo world build --small --ground-truth 3d,4d`` it needs). Writes
``benchmarks/results/pareto_fidelity.json`` (``--json`` elsewhere) and prints the README's table (``--markdown``
prints it again from a JSON file).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dmo.analysis.pareto import EXPERT_MIX, FIGURES, PROXY, REGRESSION, Objectives, front_fidelity_table
from dmo.errors import DmoError
from dmo.mixture import Mixture
from dmo.paths import results_dir
from dmo.results import ResultsTable
from dmo.scoring.base import ScoringContext, make_scorer

ROOT = Path(__file__).resolve().parent.parent
# --------------------------------------------------------------------------------------------- fixed before the runs
SPACES = ("3d", "4d")
N_BOOT = 1000
BOOT_SEED = 0
LINEAR = "linear"
#: where the best calibrated objective is read from, and the key
PROXY_FIDELITY = ROOT / "benchmarks" / "results" / "proxy_fidelity.json"
PRIMARY = "hypervolume_ratio"
BASELINES = (EXPERT_MIX, REGRESSION)
# ----------------------------------------------------------------------------------------------------------------


def _proxy_fidelity_module() -> Any:
    spec = importlib.util.spec_from_file_location("proxy_fidelity", ROOT / "benchmarks" / "proxy_fidelity.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["proxy_fidelity"] = mod
    spec.loader.exec_module(mod)
    return mod


def best_calibrated() -> tuple[str, str]:
    """(calibration, proxy option) of proxy_fidelity's best calibrated objective, e.g. ("residual", "svd")."""
    doc = json.loads(PROXY_FIDELITY.read_text())
    method, _, option = doc["decision"]["winner"].partition(":")
    return method, option


def frame_with_vertices(pf: Any, space: Any, sc: Any) -> pd.DataFrame:
    """proxy_fidelity's joined table plus each option's proxies at the vertices (the calibrations' anchors)."""
    df = pf.joined_frame(space, sc)
    rows = []
    for opt, mat in sc.vertex.items():
        for i in range(len(space.domains)):
            m = Mixture(tuple(space.domains), tuple(np.eye(len(space.domains))[i]))
            for bi, b in enumerate(space.benchmarks):
                rows.append({"kind": "proxy", "group": space.group, "mixture": m.id, "method": opt, "seed": None,
                             "benchmark": b, "score": mat[i, bi], "status": "ok",
                             **{f"w_{x}": w for x, w in m.as_dict().items()}})  # fmt: skip
    extra = pd.DataFrame(rows)
    extra["seed"] = extra["seed"].astype("Int64")
    out = pd.concat([df, extra[np.isfinite(extra["score"].astype(float))]], ignore_index=True)
    return out


def paired(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """Per figure, the paired difference a - b over the same resamples: its median, 95% CI and the verdict."""
    out = {}
    for j, fig in enumerate(FIGURES):
        d = a[:, j] - b[:, j]
        d = d[np.isfinite(d)]
        lo, hi = np.percentile(d, [2.5, 97.5]) if len(d) >= 10 else (math.nan, math.nan)
        verdict = "beats" if lo > 0 else "loses" if hi < 0 else "level"
        out[fig] = {"median": float(np.median(d)) if len(d) else math.nan, "lo": float(lo), "hi": float(hi),
                    "verdict": verdict}  # fmt: skip
    return out


def analyse(frame: pd.DataFrame, benchmarks: list[str], calibration: tuple[str, str], n_boot: int) -> dict[str, Any]:
    objectives = Objectives.each(benchmarks)
    lin = front_fidelity_table(frame, objectives, n_boot=n_boot, seed=BOOT_SEED, method=LINEAR)
    method, option = calibration
    cal = front_fidelity_table(frame, objectives, n_boot=n_boot, seed=BOOT_SEED, calibration=method, method=option)
    cal_source = f"calibrated ({method})"
    rows = [r for r in lin.table.to_dict("records")]
    cal_rows = [dict(r, source=f"calibrated ({method}:{option})") for r in cal.table.to_dict("records")
                if r["source"] == cal_source]  # fmt: skip
    rows = rows[:1] + cal_rows + rows[1:]
    group = str(lin.table["group"].iloc[0]) if len(lin.table) else ""
    boot = {s: lin.boot[(group, LINEAR, s)] for s in (PROXY, *BASELINES) if (group, LINEAR, s) in lin.boot}
    if (group, option, cal_source) in cal.boot:
        boot[f"calibrated ({method}:{option})"] = cal.boot[(group, option, cal_source)]
    comparisons = {
        f"{a} - {b}": paired(boot[a], boot[b]) for a in boot if a not in BASELINES for b in BASELINES if b in boot
    }
    return {"rows": rows, "paired": comparisons}


def render_markdown(doc: dict[str, Any]) -> str:
    """The README's table: one row per (space, front), the three figures with their CIs."""

    def cell(r: dict[str, Any], fig: str) -> str:
        x, lo, hi = r[fig], r[f"{fig}_lo"], r[f"{fig}_hi"]
        if x is None or (isinstance(x, float) and math.isnan(x)):
            return "-"
        if lo is None or (isinstance(lo, float) and math.isnan(lo)):
            return f"{x:.2f}"
        return f"{x:.2f} [{lo:.2f}, {hi:.2f}]"

    head = ["space", "front of", "picks / trained front", "precision [95% CI]", "recall [95% CI]",
            "hypervolume ratio [95% CI]"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, sp in doc["spaces"].items():
        for r in sp["rows"]:
            lines.append(f"| {name} | {r['source']} | {r['picks']} / {r['front']} | "
                         + " | ".join(cell(r, f) for f in FIGURES) + " |")  # fmt: skip
    lines += ["", "| space | paired difference (hypervolume ratio) | median [95% CI] | verdict |", "|---|---|---|---|"]
    for name, sp in doc["spaces"].items():
        for pair, figs in sp["paired"].items():
            f = figs[PRIMARY]
            if f["lo"] is None:
                lines.append(f"| {name} | {pair} | - | {f['verdict']} |")
                continue
            lines.append(f"| {name} | {pair} | {f['median']:+.3f} [{f['lo']:+.3f}, {f['hi']:+.3f}] | {f['verdict']} |")
    lines += ["", f"verdict: {doc['verdict']}"]
    return "\n".join(lines)


def verdict(doc: dict[str, Any]) -> str:
    """The rule: the linear proxy's front beats the free baselines only if it beats both on the hypervolume ratio
    in every space."""
    wins = [
        sp["paired"].get(f"{PROXY} - {b}", {}).get(PRIMARY, {}).get("verdict") == "beats"
        for sp in doc["spaces"].values()
        for b in BASELINES
    ]
    if wins and all(wins):
        return "the linear proxy's front beats the free baselines (expert mix and regression) in every space"
    return "the linear proxy's front does not beat the free baselines (expert mix and regression) in every space"


def _plain(x: Any) -> Any:
    """NaN as null, numpy scalars as Python numbers: strict JSON."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return None if math.isnan(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spaces", default=",".join(SPACES))
    ap.add_argument("--small", action="store_true", help="the small test world (proves the script, not the verdict)")
    ap.add_argument("--n-boot", type=int, default=N_BOOT)
    ap.add_argument("--json", type=Path, default=None, help="default: benchmarks/results/pareto_fidelity.json")
    ap.add_argument("--markdown", type=Path, default=None, help="only print the README table of this JSON file")
    args = ap.parse_args(argv)
    if args.markdown is not None:
        print(render_markdown(json.loads(args.markdown.read_text())))
        return 0
    from dmo.tinyworld.build import World, default_root
    from dmo.tinyworld.config import WorldConfig

    pf = _proxy_fidelity_module()
    t_start = time.perf_counter()
    config = WorldConfig.small() if args.small else WorldConfig()
    world = World(default_root(config), config)
    if not (world.base_dir / "config.json").exists():
        raise DmoError(f"no tiny world in {world.root}: run 'dmo world build --ground-truth 3d,4d' first")
    spaces = [pf.load_space_def(s.strip(), world) for s in args.spaces.split(",") if s.strip()]
    calibration = best_calibrated()
    opts = [pf.Option(LINEAR, LINEAR, family="linear")]
    if calibration[1] != LINEAR:
        opts.append(pf.Option(calibration[1], calibration[1]))
    manifest = pf.manifest_for(world, spaces, None)
    scorer = make_scorer("hf", ScoringContext(manifest, include_path=world.root / "tasks", device="cpu"))
    out_dir = results_dir() / ("pareto-fidelity-small" if args.small else "pareto-fidelity")
    doc: dict[str, Any] = {
        "issue": 25,
        "world": {"key": config.key(), "small": args.small, "root": str(world.root)},
        "fixed_before_runs": {
            "objectives": "every benchmark of the space",
            "fronts": [
                "linear proxy",
                f"calibrated {calibration[0]}:{calibration[1]} (proxy_fidelity's winner)",
                "expert mix",
                "regression (leave-one-out)",
                "seed ceiling",
            ],
            "reference_point": "per objective the worst trained score minus 10% of the range",
            "n_boot": args.n_boot,
            "boot_seed": BOOT_SEED,
            "verdict_rule": "beats: the 95% CI of the paired difference over the same seed resamples lies above 0; "
            "the proxy's front beats the free baselines only if it beats expert mix and regression on the "
            "hypervolume ratio in every space",
        },
        "machine": {"cpus": os.cpu_count()},
        "spaces": {},
    }
    for space in spaces:
        t0 = time.perf_counter()
        table = ResultsTable(out_dir / space.group / "scores.jsonl")
        print(f"scoring {space.group}: {len(opts)} proxy options x {len(space.mixtures)} mixtures + vertices",
              file=sys.stderr)  # fmt: skip
        sc = pf.score_space(space, scorer, table, opts)
        t_score = time.perf_counter() - t0
        frame = frame_with_vertices(pf, space, sc)
        result = analyse(frame, space.benchmarks, calibration, args.n_boot)
        doc["spaces"][space.name] = {
            "mixtures": len(space.mixtures),
            "benchmarks": space.benchmarks,
            **result,
            "seconds": {"scoring": t_score, "analysis": time.perf_counter() - t0 - t_score},
        }
    doc["verdict"] = verdict(doc)
    doc["wall_seconds"] = time.perf_counter() - t_start
    out = args.json or ROOT / "benchmarks" / "results" / "pareto_fidelity.json"
    out.write_text(json.dumps(_plain(doc), indent=2) + "\n")
    print(render_markdown(doc))
    print(f"wrote {out} in {doc['wall_seconds']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DmoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
