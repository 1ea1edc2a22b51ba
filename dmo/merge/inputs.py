"""Per-expert input files of merge methods (Fisher weights): where they are, and an identity for fingerprints.

Computing them is :mod:`dmo.groundtruth.fisher_weights` (``dmo fisher``); merging only reads them.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from dmo.errors import DmoError

__all__ = ["FISHER_FILE", "default_fisher_file", "fisher_file", "fisher_paths", "inputs_id", "method_inputs"]

#: The file name of an expert's Fisher weights (inside a LoRA adapter's folder; in ``fisher/`` of a full checkpoint).
FISHER_FILE = "fisher.safetensors"


def default_fisher_file(expert_folder: str | os.PathLike[str]) -> Path:
    """Where ``dmo fisher`` puts an expert's weights when the manifest names no ``fisher:`` path."""
    folder = Path(expert_folder)
    if (folder / "adapter_config.json").is_file():
        return folder / FISHER_FILE
    return folder / "fisher" / FISHER_FILE


def fisher_file(manifest: Any, domain: str) -> Path:
    """The Fisher file of one expert of a loaded manifest: its ``fisher:`` path, else the default location."""
    ref = manifest.experts[domain]
    if ref.fisher is not None:
        return Path(ref.fisher)
    if ref.path is None:
        raise DmoError(
            f"expert {domain!r} of manifest {manifest.name!r} is the hub id {ref}: download it, point the manifest at "
            "the folder and run 'dmo fisher'"
        )
    return default_fisher_file(ref.path)


def fisher_paths(
    manifest: Any, domains: Iterable[str], manifest_file: str | os.PathLike[str] | None = None
) -> dict[str, Path]:
    """Each expert's Fisher file (see :func:`fisher_file`); one that does not exist is refused in one line."""
    out = {}
    for d in domains:
        path = fisher_file(manifest, d)
        if not path.exists():
            where = manifest_file or f"<manifest {manifest.name}>"
            raise DmoError(
                f"expert {d!r} has no Fisher weights ({path} does not exist): run 'dmo fisher --experts {where} "
                f"--data <its data folder>' first"
            )
        out[d] = path
    return out


def method_inputs(
    manifest: Any, domains: Iterable[str], method: str, manifest_file: str | os.PathLike[str] | None = None
) -> dict[str, dict[str, Path]]:
    """The per-expert input files a merge method needs (``{"fisher": {expert: file}}``), from the manifest."""
    from dmo.merge.registry import get_method

    spec = get_method(method)
    unknown = [k for k in spec.extra if k != "fisher"]
    if unknown:
        raise DmoError(f"merge method {spec.name!r} needs per-expert {unknown[0]} inputs, which manifests cannot name")
    if not spec.extra:
        return {}
    return {"fisher": {d: str(p) for d, p in fisher_paths(manifest, domains, manifest_file).items()}}  # type: ignore[misc]


def inputs_id(inputs: Mapping[str, Mapping[str, str | os.PathLike[str]]]) -> str:
    """A cheap identity of per-expert input files (names, sizes, mtimes), for proxy fingerprints; '' for none."""
    if not inputs:
        return ""
    h = hashlib.sha256()
    for key in sorted(inputs):
        for expert in sorted(inputs[key]):
            path = Path(inputs[key][expert])
            files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
            for f in files:
                st = f.stat()
                h.update(f"{key}:{expert}:{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]
