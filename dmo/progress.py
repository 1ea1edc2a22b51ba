"""The one progress bar every long dmo job shows (rich): description, bar, done/total, elapsed, extra fields."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

__all__ = ["progress_bar"]


def progress_bar(
    *fields: str,
    description: str = "[bold]{task.description}",
    console: Console | None = None,
    enabled: bool = True,
    transient: bool = False,
) -> Progress:
    """A rich ``Progress``; ``fields`` are extra text columns after the elapsed time, e.g. ``"{task.fields[best]}"``."""
    columns = [TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    columns += [TextColumn(f) for f in fields]
    return Progress(*columns, console=console, disable=not enabled, transient=transient)
