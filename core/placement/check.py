"""Checking the cost model on this machine: decode through real MoE layers of the model's shape.

`build_layers` builds `layers` random MoE layers with the plan's expert shape, format and CPU
backend (routers in fp32 from the layout's RouterSpec, random weights drawn as the kernel benchmark
draws them), then runs decode steps: every step passes the hidden state through as many MoE layers as the
model has, cycling over the built ones (each layer's weights leave the caches before it comes round
again: several layers' experts are streamed in between), route -> backend forward -> next hidden state.
The median time per MoE layer is what the cost model's MoE-layer decode time predicts.

`check_decode` alternates measurements of the CPU's speeds (the bench probes) with decode rounds, and
predicts each round from the probes just before and after it: on a shared machine the speed a probe sees
and the speed the kernels get move together from minute to minute, so each round compares like with
like, and the median over rounds is the answer. `same_cpus(threads)` keeps the whole check (the
backend's workers, created inside it, and the probes) on the same `threads` CPUs, so a core another
process holds slows the probe and the kernels alike.
"""
from __future__ import annotations

import os
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..errors import SettingError
from ..experts import ExpertBackend
from ..layout import MoELayout
from .plan import PlacementPlan


@dataclass(frozen=True)
class DecodeRound:
    read_gb_per_s: float
    predicted_s: float  # per MoE layer
    measured_s: float  # per MoE layer: the median over the round's layers
    mean_s: float  # per MoE layer: the mean, preemptions by other processes included

    @property
    def error(self) -> float:
        return (self.predicted_s - self.measured_s) / self.measured_s


@contextmanager
def same_cpus(threads: int) -> Iterator[tuple[int, ...]]:
    """Run the block on the first `threads` CPUs this process may use (Linux numbers physical cores
    before their SMT siblings); threads started inside inherit it, and a backend created inside pins its
    workers within it. Restores the affinity afterwards."""
    if not hasattr(os, "sched_getaffinity"):
        yield ()
        return
    before = os.sched_getaffinity(0)
    cpus = tuple(sorted(before)[:threads])
    os.sched_setaffinity(0, cpus)
    try:
        yield cpus
    finally:
        os.sched_setaffinity(0, before)


def build_layers(plan: PlacementPlan, layout: MoELayout, backend: ExpertBackend, layers: int, seed: int = 0):
    """`layers` random MoE layers of the model's first MoE layer's shape, prepared on `backend` in the
    plan's (single) CPU format, each with fp32 router tensors."""
    from ..bench.workload import random_weights

    cpu_shards = {(s.backend, s.fmt) for i in plan.moe_layers for s in plan.shards(i)}
    if any(t.kind == "accelerator" for t in plan.tiers if plan.expert_count(t.name)):
        raise SettingError("the decode check runs CPU-only plans (--gpu-mem 0): this machine computes no "
                           "accelerator experts")
    if len(cpu_shards) != 1 or next(iter(cpu_shards))[0] != backend.name:
        raise SettingError("the decode check runs plans whose experts all live on one CPU backend and format; "
                           f"this plan has {', '.join(f'{b}/{f}' for b, f in sorted(cpu_shards))}")
    fmt = next(iter(cpu_shards))[1]
    m = layout.moe_layers[0]
    spec = m.experts
    layers = max(1, min(layers, len(layout.moe_layers)))
    g = torch.Generator().manual_seed(seed + 7)
    built = []
    for j in range(layers):
        weights = random_weights(spec, fmt, seed + 101 * j)
        prepared = backend.prepare(spec, weights, range(spec.num_experts), fmt)
        del weights
        gate = torch.randn(spec.num_experts, spec.hidden_size, generator=g) / spec.hidden_size ** 0.5
        bias = torch.randn(spec.num_experts, generator=g) * 0.01 if m.router.selection_bias else None
        logit_bias = torch.zeros(spec.num_experts) if m.router.logit_bias else None
        built.append((prepared, gate, bias, logit_bias))
    return built


def run_decode(built, layout: MoELayout, backend: ExpertBackend, *, steps: int, batch: int = 1,
               seed: int = 0) -> list[float]:
    """Seconds of every MoE layer of `steps` decode steps (after two warm-up steps), each timed alone:
    their median is the layer's cost without the preemptions a shared machine adds now and then (the
    probes' best pass leaves those out too)."""
    from ..runtime.routing import route

    m = layout.moe_layers[0]
    spec = m.experts
    layers = len(built)
    n_moe = len(layout.moe_layers)
    x = torch.randn(batch, spec.hidden_size, generator=torch.Generator().manual_seed(seed))
    times = []
    for step in range(steps + 2):
        for k in range(n_moe):
            prepared, gate, bias, logit_bias = built[k % layers]
            t0 = time.perf_counter()
            ids, w = route(m.router, x, gate, bias, logit_bias)
            out = backend.forward(prepared, x, ids, w)
            x = out * (spec.hidden_size ** 0.5 / out.norm(dim=1, keepdim=True).clamp_min(1e-6))
            if step >= 2:
                times.append(time.perf_counter() - t0)
    return times


def check_decode(plan: PlacementPlan, parts, backend: ExpertBackend, inventory, *, stats=None, layers: int = 4,
                 rounds: int = 5, steps: int = 10, batch: int = 1, seed: int = 0, speeds=None,
                 progress=None) -> list[DecodeRound]:
    """Rounds of (decode, probe the CPU's speeds), each predicted from the probes around it (see the module
    docstring), or from `speeds` when given (e.g. a bench file's). The plan's experts must all live on CPU
    tiers computed by `backend`."""
    from .cost import predict
    from .speeds import Speeds, TierSpeed, measured_cpu

    layout = parts.layout
    built = build_layers(plan, layout, backend, layers, seed)
    cpu_tiers = [t.name for t in plan.tiers if t.kind == "cpu"] or list(plan.tier_names)
    out = []
    speed = None if speeds is not None else measured_cpu(inventory, backend.threads)
    for r in range(rounds):
        if progress:
            progress(f"round {r + 1} of {rounds}: decoding")
        times = run_decode(built, layout, backend, steps=steps, batch=batch, seed=seed + r)
        measured, mean = statistics.median(times), statistics.fmean(times)
        if speeds is not None:
            predicted = predict(plan, parts, speeds, stats, batch=batch).decode_moe_s / len(plan.moe_layers)
            out.append(DecodeRound(speeds.of(cpu_tiers[0]).read_for(plan.shards(plan.moe_layers[0])[0].fmt),
                                   predicted, measured, mean))
            continue
        if progress:
            progress(f"round {r + 1} of {rounds}: probing the CPU")
        after = measured_cpu(inventory, backend.threads)
        # the probes just before and just after this round's decode, averaged
        probed = TierSpeed((speed.read_gb_per_s + after.read_gb_per_s) / 2,
                         (speed.bf16_gflop_per_s + after.bf16_gflop_per_s) / 2,
                         (speed.int8_gop_per_s + after.int8_gop_per_s) / 2, after.source)
        predicted = predict(plan, parts, Speeds({t: probed for t in cpu_tiers}), stats,
                            batch=batch).decode_moe_s / len(plan.moe_layers)
        out.append(DecodeRound(probed.read_gb_per_s, predicted, measured, mean))
        speed = after
    return out
