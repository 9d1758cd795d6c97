"""Checking the cost model on this machine: decode through real MoE layers of the model's shape.

`measure_moe_decode` builds `layers` random MoE layers with the plan's expert shape, format and CPU
backend (routers in fp32 from the layout's RouterSpec, random weights drawn as the kernel benchmark
draws them), then runs decode steps: every step passes the hidden state through as many MoE layers as the
model has, cycling over the built ones (each layer's weights leave the caches before it comes round
again: several layers' experts are streamed in between), route -> backend forward -> next hidden state.
The median time per MoE layer is what the cost model's MoE-layer decode time predicts.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from ..errors import SettingError
from ..experts import ExpertBackend
from ..layout import MoELayout
from .plan import PlacementPlan


@dataclass(frozen=True)
class DecodeCheck:
    layers_built: int
    steps: int
    batch: int
    seconds_per_layer: float  # median over steps of (step time / MoE layers per step)
    seconds_per_layer_p10: float
    seconds_per_layer_p90: float


def measure_moe_decode(plan: PlacementPlan, layout: MoELayout, backend: ExpertBackend, *, layers: int = 4,
                       steps: int = 20, batch: int = 1, seed: int = 0) -> DecodeCheck:
    from ..bench.workload import random_weights
    from ..runtime.routing import route

    cpu_shards = {(s.backend, s.fmt) for i in plan.moe_layers for s in plan.shards(i)}
    if len(cpu_shards) != 1 or next(iter(cpu_shards))[0] != backend.name:
        raise SettingError("the decode check runs plans whose experts all live on one CPU backend and format; "
                           f"this plan has {', '.join(f'{b}/{f}' for b, f in sorted(cpu_shards))}")
    fmt = next(iter(cpu_shards))[1]
    m = layout.moe_layers[0]
    spec = m.experts
    layers = max(1, min(layers, len(layout.moe_layers)))
    g = torch.Generator().manual_seed(seed)
    built = []
    for j in range(layers):
        weights = random_weights(spec, fmt, seed + 101 * j)
        prepared = backend.prepare(spec, weights, range(spec.num_experts), fmt)
        del weights
        gate = torch.randn(spec.num_experts, spec.hidden_size, generator=g) / spec.hidden_size ** 0.5
        bias = torch.randn(spec.num_experts, generator=g) * 0.01 if m.router.selection_bias else None
        logit_bias = torch.zeros(spec.num_experts) if m.router.logit_bias else None
        built.append((prepared, gate, bias, logit_bias))
    n_moe = len(layout.moe_layers)
    x = torch.randn(batch, spec.hidden_size, generator=g)
    times = []
    for step in range(steps + 2):  # two warm-up steps
        t0 = time.perf_counter()
        for k in range(n_moe):
            prepared, gate, bias, logit_bias = built[k % layers]
            ids, w = route(m.router, x, gate, bias, logit_bias)
            out = backend.forward(prepared, x, ids, w)
            x = out * (spec.hidden_size ** 0.5 / out.norm(dim=1, keepdim=True).clamp_min(1e-6))
        if step >= 2:
            times.append((time.perf_counter() - t0) / n_moe)
    times.sort()
    return DecodeCheck(layers, steps, batch, statistics.median(times), times[len(times) // 10],
                       times[min(len(times) - 1, (len(times) * 9) // 10)])
