"""Registries of interchangeable parts that live outside the core (scoring backends, expert sources).

A part is named in the package metadata (an entry point of ``group``, declared in ``pyproject.toml``; other packages
can add their own) or registered in-process with :meth:`PluginRegistry.register`. Names are listed without importing
anything, so help texts and validation come from the registry while heavy stacks load only when a part is used.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from dmo.errors import DmoError

__all__ = ["PluginRegistry"]


@functools.lru_cache(maxsize=16)
def _scan(group: str, search_path: tuple[str, ...]) -> dict[str, EntryPoint]:
    # Reading every installed distribution's metadata takes ~0.1 s and a study asks a registry many times; the
    # answer changes only when sys.path does (a package installed into a folder already on it in this very process
    # is not seen: restart).
    del search_path  # the cache key: entry_points() reads the distributions found on sys.path
    return {ep.name: ep for ep in entry_points(group=group)}


class PluginRegistry:
    def __init__(self, group: str, what: str) -> None:
        self.group = group
        self.what = what
        self._registered: dict[str, Any] = {}

    def _entry_points(self) -> dict[str, Any]:
        return _scan(self.group, tuple(sys.path))

    def names(self) -> list[str]:
        return sorted({*self._entry_points(), *self._registered})

    def register(self, name: str) -> Callable[[Any], Any]:
        def deco(obj: Any) -> Any:
            self._registered[name] = obj
            return obj

        return deco

    def get(self, name: str) -> Any:
        if name in self._registered:
            return self._registered[name]
        ep = self._entry_points().get(name)
        if ep is None:
            known = self.names()
            hint = (
                f"choose one of {', '.join(known)}"
                if known
                else "none is installed: reinstall dmo (pip install -e .) so that its entry points are registered"
            )
            raise DmoError(f"unknown {self.what} {name!r}: {hint}")
        return ep.load()
