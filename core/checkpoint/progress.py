"""A progress bar for long checkpoint reads: rich on stderr, silent unless stderr is a terminal.

`MOETIER_PROGRESS=0` (or `enabled=False`) silences it; `enabled=True` forces it on.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

_OFF = ("0", "off", "false", "no")


def progress_enabled(enabled: bool | None = None) -> bool:
    """Whether `track` draws a bar: the explicit choice, else the environment, else "stderr is a TTY"."""
    if enabled is not None:
        return bool(enabled)
    if os.environ.get("MOETIER_PROGRESS", "").strip().lower() in _OFF:
        return False
    return sys.stderr.isatty()


def track(items: Iterable[T], *, total: int | None = None, description: str = "reading",
          enabled: bool | None = None) -> Iterator[T]:
    """Yield `items` one by one, advancing a transient bar after each (items are never buffered)."""
    if not progress_enabled(enabled):
        yield from items
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    if total is None and hasattr(items, "__len__"):
        total = len(items)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)
