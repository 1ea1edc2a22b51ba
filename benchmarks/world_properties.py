"""Is the tiny world a test bed where every benchmark moves? Issue 22's properties of its ground truth.

Reads a built world's ``world.json`` (base, experts, trained mixtures with every training seed: the ground truth,
no proxy) and prints one PASS/FAIL line per property with its figure, per space (3d and 4d by default) and for the
world's experts; the thresholds and their meaning are in ``dmo.tinyworld.properties``. Exits 1 if any property fails.

Run: ``python benchmarks/world_properties.py`` (the default world, built with ``dmo world build --ground-truth
2d,3d,4d``), ``--world v6`` for format 6 (issue 22's candidate), ``--root PATH`` for a world built elsewhere,
``--build`` to build what is missing first, ``--json PATH`` to save the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from dmo.errors import DmoError
from dmo.tinyworld.build import World, build_world, default_root
from dmo.tinyworld.config import WorldConfig
from dmo.tinyworld.properties import check_world


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", default="current", help="current (the default, format 6), v6 (the same) or v5")
    parser.add_argument("--small", action="store_true", help="the small test configuration of that world")
    parser.add_argument("--root", type=Path, help="a built world's folder (default: the cache folder of its key)")
    parser.add_argument("--spaces", default="3d,4d", help="comma-separated ground-truth spaces to judge")
    parser.add_argument("--build", action="store_true", help="build whatever of the world is missing first")
    parser.add_argument("--json", type=Path, help="write the verdicts and figures here")
    args = parser.parse_args(argv)
    spaces = [s.strip() for s in args.spaces.split(",") if s.strip()]
    try:
        config = WorldConfig.named(args.world, small=args.small)
        root = args.root or default_root(config)
        if args.build:
            world = build_world(config, root=root, ground_truth=spaces, progress=False)
        else:
            world = World(root, config)
            if not world.info_path.exists():
                raise DmoError(f"no built world at {root}: pass --build, or run `dmo world build --ground-truth 3d,4d`")
        info = world.info()
        checks = check_world(info["accuracy"], spaces)
    except DmoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"tiny world {info['key']} at {world.root}")
    for check in checks:
        print(check.line())
    failed = sum(not c.passed for c in checks)
    print(f"{len(checks) - failed} PASS, {failed} FAIL")
    if args.json:
        doc = {"key": info["key"], "spaces": spaces, "checks": [asdict(c) for c in checks]}
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
