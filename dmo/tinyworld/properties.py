"""Does a world's ground truth make a test bed? The properties of issue 22, from its accuracy tables alone.

Everything here reads the ``accuracy`` document of ``world.json`` (base, experts, and per space the trained
mixtures with each training seed's scores): no proxy, no merged model. Pure functions, so a test can check the
verdicts on hand-made tables.

Per ground-truth space (the domains of the space are its benchmarks):

* ``moves[d]``: benchmark ``d`` moves across the trained mixtures (max - min of the seed mean) by at least
  ``MIN_RANGE`` and by at least ``RANGE_OVER_NOISE`` x the mean absolute difference between training seeds;
* ``seed_rho[d]``: the training seeds rank the mixtures alike on ``d`` (Spearman, the lowest over seed pairs);
* ``unsaturated``: the best trained mixture stays below ``MAX_BEST`` on every benchmark;
* ``trade_offs``: at least half the benchmark pairs have a negative Spearman rho across the mixtures;
* ``distinct_bests``: the per-benchmark best mixtures are not all the same mixture.

For the world (its experts, over the spaces' benchmarks):

* ``expert_gain[d]``: the expert of ``d`` beats the base on ``d`` by at least ``MIN_EXPERT_GAIN``;
* ``interaction``: some expert scores above the base on another domain's benchmark and some below, each by more
  than that benchmark's seed noise (its mean absolute seed difference over the trained mixtures).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from dmo.calibration import spearman
from dmo.errors import DmoError

MIN_RANGE = 0.15
RANGE_OVER_NOISE = 5.0
MIN_SEED_RHO = 0.8
MIN_EXPERT_GAIN = 0.2
MAX_BEST = 0.95
MIN_NEGATIVE_PAIRS = 0.5


@dataclass(frozen=True)
class Check:
    """One property's verdict: where (a space, or ``world``), which property, pass or fail, and its figure."""

    where: str
    name: str
    passed: bool
    figure: str

    def line(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'}  {self.where:<5} {self.name:<22} {self.figure}"


@dataclass(frozen=True)
class SpaceTable:
    """A space's trained mixtures: ``scores[m, s, b]`` = mixture ``m``'s accuracy on benchmark ``b``, seed ``s``."""

    mixtures: list[str]
    benchmarks: list[str]
    scores: np.ndarray

    @property
    def mean(self) -> np.ndarray:
        return self.scores.mean(axis=1)

    def seed_noise(self) -> np.ndarray:
        """Per benchmark: the mean absolute difference of two seeds of one mixture, over mixtures and seed pairs."""
        s = self.scores.shape[1]
        gaps = [np.abs(self.scores[:, i] - self.scores[:, j]) for i, j in itertools.combinations(range(s), 2)]
        return np.mean(gaps, axis=(0, 1))


def space_table(rows: Sequence[Mapping], benchmarks: Sequence[str]) -> SpaceTable:
    """The table of a space from ``world.json``'s rows (``{"id", "seeds": {seed: {benchmark: accuracy}}}``)."""
    if len(rows) < 3:
        raise DmoError(f"a space needs at least 3 trained mixtures to judge, got {len(rows)}")
    seeds = sorted(rows[0]["seeds"], key=int)
    if len(seeds) < 2 or any(sorted(r["seeds"], key=int) != seeds for r in rows):
        raise DmoError("every trained mixture needs the same two or more training seeds (n_seeds >= 2)")
    scores = np.array([[[r["seeds"][s][b] for b in benchmarks] for s in seeds] for r in rows], dtype=float)
    return SpaceTable([r["id"] for r in rows], list(benchmarks), scores)


def check_space(space: str, table: SpaceTable) -> list[Check]:
    """The per-space properties of one ground-truth space."""
    checks = []
    mean, noise = table.mean, table.seed_noise()
    for b, name in enumerate(table.benchmarks):
        spread = float(np.ptp(mean[:, b]))
        ok = bool(spread >= MIN_RANGE and spread >= RANGE_OVER_NOISE * noise[b])  # a plain bool: JSON-ready
        checks.append(
            Check(
                space,
                f"moves[{name}]",
                ok,
                f"range {spread:.3f} (need >= {MIN_RANGE} and >= {RANGE_OVER_NOISE:g} x seed diff {noise[b]:.3f})",
            )
        )
    n_seeds = table.scores.shape[1]
    for b, name in enumerate(table.benchmarks):
        rhos = [
            spearman(table.scores[:, i, b], table.scores[:, j, b]) for i, j in itertools.combinations(range(n_seeds), 2)
        ]
        worst = min(rhos, key=lambda r: -math.inf if math.isnan(r) else r)
        ok = not math.isnan(worst) and worst >= MIN_SEED_RHO
        checks.append(Check(space, f"seed_rho[{name}]", ok, f"rho {worst:+.3f} (need >= {MIN_SEED_RHO:+.1f})"))
    best = mean.max(axis=0)
    top = int(np.argmax(best))
    checks.append(
        Check(
            space,
            "unsaturated",
            bool(best.max() < MAX_BEST),
            f"best mixture {best[top]:.3f} on {table.benchmarks[top]} (need < {MAX_BEST})",
        )
    )
    pairs = list(itertools.combinations(range(len(table.benchmarks)), 2))
    rhos = [spearman(mean[:, i], mean[:, j]) for i, j in pairs]
    negative = sum(1 for r in rhos if r < 0)
    checks.append(
        Check(
            space,
            "trade_offs",
            bool(pairs) and negative >= MIN_NEGATIVE_PAIRS * len(pairs),
            f"{negative}/{len(pairs)} benchmark pairs negative (rho "
            + ", ".join(f"{r:+.2f}" for r in rhos)
            + f"; need >= {MIN_NEGATIVE_PAIRS:.0%})",
        )
    )
    # Ties: a benchmark's best is the set of mixtures at its maximum; all the same only if one mixture is in every set.
    best_sets = [set(np.flatnonzero(mean[:, b] == best[b])) for b in range(len(table.benchmarks))]
    shared = set.intersection(*best_sets)
    names = {table.benchmarks[b]: table.mixtures[min(best_sets[b])] for b in range(len(table.benchmarks))}
    checks.append(
        Check(
            space,
            "distinct_bests",
            not shared,
            f"{len({min(s) for s in best_sets})} distinct best mixtures: "
            + ", ".join(f"{k} {v}" for k, v in names.items()),
        )
    )
    return checks


def check_world(accuracy: Mapping, spaces: Sequence[str]) -> list[Check]:
    """Every property of a world's ``accuracy`` tables (``world.json``), over the given ground-truth spaces."""
    trained = accuracy.get("trained", {})
    missing = [s for s in spaces if not trained.get(s)]
    if missing:
        raise DmoError(
            f"the world has no trained mixtures for space(s) {missing}: build them with "
            f"`dmo world build --ground-truth {','.join(spaces)}`"
        )
    base, experts = accuracy["base"], accuracy["experts"]
    checks: list[Check] = []
    noise: dict[str, list[float]] = {}
    for space in spaces:
        rows = trained[space]
        benchmarks = sorted(rows[0]["mixture"])
        table = space_table(rows, benchmarks)
        checks += check_space(space, table)
        for b, n in zip(benchmarks, table.seed_noise()):
            noise.setdefault(b, []).append(float(n))
    benchmarks = sorted(noise)
    seed_noise = {b: float(np.mean(v)) for b, v in noise.items()}
    for d in benchmarks:
        gain = experts[d][d] - base[d]
        checks.append(
            Check(
                "world",
                f"expert_gain[{d}]",
                gain >= MIN_EXPERT_GAIN,
                f"expert {experts[d][d]:.3f} - base {base[d]:.3f} = {gain:+.3f} (need >= {MIN_EXPERT_GAIN})",
            )
        )
    # Off-diagonal effects in units of the benchmark's seed noise.
    effects = [
        (e, b, experts[e][b] - base[b], seed_noise[b])
        for e in benchmarks
        for b in benchmarks
        if e != b and e in experts
    ]
    up = max(effects, key=lambda t: t[2] - t[3], default=None)
    down = min(effects, key=lambda t: t[2] + t[3], default=None)
    helps = up is not None and up[2] > up[3]
    hurts = down is not None and down[2] < -down[3]

    def _say(t: tuple | None) -> str:
        return "none" if t is None else f"{t[0]} expert on {t[1]} {t[2]:+.3f} (seed noise {t[3]:.3f})"

    checks.append(
        Check("world", "interaction", helps and hurts, f"most above base: {_say(up)}; most below: {_say(down)}")
    )
    return checks
