"""What a model-family plugin registers: which checkpoints it claims and how it turns their config into
an MoELayout; and finding the family of a config."""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import LayoutError


@dataclass(frozen=True)
class ModelFamily:
    """name: "deepseek"; versions: the model versions it claims ("DeepSeek-V3", ...);
    match(config) -> the version it claims the config as, or None; layout(config, version) -> MoELayout
    for a config `match` claimed as `version`; tiny(version, out_dir, **options) writes a small random
    checkpoint in the real on-disk layout."""

    name: str
    versions: tuple[str, ...]
    match: Callable[[Mapping], str | None]
    layout: Callable[[Mapping, str], Any]
    tiny: Callable[..., Any] | None = None
    description: str = ""
    extras: dict = field(default_factory=dict, hash=False, compare=False)


def identify(config: Mapping, families) -> tuple[ModelFamily, str]:
    """The one family (and the version it names) that claims `config`; LayoutError if none or several do."""
    if not isinstance(config, Mapping):
        raise LayoutError(f"a model config must be a JSON object, got a {type(config).__name__}")
    claims = []
    for fam in families:
        try:
            version = fam.match(config)
        except (TypeError, AttributeError, ValueError, KeyError) as exc:
            # A key of the wrong type (e.g. "architectures": 5) is the config's fault, not the family's.
            raise LayoutError(f"the model config has a malformed key ({type(exc).__name__}: {exc}); "
                              f"family {fam.name!r} cannot read it") from None
        if version is not None:
            claims.append((fam, version))
    what = f"model_type {config.get('model_type')!r}, architectures {config.get('architectures')!r}"
    tc = config.get("text_config")
    if isinstance(tc, Mapping):
        what += f", text_config.model_type {tc.get('model_type')!r}"
    if not claims:
        names = ", ".join(sorted(f.name for f in families)) or "none"
        raise LayoutError(f"no model family claims this config ({what}); registered families: {names}")
    if len(claims) > 1:
        raise LayoutError(f"several families claim this config ({what}): "
                          + ", ".join(f"{f.name} as {v}" for f, v in claims))
    return claims[0]


def read_config(path: str | os.PathLike) -> dict:
    """The config.json of a checkpoint folder (or the config.json named), checked to be a JSON object."""
    path = os.fspath(path)
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    try:
        with open(file, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        raise LayoutError(f"{file}: no such file; name a checkpoint folder with a config.json, "
                          "or the config.json itself") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LayoutError(f"cannot read the model config {file}: {exc}") from None
    if not isinstance(config, dict):
        raise LayoutError(f"{file} must hold a JSON object, got a JSON {type(config).__name__}")
    return config


def load_layout(config_or_dir, registry=None):
    """The MoELayout of a checkpoint folder, its config.json, or a config dict, via the registry's families."""
    config = config_or_dir if isinstance(config_or_dir, Mapping) else read_config(config_or_dir)
    if registry is None:
        from .plugins import get_registry
        registry = get_registry()
    family, version = identify(config, registry.families.values())
    return family.layout(config, version)
