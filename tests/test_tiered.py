"""The tiered MoE layer: shards by backend and format, the disk tier with its cache and read-ahead,
the recorder hook and expert deferral, on tiny checkpoints in each family's real layout."""
from __future__ import annotations

import random

import pytest
import torch

from moetier.checkpoint import Checkpoint
from moetier.checkpoint.experts import CheckpointExperts
from moetier.conformance.tolerances import tolerance
from moetier.errors import ShapeError
from moetier.hardware import load_inventory
from moetier.plugins import load_registry
from moetier.reference import oracle
from moetier.runtime import ShardSpec, load_experts
from moetier.runtime.moe_block import MoEBlock
from moetier.runtime.routing import route
from moetier.selection import select_backends

from zoo.fixtures import tiny_checkpoint  # noqa: F401  (session fixture)

pytest.importorskip("transformers")

REGISTRY = load_registry(no_plugins=True)
INVENTORY = load_inventory()
BEST = select_backends(REGISTRY, INVENTORY, force=[]).for_device("cpu")
FAMILIES = [("qwen", "Qwen3-30B-A3B"), ("qwen", "Qwen1.5-MoE-A2.7B"), ("qwen", "Qwen3.5-35B-A3B"),
            ("deepseek", "DeepSeek-V3"), ("kimi", "Kimi-K2.5"), ("glm", "GLM-4.5-Air"), ("minimax", "MiniMax-M2")]


class Plan:
    """A plan given as data: layer -> shard specs (what moetier.placement's plans provide)."""

    def __init__(self, table):
        self.table = table

    def shards(self, layer):
        return self.table[layer]


def random_plan(layout, rng, choices):
    table = {}
    for m in layout.moe_layers:
        E = m.experts.num_experts
        owner = [rng.randrange(len(choices)) for _ in range(E)]
        table[m.index] = tuple(ShardSpec(*choices[c], experts=tuple(e for e in range(E) if owner[e] == c))
                               for c in range(len(choices)) if c in owner)
    return Plan(table)


def oracle_routed(ckpt_dir, layout, layer_index, plan, x, ids, w):
    """float64: each shard's experts in that shard's format, summed."""
    ref = oracle()
    out = torch.zeros(x.shape, dtype=torch.float64)
    layer = layout.layer(layer_index)
    with Checkpoint(ckpt_dir) as ckpt:
        for s in plan.shards(layer_index):
            prepared = ref.prepare(layer.experts, CheckpointExperts(ckpt, layout, layer), s.experts, s.fmt)
            out += ref.forward(prepared, x, ids, w, out_dtype=torch.float32).double()
    return out


def routing(ckpt_dir, layout, layer_index, x):
    with Checkpoint(ckpt_dir) as ckpt:
        block = MoEBlock.from_checkpoint(ckpt, layout, layer_index, REGISTRY.backend("cpu.torch").create(INVENTORY),
                                         fmt="fp32")
    return block.route(x)


def test_one_shard_is_the_backend_bit_for_bit(tiny_checkpoint):
    d, layout = tiny_checkpoint("qwen", "Qwen3-30B-A3B")
    x = torch.randn(9, layout.hidden_size)
    with load_experts(d, registry=REGISTRY, inventory=INVENTORY) as experts:
        for m in layout.moe_layers:
            ids, w = routing(d, layout, m.index, x)
            backend = experts[m.index].shards[0].backend
            with Checkpoint(d) as ckpt:
                single = MoEBlock.from_checkpoint(ckpt, layout, m.index, backend)
            assert torch.equal(experts[m.index](x, ids, w), single.routed(x, ids, w))


def test_tiers_sharing_backend_and_format_are_one_kernel_call(tiny_checkpoint):
    """Experts of one backend and format on two tiers are one shard: bit for bit the single backend."""
    d, layout = tiny_checkpoint("deepseek", "DeepSeek-V3")
    fmt = layout.quantization.fmt
    plan = random_plan(layout, random.Random(5), [("cpu:numa0", BEST, fmt), ("cuda:0", BEST, fmt)])
    x = torch.randn(7, layout.hidden_size)
    with load_experts(d, registry=REGISTRY, inventory=INVENTORY) as single, \
            load_experts(d, plan=plan, registry=REGISTRY, inventory=INVENTORY) as tiered:
        for m in layout.moe_layers:
            layer = tiered[m.index]
            assert len(layer.shards) == 1 and set(layer.bytes_per_tier()) == {"cpu:numa0", "cuda:0"}
            ids, w = routing(d, layout, m.index, x)
            assert torch.equal(layer(x, ids, w), single[m.index](x, ids, w))


@pytest.mark.parametrize("family,version", FAMILIES)
def test_random_plans_agree_with_float64(tiny_checkpoint, family, version):
    d, layout = tiny_checkpoint(family, version)
    native = layout.quantization.fmt
    seed = random.SystemRandom().randrange(2**31)
    rng = random.Random(seed)
    choices = [("cpu:numa0", BEST, native if native in REGISTRY.backend(BEST).formats else "bf16"),
               ("cuda:0", "cpu.torch", rng.choice(["int8", "bf16", "int4_g32"])),
               ("disk", BEST, "bf16")]
    plan = random_plan(layout, rng, choices)
    bound = max(tolerance(c[2]) for c in choices)
    x = torch.randn(11, layout.hidden_size, generator=torch.Generator().manual_seed(seed))
    with load_experts(d, plan=plan, registry=REGISTRY, inventory=INVENTORY, cache_bytes=1 << 20) as experts:
        for m in layout.moe_layers:
            ids, w = routing(d, layout, m.index, x)
            got = experts[m.index](x, ids, w)
            want = oracle_routed(d, layout, m.index, plan, x, ids, w)
            err = float((got.double() - want).norm() / want.norm())
            assert err <= bound, f"{version} layer {m.index}: {err:.2e} > {bound} (seed {seed})"


def _expert_bytes(d, layout, fmt):
    layer = layout.moe_layers[0]
    with Checkpoint(d) as ckpt:
        b = REGISTRY.backend(BEST).create(INVENTORY)
        return b.prepare(layer.experts, CheckpointExperts(ckpt, layout, layer), (0,), fmt).nbytes


def all_on_disk(layout, fmt):
    return Plan({m.index: (ShardSpec("disk", BEST, fmt, tuple(range(m.experts.num_experts))),)
                 for m in layout.moe_layers})


def test_disk_cache_of_a_quarter_counts_exactly(tiny_checkpoint):
    d, layout = tiny_checkpoint("qwen", "Qwen3-30B-A3B")
    a, b = (m.index for m in layout.moe_layers)
    E = layout.moe_layers[0].experts.num_experts
    per_expert = _expert_bytes(d, layout, "bf16")
    budget = per_expert * (E * 2) // 4  # a quarter of the experts of both layers: 4 experts
    x = torch.randn(3, layout.hidden_size)
    plan = all_on_disk(layout, "bf16")

    def ids(*pairs):
        return torch.tensor([list(p) for p in pairs]), torch.full((len(pairs), 2), 0.5)

    script = [(a, ids((0, 1), (1, 0), (0, 1))), (a, ids((0, 1))), (b, ids((0, 1))), (a, ids((2, 3))),
              (a, ids((0, 1)))]
    with load_experts(d, plan=plan, registry=REGISTRY, inventory=INVENTORY, cache_bytes=budget,
                      prefetch=False) as experts:
        for layer, (i, w) in script:
            xi = x[:i.shape[0]]
            got = experts[layer](xi, i, w)
            want = oracle_routed(d, layout, layer, plan, xi, i, w)
            assert float((got.double() - want).norm() / want.norm()) <= tolerance("bf16")
        c = experts.disk_counters
        # a: 0,1 miss; a: 0,1 hit; b: 0,1 miss (cache full: 4); a: 2,3 miss, evicting a0, a1; a: 0,1 miss again
        assert (c.misses, c.hits, c.waits, c.evictions) == (8, 2, 0, 4)
        assert c.bytes_read == 8 * per_expert and experts.cache.used_bytes <= budget


def test_experts_twice_the_dram_budget_still_run(tiny_checkpoint):
    d, layout = tiny_checkpoint("qwen", "Qwen3-30B-A3B")
    total = sum(m.experts.num_experts for m in layout.moe_layers) * _expert_bytes(d, layout, "bf16")
    plan = all_on_disk(layout, "bf16")
    gen = torch.Generator().manual_seed(random.SystemRandom().randrange(2**31))
    with load_experts(d, plan=plan, registry=REGISTRY, inventory=INVENTORY, cache_bytes=total // 2) as experts:
        assert experts[layout.moe_layers[0].index].lookahead is not None  # the next layer's router reads ahead
        for _ in range(4):  # decode-like steps through every MoE layer
            x = torch.randn(2, layout.hidden_size, generator=gen)
            for m in layout.moe_layers:
                ids, w = routing(d, layout, m.index, x)
                got = experts[m.index](x, ids, w)
                want = oracle_routed(d, layout, m.index, plan, x, ids, w)
                assert float((got.double() - want).norm() / want.norm()) <= tolerance("bf16")
                x = x + 0.1 * got
        experts.prefetcher.drain()
        c = experts.disk_counters
        assert c.misses + c.hits + c.waits > 0 and c.prefetched > 0 and 0 <= c.prefetch_precision <= 1
        assert experts.cache.used_bytes <= total // 2


def test_every_expert_held_exactly_once(tiny_checkpoint):
    d, layout = tiny_checkpoint("qwen", "Qwen3-30B-A3B")
    m = layout.moe_layers[0]
    E = m.experts.num_experts
    bad = Plan({m.index: (ShardSpec("cpu:numa0", BEST, "bf16", tuple(range(E - 1))),)})
    with pytest.raises(ShapeError, match=r"missing \[7\]"):
        load_experts(d, plan=bad, layers=[m.index], registry=REGISTRY, inventory=INVENTORY)


class CountingRecorder:
    def __init__(self, layers, experts):
        self.counts = torch.zeros(layers, experts, dtype=torch.int64)

    def add(self, layer, ids):
        self.counts[layer] += torch.bincount(ids.reshape(-1), minlength=self.counts.shape[1])


def test_recorder_sees_every_routing_choice(tiny_checkpoint):
    d, layout = tiny_checkpoint("qwen", "Qwen3-30B-A3B")
    rec = CountingRecorder(layout.num_hidden_layers, layout.moe_layers[0].experts.num_experts)
    want = torch.zeros_like(rec.counts)
    with load_experts(d, registry=REGISTRY, inventory=INVENTORY) as experts:
        experts.set_recorder(rec)
        for T in (1, 5, 17):
            x = torch.randn(T, layout.hidden_size)
            for m in layout.moe_layers:
                ids, w = routing(d, layout, m.index, x)
                experts[m.index](x, ids, w)
                for e in ids.reshape(-1).tolist():
                    want[m.index, e] += 1
    assert torch.equal(rec.counts, want) and int(want.sum()) == 23 * 2 * len(layout.moe_layers)


def test_deferral_moves_work_one_layer_later(tiny_checkpoint):
    d, layout = tiny_checkpoint("qwen", "Qwen3-30B-A3B")
    layers = [m.index for m in layout.moe_layers]
    x = torch.randn(6, layout.hidden_size)
    routes = {i: routing(d, layout, i, x) for i in layers}
    with load_experts(d, registry=REGISTRY, inventory=INVENTORY) as experts:
        plain = {i: experts[i](x, *routes[i]) for i in layers}
        experts.set_deferral(1)
        deferred = {i: experts[i](x, *routes[i]) for i in layers}
        # The same input to every layer: deferral moves work between layers, it loses none.
        total_plain, total_deferred = sum(plain.values()), sum(deferred.values())
        assert float((total_deferred - total_plain).norm() / total_plain.norm()) < 1e-5
        assert not torch.allclose(deferred[layers[0]], plain[layers[0]])  # the first layer gave some away
        # In a residual chain the late arrival changes the output: measured, and small for one of two experts.
        experts.set_deferral(0)
        chain_plain = _chain(experts, layers, x, d, layout)
        experts.set_deferral(1)
        chain_deferred = _chain(experts, layers, x, d, layout)
        change = float((chain_deferred - chain_plain).norm() / chain_plain.norm())
        assert 0 < change < 0.5, change
        with pytest.raises(ShapeError, match="MoE layers must run in"):
            experts[layers[0]](x, *routes[layers[0]])
            experts[layers[0]](x, *routes[layers[0]])


def _chain(experts, layers, x, d, layout):
    h = x.clone()
    for i in layers:
        ids, w = routing(d, layout, i, h)
        h = h + experts[i](h, ids, w)
    return h


def test_lookahead_predicts_with_the_next_router(tiny_checkpoint):
    """The read-ahead guess is the next layer's router applied to this layer's input."""
    d, layout = tiny_checkpoint("qwen", "Qwen3-30B-A3B")
    a, b = (m.index for m in layout.moe_layers)
    E = layout.moe_layers[0].experts.num_experts
    plan = Plan({a: (ShardSpec("cpu:numa0", BEST, "bf16", tuple(range(E))),),
                 b: (ShardSpec("disk", BEST, "bf16", tuple(range(E))),)})
    x = torch.randn(1, layout.hidden_size)
    with load_experts(d, plan=plan, registry=REGISTRY, inventory=INVENTORY, cache_bytes=1 << 22) as experts:
        la = experts[a].lookahead
        guess, _ = route(la.spec, x, la.router.weight)
        experts[a](x, *routing(d, layout, a, x))
        experts.prefetcher.drain()
        assert {k for k in [(b, e) for e in range(E)] if k in experts.cache} == {(b, e) for e in guess[0].tolist()}
