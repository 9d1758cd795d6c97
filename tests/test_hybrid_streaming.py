"""Large prefills: the tiered layer streams a CPU shard's used experts to the device when the n* cost
model says it is faster, decided per layer and batch; cpu.accel stands in for the GPU."""
from __future__ import annotations

import random
import threading

import pytest
import torch

from moetier.conformance.tolerances import tolerance
from moetier.errors import SettingError
from moetier.experts import ExpertLayerSpec, ExpertWeights
from moetier.hardware import load_inventory
from moetier.offload import decide_stream, n_star
from moetier.plugins import load_registry
from moetier.reference import oracle
from moetier.runtime.hybrid import PrefillStreaming, StreamCosts
from moetier.runtime.tiered import Shard, TieredExperts
from moetier.selection import select_backends

REGISTRY = load_registry(no_plugins=True)
INVENTORY = load_inventory()
NATIVE = REGISTRY.backend(select_backends(REGISTRY, INVENTORY, force=[]).for_device("cpu")).create(INVENTORY)
ACCEL = REGISTRY.backend("cpu.accel").create(INVENTORY)
LAYER = ExpertLayerSpec(16, 4, 128, 64)
# bf16: 2 bytes per weight, so n* = 2 * F / (2 * P) = F / P = 4 tokens per expert with these numbers.
COSTS = StreamCosts(cpu_flops=4e9, link_bytes_per_s=1e9)


class CountingSource:
    """An ExpertSource that records which experts were read, and on which thread."""

    def __init__(self, weights: ExpertWeights):
        self.weights, self.reads, self.lock = weights, [], threading.Lock()

    def expert(self, e):
        with self.lock:
            self.reads.append((e, threading.current_thread().name))
        return self.weights.expert(e)


def make(fmt: str, seed: int, chunk: int = 3, source: bool = True):
    g = torch.Generator().manual_seed(seed)
    E, H, I = LAYER.num_experts, LAYER.hidden_size, LAYER.intermediate_size
    w = ExpertWeights.from_float(torch.randn(E, I, H, generator=g) / H ** 0.5, torch.randn(E, I, H, generator=g) / H ** 0.5,
                                 torch.randn(E, H, I, generator=g) / I ** 0.5, fmt)
    src = CountingSource(w)
    shard = Shard(NATIVE, NATIVE.prepare(LAYER, w, range(E), fmt), {}, src if source else None)
    layer = TieredExperts(0, LAYER, [shard])
    layer.streaming = PrefillStreaming(COSTS, device_backend=ACCEL, chunk_experts=chunk)
    return layer, w, src


def inputs(T, seed, skew=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, LAYER.hidden_size, generator=g)
    pool = 8 if skew else LAYER.num_experts  # skew: only experts 0..7 are routed
    ids = torch.stack([torch.randperm(pool, generator=g)[:LAYER.top_k] for _ in range(T)])
    return x, ids, torch.softmax(torch.randn(T, LAYER.top_k, generator=g), dim=1)


def test_the_decision_is_the_n_star_rule_per_batch():
    assert n_star(2.0, COSTS.cpu_flops, COSTS.link_bytes_per_s) == pytest.approx(4.0)
    layer, _, src = make("bf16", 1)
    x, ids, w = inputs(1, 2)  # decode: one token per used expert, below n*
    out = layer(x, ids, w)
    (d,) = layer.last_stream_decisions
    want = decide_stream(LAYER, "bf16", torch.bincount(ids.reshape(-1), minlength=16).tolist(),
                         cpu_flops=COSTS.cpu_flops, link_bytes_per_s=COSTS.link_bytes_per_s)
    assert d.decision == want and not d.streamed and not want.stream
    assert src.reads == []  # experts never move for a decode step
    assert torch.equal(out, NATIVE.forward(layer.shards[0].prepared, x, ids, w))
    x, ids, w = inputs(64, 3, skew=True)  # prefill: 64 * 4 / 8 = 32 tokens per used expert, above n*
    layer(x, ids, w)
    (d,) = layer.last_stream_decisions
    assert d.streamed and d.decision.stream and d.decision.used_experts == 8
    assert d.decision.mean_tokens_per_used_expert == pytest.approx(32.0)
    assert d.decision.n_star == pytest.approx(4.0)
    slow_link = StreamCosts(cpu_flops=4e9, link_bytes_per_s=1e6)  # n* = 4000: never worth it
    layer.streaming = PrefillStreaming(slow_link, device_backend=ACCEL)
    layer(x, ids, w)
    (d,) = layer.last_stream_decisions
    assert not d.streamed and d.decision.n_star == pytest.approx(4000.0)


@pytest.mark.parametrize("fmt", ["bf16", "int8", "fp8_e4m3"])
def test_streamed_prefill_equals_the_device_backend_and_float64(fmt):
    seed = random.SystemRandom().randrange(2**31)
    one_chunk, w, src = make(fmt, seed, chunk=16)
    x, ids, tw = inputs(96, seed, skew=True)
    got = one_chunk(x, ids, tw)
    assert one_chunk.last_stream_decisions[0].streamed
    # Streamed experts are computed by the device backend: with one chunk, exactly its forward over them.
    used = sorted(set(ids.reshape(-1).tolist()))
    device = ACCEL.prepare(LAYER, w, used, fmt)
    assert torch.equal(got, ACCEL.forward(device, x, ids, tw)), seed
    # Only the experts actually used were read, each once, off the calling thread.
    assert sorted(e for e, _ in src.reads) == used
    assert all(name.startswith("moetier-stream") for _, name in src.reads)
    chunked, _, src = make(fmt, seed, chunk=3)
    got3 = chunked(x, ids, tw)
    assert sorted(e for e, _ in src.reads) == used
    # Chunks are summed one after another: the same terms in another order (fp32 reassociation of at
    # most k = 4 terms per element).
    assert float((got3 - got).norm() / got.norm()) < 1e-6
    ref = oracle()
    want = ref.forward(ref.prepare(LAYER, w, range(16), fmt), x, ids, tw).double()
    err = float((got3.double() - want).norm() / want.norm())
    assert err <= tolerance(fmt), f"{fmt}: {err:.2e} (seed {seed})"


def test_a_shard_without_a_source_is_computed_where_it_is():
    layer, w, _ = make("bf16", 4, source=False)
    x, ids, tw = inputs(64, 5, skew=True)
    out = layer(x, ids, tw)
    (d,) = layer.last_stream_decisions
    assert d.decision.stream and not d.streamed and "no source" in d.note
    assert torch.equal(out, NATIVE.forward(layer.shards[0].prepared, x, ids, tw))


def test_streaming_one_shard_keeps_the_others_and_the_order():
    """Two CPU shards, only the busy one streamed: its part takes its place in the fixed-order sum, the
    other is computed on the CPU."""
    g = torch.Generator().manual_seed(6)
    E, H, I = LAYER.num_experts, LAYER.hidden_size, LAYER.intermediate_size
    w = ExpertWeights.from_float(torch.randn(E, I, H, generator=g) / H ** 0.5, torch.randn(E, I, H, generator=g) / H ** 0.5,
                                 torch.randn(E, H, I, generator=g) / I ** 0.5, "bf16")
    busy = Shard(NATIVE, NATIVE.prepare(LAYER, w, range(8), "bf16"), {}, w)  # experts 0..7: most tokens'
    quiet = Shard(NATIVE, NATIVE.prepare(LAYER, w, range(8, 16), "bf16"), {}, w)
    layer = TieredExperts(0, LAYER, [busy, quiet])
    layer.streaming = PrefillStreaming(COSTS, device_backend=ACCEL, chunk_experts=8)
    x, ids, tw = inputs(64, 7, skew=True)
    ids[:3, -1] = torch.tensor([8, 9, 8])  # the quiet shard: 2 and 1 tokens, below n* = 4
    out = layer(x, ids, tw)
    assert [d.streamed for d in layer.last_stream_decisions] == [True, False]
    busy_part = ACCEL.forward(ACCEL.prepare(LAYER, w, sorted(set(ids.reshape(-1).tolist()) - {8, 9}), "bf16"),
                              x, ids, tw)
    assert torch.equal(out, busy_part + NATIVE.forward(quiet.prepared, x, ids, tw))


def test_stream_costs_are_checked():
    with pytest.raises(SettingError, match="cpu_flops"):
        StreamCosts(cpu_flops=0, link_bytes_per_s=1e9)
    with pytest.raises(SettingError, match="dram_bytes_per_s"):
        StreamCosts(cpu_flops=1e9, link_bytes_per_s=1e9, dram_bytes_per_s=-1)
    with pytest.raises(SettingError, match="chunk_experts"):
        PrefillStreaming(COSTS, chunk_experts=0)
