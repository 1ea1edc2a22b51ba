"""Where dmo keeps things on disk, and how untrusted names become safe path components."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
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


@dataclass(frozen=True)
class SpaceFolder:
    """The layout of one space's results folder, ``results/<space>/``: the one place that names its files."""

    root: Path

    @classmethod
    def for_space(cls, space_name: str, results: Path | None = None) -> SpaceFolder:
        return cls((results or results_dir()) / safe_name(space_name, "space name"))

    @classmethod
    def of(cls, path: Path) -> SpaceFolder:
        """The folder of a path a user gave: the results folder itself or its scores table."""
        path = Path(path)
        return cls(path.parent if path.suffix == ".jsonl" else path)

    @property
    def scores(self) -> Path:
        return self.root / "scores.jsonl"

    @property
    def study_db(self) -> Path:
        return self.root / "study.db"

    @property
    def study_url(self) -> str:
        return f"sqlite:///{self.study_db.resolve()}"

    @property
    def item_order(self) -> Path:
        """Each benchmark's fixed, seeded order of its items (dmo.scoring.items)."""
        return self.root / "item_order.json"

    @property
    def items(self) -> Path:
        """Per-item scores, one row per model, benchmark and scoring call (dmo.scoring.items)."""
        return self.root / "items.jsonl"

    @property
    def claims(self) -> Path:
        return self.root / ".claims"

    @property
    def report(self) -> Path:
        return self.root / "report.html"


def scores_path(path: Path) -> Path:
    """The scores table a user means by ``path``: a results folder or a ``.jsonl`` file itself."""
    path = Path(path)
    return path / "scores.jsonl" if path.is_dir() or path.suffix != ".jsonl" else path
