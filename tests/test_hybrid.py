"""The hybrid step without a GPU: the CPU stand-in device (cpu.accel computing the "device" shard in the
calling thread, a native thread running the host functions in order) puts the hybrid code and the real
C entry points through every path; the staging ring; the fixed-batch runner."""
from __future__ import annotations

import random
import threading
import time

import pytest
import torch

from moetier.conformance.tolerances import tolerance
from moetier.errors import DTypeError, ExpertIdError, NonFiniteError, SettingError, ShapeError
from moetier.experts import ExpertLayerSpec, ExpertWeights
from moetier.hardware import load_inventory
from moetier.plugins import load_registry
from moetier.reference import oracle
from moetier.runtime.hybrid import HybridStep, StagingRing, StandInStreams, capacity_for, host_task_backend
from moetier.runtime.tiered import Shard, TieredExperts
from moetier.selection import select_backends

REGISTRY = load_registry(no_plugins=True)
INVENTORY = load_inventory()
BEST = select_backends(REGISTRY, INVENTORY, force=[]).for_device("cpu")
NATIVE = REGISTRY.backend(BEST).create(INVENTORY, threads=2)
ACCEL = REGISTRY.backend("cpu.accel").create(INVENTORY)
pytestmark = pytest.mark.skipif(not host_task_backend(NATIVE), reason=f"{BEST} runs no host tasks (not native)")
LAYER = ExpertLayerSpec(16, 4, 128, 96)


def weights(layer: ExpertLayerSpec, fmt: str, seed: int) -> ExpertWeights:
    g = torch.Generator().manual_seed(seed)
    E, H, I = layer.num_experts, layer.hidden_size, layer.intermediate_size
    return ExpertWeights.from_float(torch.randn(E, I, H, generator=g) / H ** 0.5,
                                    torch.randn(E, I, H, generator=g) / H ** 0.5,
                                    torch.randn(E, H, I, generator=g) / I ** 0.5, fmt)


def routing(layer: ExpertLayerSpec, T: int, g: torch.Generator):
    ids = torch.stack([torch.randperm(layer.num_experts, generator=g)[:layer.top_k] for _ in range(T)])
    w = torch.softmax(torch.randn(T, layer.top_k, generator=g), dim=1)
    return ids, w


def split_layer(fmt: str, seed: int, device_share: float = 0.5):
    """A layer split at random between the native backend (host shard) and cpu.accel (device shard)."""
    w = weights(LAYER, fmt, seed)
    rng = random.Random(seed)
    ids = list(range(LAYER.num_experts))
    rng.shuffle(ids)
    n_dev = round(device_share * len(ids))
    host = Shard(NATIVE, NATIVE.prepare(LAYER, w, sorted(ids[n_dev:]), fmt), {})
    dev = Shard(ACCEL, ACCEL.prepare(LAYER, w, sorted(ids[:n_dev]), fmt), {})
    return w, host, dev


def stand_in() -> StandInStreams:
    return StandInStreams(NATIVE.host_callback_thread())


@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4_g32", "fp8_e4m3"])
def test_hybrid_join_equals_the_tiered_layer_and_agrees_with_float64(fmt):
    seed = random.SystemRandom().randrange(2**31)
    w, host, dev = split_layer(fmt, seed)
    layer = TieredExperts(0, LAYER, [host, dev])
    step = HybridStep(LAYER, [host], [dev], stand_in())
    ref = oracle()
    prepared = ref.prepare(LAYER, w, range(LAYER.num_experts), fmt)
    g = torch.Generator().manual_seed(seed)
    for T in (1, 3, 37):
        for hidden_dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(T, LAYER.hidden_size, generator=g).to(hidden_dtype)
            ids, tw = routing(LAYER, T, g)
            layer.set_hybrid(None)
            standard = layer(x, ids, tw)
            layer.set_hybrid(step)
            hybrid = layer(x, ids, tw)
            again = layer(x, ids, tw)  # the other slot of the ring
            # Same shards, same order of the fp32 sum: bit for bit.
            assert torch.equal(hybrid, standard) and torch.equal(again, standard), (fmt, T, hidden_dtype, seed)
            want = ref.forward(prepared, x, ids, tw).double()
            err = float((hybrid.double() - want).norm() / want.norm())
            assert err <= tolerance(fmt), f"{fmt} T={T}: {err:.2e} (seed {seed})"
    assert layer(x, ids, tw, out_dtype=torch.bfloat16).dtype == torch.bfloat16


def test_hybrid_with_every_expert_on_the_cpu_is_the_native_backend_bit_for_bit():
    w = weights(LAYER, "bf16", 3)
    host = Shard(NATIVE, NATIVE.prepare(LAYER, w, range(LAYER.num_experts), "bf16"), {})
    step = HybridStep(LAYER, [host], [], stand_in())
    g = torch.Generator().manual_seed(4)
    for T in (1, 9):
        x = torch.randn(T, LAYER.hidden_size, generator=g)
        ids, tw = routing(LAYER, T, g)
        assert torch.equal(step(x, ids, tw), NATIVE.forward(host.prepared, x, ids, tw))


def test_two_host_shards_sum_in_the_tiered_order():
    w = weights(LAYER, "bf16", 5)
    halves = [Shard(NATIVE, NATIVE.prepare(LAYER, w, range(r, LAYER.num_experts, 3), "bf16"), {}) for r in (0, 1)]
    dev = Shard(ACCEL, ACCEL.prepare(LAYER, w, range(2, LAYER.num_experts, 3), "bf16"), {})
    layer = TieredExperts(0, LAYER, [*halves, dev])
    g = torch.Generator().manual_seed(6)
    x = torch.randn(11, LAYER.hidden_size, generator=g)
    ids, tw = routing(LAYER, 11, g)
    standard = layer(x, ids, tw)
    layer.set_hybrid(HybridStep(LAYER, halves, [dev], stand_in()))
    assert torch.equal(layer(x, ids, tw), standard)


def test_bad_inputs_raise_before_any_work_starts():
    _, host, dev = split_layer("bf16", 7)
    streams = stand_in()
    step = HybridStep(LAYER, [host], [dev], streams)
    x = torch.randn(2, LAYER.hidden_size)
    ids = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 99]])
    tw = torch.full((2, 4), 0.25)
    with pytest.raises(ExpertIdError, match="99"):
        step(x, ids, tw)
    with pytest.raises(NonFiniteError):
        step(torch.full_like(x, float("nan")), ids.clamp(max=15), tw)
    with pytest.raises(ShapeError):
        step(x[:, :10], ids.clamp(max=15), tw)
    assert streams.thread.launched == 0  # nothing was staged or started


def test_set_hybrid_refuses_a_step_over_other_shards():
    _, host, dev = split_layer("bf16", 8)
    layer = TieredExperts(0, LAYER, [host, dev])
    with pytest.raises(SettingError, match="exactly this layer's shards"):
        layer.set_hybrid(HybridStep(LAYER, [host], [], stand_in()))


# ---- the staging ring ----------------------------------------------------------------------------

def test_ring_slots_alternate_and_buffers_are_fixed_after_warm_up():
    _, host, dev = split_layer("bf16", 9)
    streams = stand_in()
    ring = StagingRing(streams, LAYER.hidden_size)
    a = ring.acquire(3, torch.bfloat16, 4, 1)
    b = ring.acquire(4, torch.bfloat16, 4, 1)  # same capacity (4): the other slot
    assert a is not b and a.capacity == b.capacity == capacity_for(3) == 4
    assert ring.acquire(3, torch.bfloat16, 4, 1) is a and ring.acquire(4, torch.bfloat16, 4, 1) is b
    assert ring.acquire(2, torch.bfloat16, 4, 1).capacity == 2  # another batch size: its own ring
    assert [capacity_for(n) for n in (1, 2, 3, 5, 8, 9, 512, 513)] == [1, 2, 4, 8, 8, 16, 512, 1024]
    step = HybridStep(LAYER, [host], [dev], streams, ring)
    g = torch.Generator().manual_seed(10)
    sizes = [1, 2, 3, 4, 5, 7, 8]
    for T in sizes:  # warm-up: every capacity these sizes need
        x = torch.randn(T, LAYER.hidden_size, generator=g).to(torch.bfloat16)
        step(x, *routing(LAYER, T, g))
        step(x, *routing(LAYER, T, g))
    pointers = {t.data_ptr() for s in ring.slots() for t in s.buffers()}
    n_slots = len(ring.slots())
    for T in [random.Random(11).choice(sizes) for _ in range(30)]:
        x = torch.randn(T, LAYER.hidden_size, generator=g).to(torch.bfloat16)
        step(x, *routing(LAYER, T, g))
    assert len(ring.slots()) == n_slots
    assert {t.data_ptr() for s in ring.slots() for t in s.buffers()} == pointers


def test_ring_does_not_reuse_a_slot_before_its_consumer_is_done():
    """A slot whose host task is still running is handed out again only once the task has finished;
    the other slot is free meanwhile."""
    big = ExpertLayerSpec(16, 4, 512, 512)
    w = weights(big, "bf16", 12)
    prepared = NATIVE.prepare(big, w, range(16), "bf16")
    streams = stand_in()
    ring = StagingRing(streams, big.hidden_size)
    T = 1024
    slot = ring.acquire(T, torch.float32, 4, 1)
    g = torch.Generator().manual_seed(13)
    slot.hidden.copy_(torch.randn(T, big.hidden_size, generator=g))
    ids, tw = routing(big, T, g)
    slot.ids.copy_(ids)
    slot.weights.copy_(tw)
    task = NATIVE.host_task(prepared, slot.hidden, slot.ids, slot.weights, slot.outs[0])
    streams.launch(task.enqueue)
    streams.launch(task.sync)
    ring.release(slot, streams.fence())  # the slot's consumer: that task
    running = task.completed == 0
    other = ring.acquire(T, torch.float32, 4, 1)
    assert other is not slot
    again = ring.acquire(T, torch.float32, 4, 1)
    assert again is slot
    assert task.completed == task.submitted == 1  # acquire waited for it
    assert running, "the task finished before the ring was asked: the test proved nothing (make it bigger)"
    assert torch.equal(slot.outs[0], NATIVE.forward(prepared, slot.hidden, slot.ids, slot.weights))


# ---- the fixed-batch runner ------------------------------------------------------------------------

def test_runner_equals_the_eager_step_part_by_part_and_keeps_its_buffers():
    _, host, dev = split_layer("bf16", 14)
    step = HybridStep(LAYER, [host], [dev], stand_in())
    B = 5
    joint = step.runner(B)
    only_host = step.runner(B, parts=("host",))
    only_dev = step.runner(B, parts=("device",))
    g = torch.Generator().manual_seed(15)
    pointers = None
    for _ in range(4):
        x = torch.randn(B, LAYER.hidden_size, generator=g).to(torch.bfloat16)
        ids, tw = routing(LAYER, B, g)
        out = joint.run(x, ids, tw)
        assert out is joint.out
        assert torch.equal(out, step(x, ids, tw))
        assert torch.equal(only_host.run(x, ids, tw), NATIVE.forward(host.prepared, x, ids, tw))
        assert torch.equal(only_dev.run(x, ids, tw), ACCEL.forward(dev.prepared, x, ids, tw))
        ptrs = [t.data_ptr() for t in (joint.out, joint.hidden, *joint.slot.buffers())]
        assert pointers is None or ptrs == pointers
        pointers = ptrs
    with pytest.raises(ShapeError, match="batch size 5"):
        joint.run(x[:4], ids[:4], tw[:4])
    with pytest.raises(SettingError):
        step.runner(B, parts=("cpu",))


def test_runner_bad_id_zeroes_the_cpu_part_and_check_raises_it():
    w = weights(LAYER, "bf16", 16)
    host = Shard(NATIVE, NATIVE.prepare(LAYER, w, range(LAYER.num_experts), "bf16"), {})
    runner = HybridStep(LAYER, [host], [], stand_in()).runner(2)
    x = torch.randn(2, LAYER.hidden_size).to(torch.bfloat16)
    ids = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 200]])
    out = runner.run(x, ids, torch.full((2, 4), 0.25))  # unchecked, like the accelerator's decode step
    assert torch.count_nonzero(out) == 0
    with pytest.raises(ExpertIdError, match="out of range"):
        runner.check()
    runner.check()  # reported once
    ids[1, 3] = 7
    assert torch.equal(runner.run(x, ids, torch.full((2, 4), 0.25)),
                       NATIVE.forward(host.prepared, x, ids, torch.full((2, 4), 0.25)))


def test_runner_refuses_wrong_inputs_with_typed_errors():
    _, host, dev = split_layer("bf16", 17)
    runner = HybridStep(LAYER, [host], [dev], stand_in()).runner(1)
    with pytest.raises(DTypeError):
        runner.run([[0.0] * LAYER.hidden_size], torch.zeros(1, 4, dtype=torch.int64), torch.zeros(1, 4))
    with pytest.raises(ShapeError):
        HybridStep(LAYER, [host], [dev], stand_in()).runner(0)


def test_deferred_and_immediate_work_share_one_ring_from_two_threads():
    """Deferral computes a layer's deferred experts on a second thread: launches are serialized by the
    ring, and both results stay exact."""
    _, host, dev = split_layer("bf16", 18)
    layer = TieredExperts(0, LAYER, [host, dev])
    step = HybridStep(LAYER, [host], [dev], stand_in())
    g = torch.Generator().manual_seed(19)
    calls = [(torch.randn(4, LAYER.hidden_size, generator=g), *routing(LAYER, 4, g)) for _ in range(6)]
    want = [layer(*c) for c in calls]
    layer.set_hybrid(step)
    got = [None] * len(calls)

    def run(i):
        got[i] = layer(*calls[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_a_step_that_is_gone_leaves_no_tasks_in_a_shared_ring():
    """Layers share one ring per device; a step's cached host tasks hold its prepared experts, so they
    must leave the ring with the step."""
    import gc

    _, host, dev = split_layer("bf16", 20)
    streams = stand_in()
    ring = StagingRing(streams, LAYER.hidden_size)
    keep = HybridStep(LAYER, [host], [dev], streams, ring)
    gone = HybridStep(LAYER, [host], [dev], streams, ring)
    g = torch.Generator().manual_seed(21)
    for T in (2, 2, 5):
        x = torch.randn(T, LAYER.hidden_size, generator=g)
        ids, tw = routing(LAYER, T, g)
        keep(x, ids, tw)
        gone(x, ids, tw)

    def cached():
        return sum(len(s.tasks) + len(s.retired) for s in ring.slots())

    assert cached() == 4  # the two steps take turns: each has one slot of capacity 2 and one of 8
    del gone
    gc.collect()
    assert cached() == 2
    assert torch.equal(keep(x, ids, tw), NATIVE.forward(host.prepared, x, ids, tw) + ACCEL.forward(dev.prepared, x, ids, tw))
