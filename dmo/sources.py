"""Named sources of experts: ``experts: NAME`` in a space, instead of a manifest file.

A source is a function from the space to :class:`ExpertSet` (the manifest, and lmms-eval task folders that come with
it). The embedded tiny world registers ``tinyworld`` and ``tinyworld-small`` (entry points ``dmo.expert_sources`` in
``pyproject.toml``), so the core never imports it; other packages can add sources the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dmo.plugins import PluginRegistry

if TYPE_CHECKING:
    from dmo.config import SearchSpace
    from dmo.manifest import ExpertManifest

__all__ = ["SOURCES", "ExpertSet", "is_source_name", "resolve_source"]


@dataclass
class ExpertSet:
    manifest: ExpertManifest
    #: lmms-eval task folder that scores these experts' benchmarks (the tiny world's), if any
    tasks: Path | None = None


SOURCES = PluginRegistry("dmo.expert_sources", "expert source")


def is_source_name(text: str) -> bool:
    """Whether a space's ``experts:`` value names a source rather than a manifest file."""
    return text in SOURCES.names()


def resolve_source(name: str, space: SearchSpace) -> ExpertSet:
    source: Callable[[SearchSpace], ExpertSet] = SOURCES.get(name)
    return source(space)
