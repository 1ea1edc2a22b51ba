"""What a scoring backend reads from an expert manifest: local folders (hub models fetched into the hub cache first,
:meth:`dmo.manifest.ModelRef.local`), and cheap identities for them."""

from __future__ import annotations

import hashlib
from pathlib import Path

from dmo.errors import DmoError
from dmo.manifest import ExpertManifest
from dmo.mixture import Mixture
from dmo.scoring.base import Target


def local_base(manifest: ExpertManifest) -> Path:
    return manifest.base.local("base model")


def trained_path(manifest: ExpertManifest, target: Target) -> Path:
    """The folder of the model trained on ``target``'s mixture with ``target``'s seed."""
    assert target.mixture is not None
    want = Mixture.from_mapping(target.mixture.as_dict(), manifest.domains).id
    for mixture, seed, ref in manifest.trained_mixtures():
        if seed == target.seed and mixture.id == want:
            return ref.local(f"trained model of {mixture.id} seed {seed}")
    raise DmoError(f"no trained model for mixture {target.mixture.id} seed {target.seed} in the manifest")


def folder_id(path: Path | None) -> str:
    """A cheap identity for a model or adapter folder: the names, sizes and mtimes of its weight files."""
    if path is None:
        return "?"
    h = hashlib.sha256()
    for f in sorted(Path(path).glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]
