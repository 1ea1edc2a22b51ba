"""Runs and run folders: what one LLaMA-Factory training is, and where its files live (see
:mod:`dmo.groundtruth.llamafactory` for the folder layout).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from dmo.atomic import file_lock, write_text
from dmo.errors import DmoError
from dmo.groundtruth.data_mix import MixRecord
from dmo.groundtruth.recipe import LORA_FILES, PLAN, Recipe
from dmo.paths import safe_name

# ------------------------------------------------------------------------------------------------ runs and plans


@dataclass
class Run:
    """One training: an expert (one domain) or a model trained on a mixture, with one seed."""

    name: str
    kind: Literal["expert", "trained"]
    mixture: str  # canonical mixture id (an expert's is ``<domain>-1``)
    weights: dict[str, float]
    seed: int
    strategy: str
    data: dict[str, Any]  # the LLaMA-Factory dataset keys (dataset, mix_strategy, interleave_probs)
    output: str  # relative to the run folder
    manifest: str  # absolute path of the manifest it is registered in
    domain: str | None = None

    @property
    def config(self) -> str:
        return f"configs/{self.name}.yaml"

    @property
    def partial(self) -> str:
        return f".partial/{self.name}"

    @property
    def log(self) -> str:
        return f"logs/{self.name}.log"


def expert_run(domain: str, record: MixRecord, manifest: Path, seed: int) -> Run:
    return Run(
        name=f"expert-{domain}",
        kind="expert",
        mixture=record.mixture,
        weights=record.weights,
        seed=seed,
        strategy="exact",
        data=dict(record.llamafactory),
        output=f"experts/{domain}",
        manifest=str(manifest),
        domain=domain,
    )


def mixture_run(record: MixRecord, manifest: Path, seed: int) -> Run:
    suffix = "" if record.strategy == "exact" else f"-{record.strategy}"
    name = f"{record.mixture}{suffix}.seed{seed}"
    return Run(
        name=safe_name(name, "run name"),
        kind="trained",
        mixture=record.mixture,
        weights=record.weights,
        seed=seed,
        strategy=record.strategy,
        data=dict(record.llamafactory),
        output=f"mixtures{suffix}/{record.mixture}/seed{seed}",
        manifest=str(manifest),
    )


class RunFolder:
    """A run folder (see the module docstring); ``plan.json`` is read-modify-written under a lock."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        with file_lock(self.root / ".dmo-train.lock"):
            yield

    def plan(self) -> dict[str, Any]:
        path = self.root / PLAN
        if not path.is_file():
            raise DmoError(
                f"{self.root} is not a dmo run folder (no {PLAN}): plan runs with 'dmo train experts|mixtures'"
            )
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DmoError(f"corrupt {path}: {exc}") from None

    def runs(self) -> dict[str, Run]:
        return {name: Run(**r) for name, r in self.plan().get("runs", {}).items()}

    def recipe_header(self) -> dict[str, Any]:
        return self.plan()["recipe"]

    def check_compatible(self, recipe: Recipe) -> None:
        if not (self.root / PLAN).is_file():
            return
        old = self.recipe_header()
        new = recipe.header()
        diff = [k for k in new if old.get(k) != new[k]]
        if diff:
            k = diff[0]
            raise DmoError(
                f"run folder {self.root} was planned with {k} {old.get(k)!r}, not {new[k]!r}: use another --out "
                "(experts and mixtures compared with each other must share one recipe)"
            )

    def add(self, recipe: Recipe, runs: Sequence[Run], configs: Mapping[str, dict[str, Any]], name: str) -> None:
        """Write the runs' configs, then merge them into plan.json (the plan last: it is what marks them planned)."""
        for run in runs:
            write_text(self.root / run.config, yaml.safe_dump(configs[run.name], sort_keys=False))
        plan: dict[str, Any] = (
            self.plan() if (self.root / PLAN).is_file() else {"version": 1, "recipe": recipe.header(), "runs": {}}
        )
        plan["name"] = name
        for run in runs:
            plan["runs"][run.name] = asdict(run)
        write_text(self.root / PLAN, json.dumps(plan, indent=2) + "\n")

    def finished(self, run: Run) -> bool:
        return is_complete(self.root / run.output, self.recipe_header()["method"])

    def config_of(self, run: Run) -> dict[str, Any]:
        return yaml.safe_load((self.root / run.config).read_text())


def is_complete(folder: Path, method: str) -> bool:
    if method == "lora":
        return all((folder / f).is_file() for f in LORA_FILES)
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))
