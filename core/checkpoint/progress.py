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
    """Whether a bar is drawn: the explicit choice, else the environment, else "stderr is a TTY"."""
    if enabled is not None:
        return bool(enabled)
    if os.environ.get("MOETIER_PROGRESS", "").strip().lower() in _OFF:
        return False
    return sys.stderr.isatty()


class ProgressBar:
    """A transient bar advanced by hand (`advance()`); a no-op when disabled. Use as a context manager."""

    def __init__(self, total: int | None, description: str = "reading", enabled: bool | None = None):
        self.count = 0
        self._bar = self._task = None
        if progress_enabled(enabled):
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
                                 transient=True)
            self._bar.start()
            self._task = self._bar.add_task(description, total=total)

    @property
    def drawn(self) -> bool:
        return self._bar is not None

    def advance(self, n: int = 1) -> None:
        self.count += n
        if self._bar is not None:
            self._bar.advance(self._task, n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track(items: Iterable[T], *, total: int | None = None, description: str = "reading",
          enabled: bool | None = None) -> Iterator[T]:
    """Yield `items` one by one, advancing a bar after each (items are never read ahead)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    with ProgressBar(total, description, enabled) as bar:
        for item in items:
            yield item
            bar.advance()


class TrackedExperts:
    """An ExpertSource that advances a bar per expert read from the source it wraps:

        with TrackedExperts(source, total=len(ids), description=f"layer {i}") as src:
            backend.prepare(spec, src, ids, fmt)
    """

    def __init__(self, source, total: int | None, description: str = "experts", enabled: bool | None = None):
        self.source = source
        self.bar = ProgressBar(total, description, enabled)

    def expert(self, expert_id: int):
        t = self.source.expert(expert_id)
        self.bar.advance()
        return t

    def __enter__(self) -> TrackedExperts:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
