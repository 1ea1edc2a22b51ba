"""Where dmo keeps things on disk, and how untrusted names become safe path components."""

from __future__ import annotations

import os
import re
from pathlib import Path

from dmo.errors import DmoError

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]{0,127}$")


def safe_name(name: str, what: str = "name") -> str:
    """Return ``name`` if it can be used as a single path component, else raise.

    Names of studies, experts and mixtures end up as folder names; a name such as ``../x`` must never
    escape the folder it is meant for.
    """
    if not _SAFE_NAME.match(name) or ".." in name:
        raise DmoError(
            f"invalid {what} {name!r}: use letters, digits and . _ + = - only "
            "(no slashes, no '..', at most 128 characters)"
        )
    return name


def cache_dir() -> Path:
    """Root of dmo's cache: ``$DMO_CACHE``, else ``$XDG_CACHE_HOME/dmo``, else ``~/.cache/dmo``."""
    if env := os.environ.get("DMO_CACHE"):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "dmo"


def results_dir() -> Path:
    """Root of study outputs: ``$DMO_RESULTS`` or ``./results``."""
    return Path(os.environ.get("DMO_RESULTS", "results"))
