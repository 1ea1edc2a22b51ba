"""The tiny world as an expert source (``experts: tinyworld`` in a space), registered through an entry point."""

from __future__ import annotations

from dmo.config import SearchSpace
from dmo.manifest import load_manifest
from dmo.sources import ExpertSet
from dmo.tinyworld.config import WorldConfig

#: ``experts: tinyworld`` in a search space means the embedded tiny world (built on first use).
TINYWORLD = "tinyworld"
#: ``experts: tinyworld-small``: the small test configuration of the same world.
TINYWORLD_SMALL = "tinyworld-small"


def ground_truth_for(space: SearchSpace) -> tuple[str, ...]:
    """Which of the tiny world's ground-truth sets ("2d", "3d", "4d") a space's candidates come from."""
    src = space.mixtures
    if not isinstance(src, list) and src.preset is not None and src.preset.name.startswith("paper-"):
        return (src.preset.name.removeprefix("paper-"),)
    return ()


def world_experts(
    config: WorldConfig, space: SearchSpace, seeds: int | None = None, evaluate: bool = True
) -> ExpertSet:
    """What ``space`` needs of the world, built if missing: the base, its domains' experts, its ground truth
    (``seeds`` training seeds per mixture, default all) and the benchmarks' lmms-eval tasks; ``evaluate``: see
    :func:`~dmo.tinyworld.build.build_world`."""
    from dmo.scoring.tasks import write_tiny_tasks
    from dmo.tinyworld.build import build_world

    world = build_world(
        config, ground_truth=ground_truth_for(space), seeds=seeds, experts=space.domains, evaluate=evaluate
    )
    tasks = world.root / "tasks"
    if not tasks.is_dir():
        write_tiny_tasks(world.root / "data", tasks, list(config.domains), max_new_tokens=config.max_new_tokens)
    return ExpertSet(load_manifest(world.manifest_path), tasks)


def world_config(source: str) -> WorldConfig:
    """The configuration behind a source name (``tinyworld`` or ``tinyworld-small``)."""
    return WorldConfig.small() if source == TINYWORLD_SMALL else WorldConfig()


def tiny_world(space: SearchSpace) -> ExpertSet:
    return world_experts(WorldConfig(), space)


def tiny_world_small(space: SearchSpace) -> ExpertSet:
    return world_experts(WorldConfig.small(), space)
