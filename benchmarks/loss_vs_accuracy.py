"""Is a proxy's validation loss a better or worse stand-in for training than its benchmark accuracy? (issue 16, item 6)

On the tiny world's 2- or 3-domain ground truth (the DMO paper's mixtures, two training seeds each), every proxy,
trained model, expert and the base is scored through the normal cached path (``dmo.session``, the hf backend) on
each domain's benchmark (``dmo_tiny_<domain>``, greedy exact match on the test split) and on its validation loss
(``loss:<domain>``, the mean answer-token loss on the held-out validation split, as the score exp(-loss)). Then
``dmo.analysis.correlate`` (Spearman rho over mixtures, bootstrap 95% CI) is run three ways:

* proxy accuracy  -> trained accuracy  (what dmo does with benchmarks);
* proxy loss      -> trained accuracy  (the question: rank mixtures by the proxy's loss, judge by accuracy);
* proxy loss      -> trained loss      (does the proxy's loss rank like the trained models' loss?).

The seed column is the ceiling (two training seeds of the same mixtures against each other), per signal. Loss is
lower-is-better and exp(-loss) is a decreasing map of it, so a positive rho means "lower proxy loss, better trained
model". Scores land in ``results/loss-vs-accuracy-<space>/scores.jsonl``: a second run scores nothing.

Run: ``python benchmarks/loss_vs_accuracy.py --space 3d`` (``--json PATH`` to save the tables).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pandas as pd

from dmo.analysis.correlate import MEAN_RHO, MEAN_SCORE, correlate
from dmo.config import parse_space
from dmo.presets import preset
from dmo.scoring.base import Target
from dmo.session import Session

ACC, LOSS = "dmo_tiny_", "loss:"


def score_all(space_name: str) -> tuple[pd.DataFrame, list[str]]:
    domains = list(preset(f"paper-{space_name}")[0].domains)
    space = parse_space(
        {
            "name": f"loss-vs-accuracy-{space_name}",
            "domains": domains,
            "experts": "tinyworld",
            "mixtures": {"preset": f"paper-{space_name}"},
            "benchmarks": [f"{ACC}{d}" for d in domains] + [f"{LOSS}{d}" for d in domains],
            "scoring": {"backend": "hf", "device": "cpu"},
        }
    )
    session = Session.open("", space=space)
    proxies = [Target("proxy", mixture=m, method="linear") for m in space.candidates()]
    ids = {m.id for m in space.candidates()}  # trained models of the space's own mixtures: those pair with proxies
    refs = [t for t in session.references() if t.kind != "trained" or (t.mixture is not None and t.mixture.id in ids)]
    session.score([*refs, *proxies], "scoring")
    return session.table.frame(), domains


def _renamed(frame: pd.DataFrame, kind: str, old: str, new: str) -> pd.DataFrame:
    """Rows of ``kind`` with benchmark ``old<domain>`` relabelled ``new<domain>`` (the others of that kind dropped)."""
    part = frame[(frame["kind"] == kind) & frame["benchmark"].str.startswith(old)].copy()
    part["benchmark"] = new + part["benchmark"].str.removeprefix(old)
    return part


def comparisons(frame: pd.DataFrame, n_boot: int) -> dict[str, pd.DataFrame]:
    refs = frame[frame["kind"].isin(["expert", "base"])]
    acc_refs = refs[refs["benchmark"].str.startswith(ACC)]
    loss_refs = refs[refs["benchmark"].str.startswith(LOSS)]
    sets = {
        "proxy accuracy -> trained accuracy": [
            _renamed(frame, "proxy", ACC, ACC), _renamed(frame, "trained", ACC, ACC), acc_refs,
        ],
        "proxy loss -> trained accuracy": [
            _renamed(frame, "proxy", LOSS, ACC), _renamed(frame, "trained", ACC, ACC), acc_refs,
        ],
        "proxy loss -> trained loss": [
            _renamed(frame, "proxy", LOSS, LOSS), _renamed(frame, "trained", LOSS, LOSS), loss_refs,
        ],
    }  # fmt: skip
    return {name: correlate(pd.concat(parts), n_boot=n_boot) for name, parts in sets.items()}


def _fmt(row: pd.Series) -> str:
    v, lo, hi = row["spearman"], row["spearman_lo"], row["spearman_hi"]
    return "n/a" if not math.isfinite(v) else f"{v:+.2f} [{lo:+.2f}, {hi:+.2f}]"


def print_table(tables: dict[str, pd.DataFrame], domains: list[str], frame: pd.DataFrame) -> None:
    names = list(tables)
    print(f"| domain | n | {' | '.join(names)} | seed rho (acc / loss) |")
    print("|---|---|" + "---|" * len(names) + "---|")
    for d in [*domains, MEAN_SCORE, MEAN_RHO]:
        cells, n, seeds = [], "", []
        for name in names:
            t = tables[name]
            bench = (
                d if d in (MEAN_SCORE, MEAN_RHO) else (f"{LOSS}{d}" if name.endswith("trained loss") else f"{ACC}{d}")
            )
            hit = t[t["benchmark"] == bench]
            if hit.empty:
                cells.append("n/a")
                continue
            row = hit.iloc[0]
            n = str(int(row["n"]))
            cells.append(_fmt(row))
            if name != "proxy loss -> trained accuracy":
                seeds.append(f"{row['seed_spearman']:+.2f}" if math.isfinite(row["seed_spearman"]) else "n/a")
        print(f"| {d} | {n} | {' | '.join(cells)} | {' / '.join(seeds)} |")
    trained = frame[frame["kind"] == "trained"]
    spread = trained.groupby("benchmark")["score"].agg(["min", "max"])
    print()
    for b, r in spread.iterrows():
        if str(b).startswith(LOSS):
            print(f"trained {b}: loss {-math.log(r['max']):.4f} .. {-math.log(r['min']):.4f}")
        else:
            print(f"trained {b}: accuracy {r['min']:.3f} .. {r['max']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", choices=["2d", "3d"], default="3d")
    parser.add_argument("--boot", type=int, default=1000)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    frame, domains = score_all(args.space)
    tables = comparisons(frame, args.boot)
    print(f"tiny world, paper-{args.space} mixtures, hf backend; Spearman rho over mixtures [bootstrap 95% CI]\n")
    print_table(tables, domains, frame)
    if args.json:
        doc = {name: json.loads(t.to_json(orient="records")) for name, t in tables.items()}
        args.json.write_text(json.dumps({"space": args.space, "tables": doc}, indent=2) + "\n")


if __name__ == "__main__":
    main()
