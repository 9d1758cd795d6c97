"""`moetier bench runtime`: what the tiered runtime costs and what the disk tier delivers.

1. Overhead of the tiered layer: the Qwen3-30B-A3B layer at decode, all experts in one shard (one kernel
   call) against the same experts split into two CPU shards (two calls, validation once, an fp32 sum),
   timed alternately so both see the same machine.
2. Decode with half of the experts on disk: a checkpoint with the Qwen3-30B-A3B layer dimensions (FP8
   experts, as Qwen3-30B-A3B-FP8 ships them, to halve the file) and a router per layer; every MoE layer
   runs per token, its input the previous layer's output; half of each layer's experts stay in the file,
   read through a DRAM cache of a given share of their bytes (the page cache is dropped for what the disk
   tier reads, so a miss is a real read). Against the same run with every expert in DRAM.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..checkpoint import matrix_tensors, write_checkpoint
from ..checkpoint.experts import read_router
from ..experts import ExpertBackend, ExpertLayerSpec
from ..runtime.loader import ShardSpec, load_experts
from ..runtime.routing import route
from ..runtime.tiered import Shard, TieredExperts
from .measure import DECODE_PLAN, QUICK_DECODE_PLAN, time_calls
from .workload import qwen3_30b, random_matrix, random_routing, random_weights


@dataclasses.dataclass(frozen=True)
class OverheadResult:
    backend: str
    fmt: str
    batch: int
    threads: int
    single_s: float  # median seconds per forward, one shard
    tiered_s: float  # median seconds per forward, two shards
    rounds: int

    @property
    def overhead(self) -> float:
        return self.tiered_s / self.single_s - 1


def tiered_overhead(backend: ExpertBackend, *, fmt: str = "bf16", batch: int = 1, seed: int = 0, rounds: int = 3,
                    quick: bool = False, status: Callable[[str], None] = lambda s: None) -> OverheadResult:
    layer = qwen3_30b().layer
    status(f"tiered overhead: random {fmt} weights for the Qwen3-30B-A3B layer")
    weights = random_weights(layer, fmt, seed)
    E = layer.num_experts
    status("tiered overhead: packing one shard of all experts and two shards of half")
    single = backend.prepare(layer, weights, range(E), fmt)
    halves = [backend.prepare(layer, weights, range(r, E, 2), fmt) for r in (0, 1)]
    del weights
    tiered = TieredExperts(0, layer, [Shard(backend, p, {e: "cpu:numa0" for e in p.expert_ids}) for p in halves])
    routings = random_routing(layer, batch, 64, seed + 1)
    hidden = torch.randn(batch, layer.hidden_size, generator=torch.Generator().manual_seed(seed + 2))
    r0 = routings[0]
    a, b = backend.forward(single, hidden, r0.topk_ids, r0.topk_weights), tiered(hidden, r0.topk_ids, r0.topk_weights)
    rel = float((a - b).norm() / a.norm())
    if rel > 1e-5:
        raise AssertionError(f"two shards disagree with one by {rel:.2e}")
    plan = QUICK_DECODE_PLAN if quick else DECODE_PLAN
    single_t, tiered_t = [], []
    for r in range(rounds):  # alternate, so a noisy minute hits both
        status(f"tiered overhead: round {r + 1}/{rounds}")
        single_t += time_calls(lambda i: backend.forward(single, hidden, routings[i % 64].topk_ids,
                                                          routings[i % 64].topk_weights), plan)
        tiered_t += time_calls(lambda i: tiered(hidden, routings[i % 64].topk_ids, routings[i % 64].topk_weights), plan)
    return OverheadResult(backend.name, fmt, batch, backend.threads or 0, statistics.median(single_t),
                          statistics.median(tiered_t), rounds)


# ---- the disk tier -----------------------------------------------------------------------------------

def write_decode_checkpoint(folder: Path, layers: int, seed: int = 0,
                            status: Callable[[str], None] = lambda s: None) -> ExpertLayerSpec:
    """A Qwen3-MoE checkpoint holding only what the routed experts need (routers and FP8 experts) with the
    Qwen3-30B-A3B layer dimensions; written shard by shard, a layer at a time."""
    layer = qwen3_30b().layer
    H, I, E = layer.hidden_size, layer.intermediate_size, layer.num_experts
    g = torch.Generator().manual_seed(seed)
    config = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": H,
              "num_hidden_layers": layers, "moe_intermediate_size": I, "intermediate_size": 6144,
              "num_experts": E, "num_experts_per_tok": layer.top_k, "norm_topk_prob": True,
              "decoder_sparse_step": 1, "mlp_only_layers": [], "torch_dtype": "bfloat16",
              "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}}
    tensors = {}
    for i in range(layers):
        status(f"writing the disk-tier checkpoint: layer {i + 1}/{layers}")
        p = f"model.layers.{i}.mlp"
        # A router with some skew, as trained ones have: a few experts' rows are larger.
        router = torch.randn(E, H, generator=g) / H ** 0.5 * (1 + torch.rand(E, 1, generator=g))
        tensors[f"{p}.gate.weight"] = router.to(torch.bfloat16)
        for e in range(E):
            for proj, (o, n) in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
                tensors.update(matrix_tensors(f"{p}.experts.{e}.{proj}", random_matrix(o, n, "fp8_e4m3", g)))
    write_checkpoint(folder, tensors, config=config, max_shard_bytes=2 << 30)
    return layer


@dataclasses.dataclass(frozen=True)
class DiskDecodeResult:
    layers: int
    tokens: int
    cache_share: float  # DRAM cache budget / bytes of the experts left on disk
    dram_tok_s: float
    disk_tok_s: float
    bytes_read_per_token: float
    hit_rate: float
    waits: int
    misses: int
    prefetch_precision: float


def _decode(experts, routers, layout, tokens: int, seed: int) -> float:
    """Seconds per token: every MoE layer per token, each fed the previous one's output."""
    g = torch.Generator().manual_seed(seed)
    H = layout.hidden_size
    times = []
    for _ in range(tokens):
        x = torch.randn(1, H, generator=g)
        t0 = time.perf_counter()
        for m in layout.moe_layers:
            r = routers[m.index]
            ids, w = route(m.router, x, r.weight)
            x = x + experts[m.index](x, ids, w)
            x = x / x.norm() * H ** 0.5  # keep the scale a normed residual stream has
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def disk_decode(folder: Path, backend: str, *, layers: int, tokens: int, cache_share: float, registry, inventory,
                seed: int = 0, status: Callable[[str], None] = lambda s: None) -> DiskDecodeResult:
    from ..checkpoint import Checkpoint
    from ..family import load_layout

    layout = load_layout(folder, registry)
    fmt = "fp8_e4m3"
    with Checkpoint(folder) as ckpt:
        routers = {m.index: read_router(ckpt, m) for m in layout.moe_layers}

    class HalfOnDisk:
        def shards(self, i):
            E = layout.layer(i).experts.num_experts
            return (ShardSpec("cpu:numa0", backend, fmt, tuple(range(0, E, 2))),
                    ShardSpec("disk", backend, fmt, tuple(range(1, E, 2))))

    status("disk tier: every expert in DRAM")
    with load_experts(folder, fmt=fmt, registry=registry, inventory=inventory) as dram:
        _decode(dram, routers, layout, 2, seed)  # warm
        dram_s = _decode(dram, routers, layout, tokens, seed)
    E = layout.moe_layers[0].experts.num_experts
    disk_bytes = layers * (E // 2) * layout.moe_layers[0].experts.expert_bytes(fmt)
    status("disk tier: half of the experts on disk")
    with load_experts(folder, plan=HalfOnDisk(), registry=registry, inventory=inventory,
                      cache_bytes=int(cache_share * disk_bytes)) as tiered:
        disk_s = _decode(tiered, routers, layout, tokens, seed)
        tiered.prefetcher.drain()
        c = tiered.disk_counters
    return DiskDecodeResult(layers, tokens, cache_share, 1 / dram_s, 1 / disk_s, c.bytes_read / tokens, c.hit_rate,
                            c.waits, c.misses, c.prefetch_precision)
