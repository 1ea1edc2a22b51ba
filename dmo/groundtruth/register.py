"""Registering finished LLaMA-Factory runs: experts into their manifest, trained mixtures into its ``trained:`` list."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from dmo.atomic import file_lock, write_text
from dmo.errors import DmoError
from dmo.groundtruth.runs import Run, RunFolder

# ------------------------------------------------------------------------------------------------ registration


def _rel(path: Path, start: Path) -> str:
    """A path relative to ``start`` that a manifest reads as a local path (``./x`` or ``../x``)."""
    rel = os.path.relpath(path, start)
    return rel if rel.startswith(("../", "/")) else f"./{rel}"


def _weights_key(weights: Mapping[str, float]) -> tuple[tuple[str, float], ...]:
    return tuple(sorted((d, round(float(w), 6)) for d, w in weights.items() if round(float(w), 6) > 0))


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with file_lock(path.with_name(f".{path.name}.lock")):
        yield


def register(folder: RunFolder, echo: Callable[[str], None] = print) -> dict[Path, list[str]]:
    """Write every finished run of the folder into its manifest(s); returns {manifest: registered run names}.

    Experts go into every manifest of the folder, trained mixtures into their own. A manifest is written only once
    it has an expert for every domain its trained mixtures use, so that it always loads.
    """
    plan = folder.plan()
    recipe = plan["recipe"]
    runs = folder.runs()
    experts = [r for r in runs.values() if r.kind == "expert" and folder.finished(r)]
    out: dict[Path, list[str]] = {}
    for manifest in sorted({Path(r.manifest) for r in runs.values()}):
        trained = [r for r in runs.values() if r.kind == "trained" and Path(r.manifest) == manifest]
        trained = [r for r in trained if folder.finished(r)]
        if not experts and not trained:
            continue
        names = _update_manifest(manifest, plan.get("name") or folder.root.name, recipe, experts, trained, folder, echo)
        if names:
            out[manifest] = names
    return out


def _update_manifest(
    path: Path,
    name: str,
    recipe: Mapping[str, Any],
    experts: Sequence[Run],
    trained: Sequence[Run],
    folder: RunFolder,
    echo: Callable[[str], None],
) -> list[str]:
    root = path.parent.resolve()
    base = recipe["base"]
    base_text = _rel(Path(base), root) if Path(base).is_absolute() else base
    with _file_lock(path):
        data: dict[str, Any] = {}
        if path.is_file():
            try:
                data = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as exc:
                raise DmoError(f"{path}: not valid YAML ({exc}); fix or remove it before registering runs") from None
            old_base = data.get("base")
            same = old_base == base_text or (
                isinstance(old_base, str) and Path(base).is_absolute() and (root / old_base).resolve() == Path(base)
            )
            if old_base is not None and not same:
                raise DmoError(
                    f"{path} is the manifest of base {old_base!r}, not {base}: pass another --manifest for these runs"
                )
            for key, value in (("kind", recipe["method"]), ("budget", recipe["budget"])):
                if data.get(key) not in (None, value):
                    raise DmoError(
                        f"{path} has {key} {data.get(key)!r}, but these runs have {value!r}: use another --manifest"
                    )
        entries = dict(data.get("experts") or {})
        for r in experts:
            entries[r.domain] = _rel(folder.root / r.output, root)
        held = [r for r in trained if any(d not in entries for d in _weights_key_domains(r.weights))]
        for r in held:
            echo(
                f"{r.name}: not registered in {path} yet: it has no expert for every domain of {r.mixture} "
                "(registered once they are)"
            )
        if not entries:
            return []
        listed = list(data.get("trained") or [])
        index = {(_weights_key(t.get("mixture") or {}), int(t.get("seed", 0))): i for i, t in enumerate(listed)}
        for r in trained:
            if r in held:
                continue
            entry = {
                "mixture": {d: w for d, w in r.weights.items() if w > 0},
                "seed": r.seed,
                "path": _rel(folder.root / r.output, root),
            }
            slot = (_weights_key(r.weights), r.seed)
            if slot in index:
                listed[index[slot]] = entry
            else:
                index[slot] = len(listed)
                listed.append(entry)
        new = {
            "name": data.get("name") or name,
            "base": base_text,
            "kind": recipe["method"],
            "budget": recipe["budget"],
            **{k: v for k, v in data.items() if k not in ("name", "base", "kind", "budget", "experts", "trained")},
            "experts": dict(sorted(entries.items())),
            "trained": listed,
        }
        if new != data:
            header = "# Written by 'dmo train': experts and models trained on mixtures (paths relative to this file).\n"
            write_text(path, header + yaml.safe_dump(new, sort_keys=False))
    return [r.name for r in experts] + [r.name for r in trained if r not in held]


def _weights_key_domains(weights: Mapping[str, float]) -> list[str]:
    return [d for d, _ in _weights_key(weights)]
