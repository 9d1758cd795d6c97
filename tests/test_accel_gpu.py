"""The accelerator backend on an NVIDIA GPU: run by ci/device_check.sh (pytest -m gpu) on a GPU machine,
skipped elsewhere (the conformance suite on cuda is a step of its own there). What the CPU tests cannot show: the device kernels' numerics, the decode step with
no host synchronisation (sync_debug_mode "error") and inside a captured CUDA graph, no new device memory
after warm-up, and submit() joined by an event."""
import pytest
import torch

from moetier.conformance.tolerances import tolerance
from moetier.experts import EventPending, ExpertLayerSpec, ExpertWeights, Pending
from moetier.hardware import load_inventory
from moetier.plugins import get_registry
from moetier.reference import oracle

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or bool(getattr(torch.version, "hip", None)),
                       reason="needs an NVIDIA GPU and a CUDA build of torch"),
]

FORMATS = ("bf16", "fp16", "fp32", "int8", "int4_g128", "fp8_e4m3")


@pytest.fixture(scope="module")
def cuda_backend():
    return get_registry().backend("cuda").factory(load_inventory())


def backend_with(path):
    return get_registry().backend("cuda").factory(load_inventory(), gemm=path)


def weights(fmt, E=16, k=4, H=512, I=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = ExpertWeights.from_float(torch.randn(E, I, H, generator=g) / H ** 0.5, torch.randn(E, I, H, generator=g) / H ** 0.5,
                                 torch.randn(E, H, I, generator=g) / I ** 0.5, fmt)
    return ExpertLayerSpec(E, k, H, I), w


def inputs(T, E, k, H, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    return torch.randn(T, H, generator=g), ids, torch.softmax(torch.randn(T, k, generator=g), -1)


def rel(a, b):
    return float((a.cpu().double() - b.double()).norm() / b.double().norm())


def cuda(*ts):
    return [t.cuda() for t in ts]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("T", [1, 7, 600])
def test_every_applicable_path_matches_the_oracle(fmt, T):
    layer, w = weights(fmt)
    held = [e for e in range(16) if e % 5]  # 0, 5, 10, 15 are someone else's
    x, ids, tw = inputs(T, 16, 4, 512)
    ref = oracle().forward(oracle().prepare(layer, w, held, fmt), x, ids, tw)
    plan = backend_with("loop").plan
    paths = ["loop"] + (["triton"] if plan.triton else []) + (["grouped"] if plan.gemm_for(fmt, 512, 256) == "grouped" else [])
    for path in paths:
        b = backend_with(path)
        out = b.forward(b.prepare(layer, w, held, fmt), *cuda(x, ids, tw))
        assert out.device.type == "cuda"
        assert rel(out, ref) <= tolerance(fmt), (path, rel(out, ref))


@pytest.mark.parametrize("fmt", ["bf16", "fp8_e4m3", "int4_g128"])
def test_decode_step_never_synchronises_captures_and_allocates_nothing_new(cuda_backend, fmt):
    layer, w = weights(fmt)
    p = cuda_backend.prepare(layer, w, range(16), fmt)
    runner = cuda_backend.decode_runner(p, 8)
    x, ids, tw = cuda(*inputs(8, 16, 4, 512))
    x = x.to(torch.bfloat16)
    runner.run(x, ids, tw)  # warm-up: Triton compiles, the allocator fills its pool
    torch.cuda.synchronize()
    segments = torch.cuda.memory_stats()["segment.all.allocated"]
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation now raises
    try:
        for seed in range(2, 6):
            x2, ids2, tw2 = cuda(*inputs(8, 16, 4, 512, seed=seed))
            runner.run(x2.to(torch.bfloat16), ids2, tw2)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.cuda.memory_stats()["segment.all.allocated"] == segments  # no cudaMalloc after warm-up
    eager = runner.run(x, ids, tw).clone()
    graphed = cuda_backend.decode_runner(p, 8, graph=True)
    for seed in (7, 8):  # replays follow new inputs
        x3, ids3, tw3 = cuda(*inputs(8, 16, 4, 512, seed=seed))
        x3 = x3.to(torch.bfloat16)
        assert torch.equal(graphed.run(x3, ids3, tw3), runner.run(x3, ids3, tw3))
    assert torch.equal(graphed.run(x, ids, tw), eager)
    ref = oracle().forward(oracle().prepare(layer, w, range(16), fmt), x.cpu(), ids.cpu(), tw.cpu())
    assert rel(eager, ref) <= tolerance(fmt)


def test_submit_joins_by_event_on_the_callers_stream(cuda_backend):
    layer, w = weights("bf16")
    p = cuda_backend.prepare(layer, w, range(16), "bf16")
    x, ids, tw = cuda(*inputs(32, 16, 4, 512))
    pending = cuda_backend.submit(p, x, ids, tw)
    assert isinstance(pending, EventPending) and isinstance(pending, Pending)
    out = pending.wait()  # the current stream now waits for the side stream; the host did not block
    assert torch.equal(out, cuda_backend.forward(p, x, ids, tw))
    torch.cuda.current_stream().synchronize()
    assert pending.done()

