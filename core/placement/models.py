"""What `moetier plan` is asked about: a checkpoint folder (only config.json, the index and the
safetensors headers are read), a GGUF file (its header), a config.json, or a zoo version name (the
published dimensions each family module carries for its versions, so a plan needs no download)."""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import CheckpointError, LayoutError
from ..family import identify, read_config
from ..layout import MoELayout
from .model_parts import ModelParts, parts_from_checkpoint, parts_from_config

PUBLISHED_KEY = "published"  # ModelFamily.extras key: {version: config.json dict of the released model}


@dataclass(frozen=True)
class ModelInfo:
    config: Mapping
    layout: MoELayout
    parts: ModelParts
    source: str  # "checkpoint DIR", "config FILE", "published dimensions of VERSION"


def published_configs(registry) -> dict[str, Mapping]:
    """version -> config dict, over every registered family that publishes its versions' dimensions."""
    out = {}
    for fam in registry.families.values():
        for version, config in dict(fam.extras.get(PUBLISHED_KEY) or {}).items():
            out[version] = config
    return out


def resolve_model(model: str, registry) -> ModelInfo:
    """The model `model` names (see the module docstring); LayoutError listing the known versions when
    it is neither a path nor a version."""
    if os.path.isdir(model):
        config = read_config(model)
        family, version = identify(config, registry.families.values())
        layout = family.layout(config, version)
        from ..checkpoint import Checkpoint

        try:
            with Checkpoint(model) as ckpt:
                return ModelInfo(config, layout, parts_from_checkpoint(ckpt, config, layout), f"checkpoint {model}")
        except CheckpointError as exc:  # no weights here (yet): size the parts from the config
            return ModelInfo(config, layout, parts_from_config(config, layout),
                             f"config of {model} (weights not read: {str(exc).split(':')[-1].strip()})")
    if model.endswith(".json") or os.path.isfile(model):
        from ..checkpoint.gguf import is_gguf

        if is_gguf(model):
            return gguf_model(model, registry)
        config = read_config(model)
        family, version = identify(config, registry.families.values())
        layout = family.layout(config, version)
        return ModelInfo(config, layout, parts_from_config(config, layout), f"config {model}")
    known = published_configs(registry)
    match = known.get(model) or next((c for v, c in known.items() if v.lower() == model.lower()), None)
    if match is None:
        raise LayoutError(f"{model!r} is not a checkpoint folder, a config.json or a known model version; "
                          f"versions with published dimensions: {', '.join(sorted(known))}")
    family, version = identify(match, registry.families.values())
    layout = family.layout(match, version)
    return ModelInfo(match, layout, parts_from_config(match, layout), f"published dimensions of {version}")


def gguf_model(path: str, registry) -> ModelInfo:
    """A GGUF file: its metadata as the config; each MoE layer's experts in the type the file stores them
    in (the layout's quantization); the other parts as `moetier.load` holds them, read out of the file's
    types into the model's dtype (routers fp32), so sized from the config, not from the file."""
    from ..checkpoint.gguf import GGUFFile, verify_gguf
    from .sizes import format_size

    with GGUFFile(path) as gf:
        config = gf.model_config()
        layout = gf.layout(registry)
        verify_gguf(gf, layout)
        stored = gf.other_bytes()
    parts = parts_from_config(config, layout)
    note = (f"GGUF: the non-expert parts held in {layout.dtype} as moetier.load reads them (the file stores them "
            f"in {format_size(stored)})")
    return ModelInfo(config, layout, dataclasses.replace(parts, source="GGUF metadata",
                                                         assumptions=parts.assumptions + (note,)), f"GGUF file {path}")
