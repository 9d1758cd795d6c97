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


def identify(config: dict, families) -> tuple[ModelFamily, str]:
    """The one family (and the version it names) that claims `config`; LayoutError if none or several do."""
    from .errors import LayoutError

    claims = []
    for fam in families:
        version = fam.match(config)
        if version is not None:
            claims.append((fam, version))
    what = f"model_type {config.get('model_type')!r}, architectures {config.get('architectures')!r}"
    tc = config.get("text_config")
    if isinstance(tc, dict):
        what += f", text_config.model_type {tc.get('model_type')!r}"
    if not claims:
        names = ", ".join(sorted(f.name for f in families)) or "none"
        raise LayoutError(f"no model family claims this config ({what}); registered families: {names}")
    if len(claims) > 1:
        raise LayoutError(f"several families claim this config ({what}): "
                          + ", ".join(f"{f.name} as {v}" for f, v in claims))
    return claims[0]


def load_layout(config_or_dir, registry=None):
    """The MoELayout of a checkpoint directory (its config.json) or of a config dict, via the registry's families."""
    import json
    import os

    from .errors import LayoutError

    config = config_or_dir
    if not isinstance(config, dict):
        path = os.path.join(config_or_dir, "config.json") if os.path.isdir(config_or_dir) else config_or_dir
        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise LayoutError(f"cannot read the model config {path}: {exc}") from None
    if registry is None:
        from .plugins import get_registry
        registry = get_registry()
    family, _ = identify(config, registry.families.values())
    return family.layout(config)
