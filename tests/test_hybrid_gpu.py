"""The hybrid step on an NVIDIA GPU: run by ci/device_check.sh (pytest -m gpu), skipped elsewhere. What
the CPU stand-in cannot show: host functions launched through the CUDA runtime on a real stream, the
staging copies to pinned memory and back, the event join, a captured graph replaying the CPU part every
time without host synchronisation, and prefill streaming onto the GPU."""
import pytest
import torch

from moetier.conformance.tolerances import tolerance
from moetier.experts import ExpertLayerSpec, ExpertWeights
from moetier.hardware import load_inventory
from moetier.plugins import get_registry
from moetier.reference import oracle
from moetier.runtime.hybrid import DeviceHostFunctions, PrefillStreaming, StreamCosts, host_task_backend
from moetier.runtime.tiered import Shard, TieredExperts
from moetier.selection import select_backends

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or bool(getattr(torch.version, "hip", None)),
                       reason="needs an NVIDIA GPU and a CUDA build of torch"),
]

LAYER = ExpertLayerSpec(16, 4, 512, 256)


@pytest.fixture(scope="module")
def backends():
    inv = load_inventory()
    reg = get_registry()
    cpu = reg.backend(select_backends(reg, inv).for_device("cpu")).create(inv)
    if not host_task_backend(cpu):
        pytest.skip(f"{cpu.name} runs no host tasks")
    return cpu, reg.backend("cuda").factory(inv)


def weights(fmt, seed=0):
    g = torch.Generator().manual_seed(seed)
    E, H, I = LAYER.num_experts, LAYER.hidden_size, LAYER.intermediate_size
    return ExpertWeights.from_float(torch.randn(E, I, H, generator=g) / H ** 0.5, torch.randn(E, I, H, generator=g) / H ** 0.5,
                                    torch.randn(E, H, I, generator=g) / I ** 0.5, fmt)


def inputs(T, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(LAYER.num_experts, generator=g)[:LAYER.top_k] for _ in range(T)])
    return (torch.randn(T, LAYER.hidden_size, generator=g).to(torch.bfloat16), ids,
            torch.softmax(torch.randn(T, LAYER.top_k, generator=g), -1))


def split(backends, fmt, seed=0):
    cpu, gpu = backends
    w = weights(fmt, seed)
    host = Shard(cpu, cpu.prepare(LAYER, w, range(0, 16, 2), fmt), {})
    dev = Shard(gpu, gpu.prepare(LAYER, w, range(1, 16, 2), fmt), {})
    return w, host, dev


def test_host_functions_go_through_the_cuda_runtime():
    hf = DeviceHostFunctions.get()
    assert hf.symbol == "cudaLaunchHostFunc" and "libcudart" in hf.source, (hf.symbol, hf.source)


@pytest.mark.parametrize("fmt", ["bf16", "fp8_e4m3"])
def test_eager_hybrid_on_cuda_equals_the_standard_path(backends, fmt):
    w, host, dev = split(backends, fmt)
    layer = TieredExperts(0, LAYER, [host, dev])
    ref = oracle()
    full = ref.prepare(LAYER, w, range(16), fmt)
    for T in (1, 8, 100, 3, 100):  # 100 twice: both slots of its ring; 3 after 100: a retired task
        x, ids, tw = inputs(T, T)
        standard = layer(x, ids, tw)  # CPU inputs: the standard path
        got = layer(x.cuda(), ids.cuda(), tw.cuda())
        assert layer.hybrid is not None, layer.hybrid_note
        assert got.device.type == "cuda" and torch.equal(got.cpu(), standard), (fmt, T)
        want = ref.forward(full, x, ids, tw).double()
        assert float((got.cpu().double() - want).norm() / want.norm()) <= tolerance(fmt)
    slots = layer.hybrid.ring.slots()
    assert all(s.hidden.is_pinned() and s.outs[0].is_pinned() for s in slots)


def test_a_layer_all_on_the_cpu_takes_gpu_inputs_through_the_hybrid_step(backends):
    cpu, _ = backends
    w = weights("bf16", 7)
    layer = TieredExperts(0, LAYER, [Shard(cpu, cpu.prepare(LAYER, w, range(16), "bf16"), {})])
    x, ids, tw = inputs(5, 8)
    got = layer(x.cuda(), ids.cuda(), tw.cuda())
    assert layer.hybrid is not None and got.device.type == "cuda"
    assert torch.equal(got.cpu(), cpu.forward(layer.shards[0].prepared, x, ids, tw))


def test_a_captured_graph_replays_the_cpu_part_every_time(backends):
    w, host, dev = split(backends, "bf16", 1)
    layer = TieredExperts(0, LAYER, [host, dev])
    x, ids, tw = inputs(1, 0)
    layer(x.cuda(), ids.cuda(), tw.cuda())  # makes the layer's hybrid step
    step = layer.hybrid
    runner = step.runner(4, graph=True)
    assert runner.graph is not None
    before = [t.completed for t in runner.tasks]
    calls = [inputs(4, 10 + seed) for seed in range(5)]
    on_gpu = [tuple(t.cuda() for t in c) for c in calls]
    torch.cuda.synchronize()
    results = []
    torch.cuda.set_sync_debug_mode("error")  # no host synchronisation anywhere in a replayed step
    try:
        for (x, ids, tw), dev_inputs in zip(calls, on_gpu):
            results.append((x, ids, tw, runner.run(*dev_inputs).clone()))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    runner.check()
    assert [t.completed - b for t, b in zip(runner.tasks, before)] == [5]  # the host nodes ran on every replay
    for x, ids, tw, out in results:
        assert torch.equal(out.cpu(), layer(x, ids, tw)), "graph replay differs from the standard path"


def test_the_cpu_part_alone_and_the_device_part_alone_in_graphs(backends):
    w, host, dev = split(backends, "bf16", 2)
    layer = TieredExperts(0, LAYER, [host, dev])
    x, ids, tw = inputs(2, 0)
    layer(x.cuda(), ids.cuda(), tw.cuda())
    cpu, gpu = backends
    only_host = layer.hybrid.runner(2, graph=True, parts=("host",))
    only_dev = layer.hybrid.runner(2, graph=True, parts=("device",))
    x, ids, tw = inputs(2, 3)
    a = only_host.run(x.cuda(), ids.cuda(), tw.cuda()).cpu()
    b = only_dev.run(x.cuda(), ids.cuda(), tw.cuda()).cpu()
    assert torch.equal(a, cpu.forward(host.prepared, x, ids, tw))
    assert torch.equal(b, gpu.forward(dev.prepared, x.cuda(), ids.cuda(), tw.cuda()).cpu())


def test_prefill_streams_the_used_experts_onto_the_gpu(backends):
    cpu, gpu = backends
    w = weights("bf16", 4)
    layer = TieredExperts(0, LAYER, [Shard(cpu, cpu.prepare(LAYER, w, range(16), "bf16"), {}, w)])
    # n* = F / P = 4 tokens per expert: a 256-token prefill (64 per expert) streams, one token does not.
    layer.streaming = PrefillStreaming(StreamCosts(cpu_flops=4e9, link_bytes_per_s=1e9), device_backend=gpu,
                                       chunk_experts=16)
    x, ids, tw = inputs(256, 5)
    got = layer(x.cuda(), ids.cuda(), tw.cuda())
    assert layer.last_stream_decisions[0].streamed
    used = sorted(set(ids.reshape(-1).tolist()))
    assert torch.equal(got.cpu(), gpu.forward(gpu.prepare(LAYER, w, used, "bf16"), x.cuda(), ids.cuda(), tw.cuda()).cpu())
    layer.streaming = PrefillStreaming(StreamCosts(cpu_flops=4e9, link_bytes_per_s=1e9), device_backend=gpu,
                                       chunk_experts=5)
    chunked = layer(x.cuda(), ids.cuda(), tw.cuda())
    assert float((chunked - got).norm() / got.norm()) < 1e-6
    x1, ids1, tw1 = inputs(1, 6)
    layer(x1.cuda(), ids1.cuda(), tw1.cuda())
    assert not layer.last_stream_decisions[0].streamed
