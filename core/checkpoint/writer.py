"""Writing safetensors checkpoints: one file, or shards with a `model.safetensors.index.json`.

Used by tests and by the tiny-checkpoint generator; `matrices.matrix_tensors` turns a QuantizedTensor
into the tensors of its on-disk convention first.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import CheckpointError
from .reader import CONFIG_FILE, INDEX_FILE, SINGLE_FILE


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> Path:
    """Write `tensors` to one safetensors file (metadata format=pt, as transformers writes it)."""
    path = Path(path)
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{path}: value of {name!r} is {type(t).__name__}, not a torch.Tensor")
    meta = {"format": "pt", **(metadata or {})}
    out, seen = {}, set()
    for k, v in tensors.items():
        v = v.contiguous()
        ptr = v.untyped_storage().data_ptr()
        # safetensors refuses tensors that share storage (tied weights, views of one fused tensor).
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    save_file(out, str(path), metadata=meta)
    return path


def shard_plan(tensors: Mapping[str, torch.Tensor], max_shard_bytes: int | None) -> list[list[str]]:
    """Tensor names per shard, in the given order: a shard closes before it would pass `max_shard_bytes`
    (a tensor larger than that gets a shard of its own)."""
    if max_shard_bytes is not None and max_shard_bytes < 1:
        raise CheckpointError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if max_shard_bytes is not None and shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def write_checkpoint(directory: str | os.PathLike, tensors: Mapping[str, torch.Tensor], *,
                     max_shard_bytes: int | None = None, config: Mapping | None = None) -> Path:
    """Write `tensors` as an HF-style checkpoint into `directory` and return the file readers open first.

    One shard: `model.safetensors`. Several: `model-0000i-of-0000n.safetensors` plus
    `model.safetensors.index.json` ({"metadata": {"total_size"}, "weight_map": {name: shard}}).
    `config`, when given, is written as `config.json`. A stale single file or index from an earlier
    write is removed so that readers cannot pick it up instead."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if not tensors:
        raise CheckpointError(f"{directory}: refusing to write a checkpoint with no tensors")
    if config is not None:
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    plan = shard_plan(tensors, max_shard_bytes)
    if len(plan) == 1:
        (directory / INDEX_FILE).unlink(missing_ok=True)
        return write_safetensors(directory / SINGLE_FILE, tensors)
    (directory / SINGLE_FILE).unlink(missing_ok=True)
    weight_map: dict[str, str] = {}
    total = 0
    for i, names in enumerate(plan, start=1):
        fname = f"model-{i:05d}-of-{len(plan):05d}.safetensors"
        write_safetensors(directory / fname, {n: tensors[n] for n in names})
        for n in names:
            weight_map[n] = fname
            total += tensors[n].numel() * tensors[n].element_size()
    index = directory / INDEX_FILE
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                                indent=2) + "\n", encoding="utf-8")
    return index
