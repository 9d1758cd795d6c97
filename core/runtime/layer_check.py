"""`moetier zoo run`: every MoE layer of a checkpoint through the chosen backend, checked against the
float64 reference on the same weights, with the time each step took.

It is the end-to-end check of the pieces a model run is made of: family layout -> checkpoint reader ->
router -> backend prepare/forward -> shared expert, one layer at a time (peak memory: one layer).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..checkpoint import Checkpoint
from ..conformance.tolerances import tolerance
from ..experts import ExpertBackend
from ..family import load_layout
from .moe_block import MoEBlock
from ..reference import oracle


@dataclass(frozen=True)
class LayerResult:
    layer: int
    experts: int
    fmt: str
    prepare_s: float
    forward_s: float
    rel_error: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.rel_error <= self.tolerance


def run_checkpoint(path: str, backend: ExpertBackend, *, tokens: int = 16, fmt: str | None = None,
                   seed: int = 0, registry=None, progress: bool | None = None) -> list[LayerResult]:
    """Run `tokens` random hidden states through each MoE layer of the checkpoint at `path`."""
    layout = load_layout(path, registry)
    ref_backend = oracle()
    g = torch.Generator().manual_seed(seed)
    results = []
    with Checkpoint(path) as ckpt:
        for m in layout.moe_layers:
            t0 = time.perf_counter()
            block = MoEBlock.from_checkpoint(ckpt, layout, m.index, backend, fmt=fmt, progress=progress)
            prepare_s = time.perf_counter() - t0
            ref = MoEBlock.from_checkpoint(ckpt, layout, m.index, ref_backend, fmt=block.prepared.fmt.name,
                                           progress=False)
            results.append(check_block(m.index, block, ref, torch.randn(tokens, layout.hidden_size, generator=g),
                                       prepare_s))
            del block, ref
    return results


def check_block(index: int, block: MoEBlock, ref: MoEBlock, hidden: torch.Tensor, prepare_s: float) -> LayerResult:
    """Layer `index` on `hidden`: the block's routed experts against `ref` (the same layer prepared on the
    float64 oracle), both routed by the block's router, plus the shared expert."""
    used = block.prepared.fmt.name
    ids, weights = block.route(hidden)
    t0 = time.perf_counter()
    out = block.routed(hidden, ids, weights)
    forward_s = time.perf_counter() - t0
    shared = block.shared(hidden)
    want = ref.routed(hidden, ids, weights).to(torch.float64)
    if shared is not None:
        out, want = out + shared, want + shared.to(torch.float64)
    rel = float((out.to(torch.float64) - want).norm() / want.norm().clamp_min(1e-30))
    return LayerResult(index, len(block.prepared.expert_ids), used, prepare_s, forward_s, rel, tolerance(used))
