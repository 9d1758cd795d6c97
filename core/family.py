"""What a model-family plugin registers: which checkpoints it claims and how it turns their config into
an MoELayout."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelFamily:
    """name: "deepseek"; versions: the model versions it claims ("DeepSeek-V3", ...);
    match(config) -> the version it claims the config as, or None; layout(config) -> MoELayout;
    tiny(version, out_dir, **options) writes a small random checkpoint in the real on-disk layout."""

    name: str
    versions: tuple[str, ...]
    match: Callable[[dict], str | None]
    layout: Callable[[dict], Any]
    tiny: Callable[..., Any] | None = None
    description: str = ""
    extras: dict = field(default_factory=dict, hash=False, compare=False)
