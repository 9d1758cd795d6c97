"""The accelerator backend without an accelerator: its code on the CPU (cpu.accel), its kernel choices,
the synchronisation-free decode step, and its probes on recorded CUDA, ROCm and Ascend inventories."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from moetier.conformance import run_suite
from moetier.errors import BackendUnavailable, DeviceError, FormatError, ShapeError
from moetier.experts import EventPending, ExpertLayerSpec, ExpertWeights, FuturePending, Pending
from moetier.formats import FORMATS
from moetier.hardware import load_inventory
from moetier.plugins import get_registry
from moetier.reference import oracle
from moetier.selection import select_backends

from moetier.backends.accel.backend import AccelBackend
from moetier.backends.accel.build import TorchBuild, detect_build
from moetier.backends.accel.plan import plan_kernels
from moetier.backends.accel.probes import probe_accelerator

from conftest import INVENTORIES

CPU_PLAN = plan_kernels("cpu", None, detect_build())
# Relative bound of the conformance suite for bf16 (core/conformance/tolerances.py): the paths below
# round activations to bf16 at different points, each within that budget of the float64 oracle.
BF16_BOUND = 1e-2


def accel(gemm: str = "auto") -> AccelBackend:
    return AccelBackend("cpu.accel", "cpu", CPU_PLAN, gemm=gemm)


def layer_and_weights(fmt: str, E=8, k=3, H=64, I=48, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    biases = (torch.randn(E, I, generator=g), torch.randn(E, I, generator=g), torch.randn(E, H, generator=g)) if bias else None
    w = ExpertWeights.from_float(torch.randn(E, I, H, generator=g) / H ** 0.5, torch.randn(E, I, H, generator=g) / H ** 0.5,
                                 torch.randn(E, H, I, generator=g) / I ** 0.5, fmt, biases=biases)
    layer = ExpertLayerSpec(E, k, H, I, activation="swiglu_oai" if bias else "silu", has_bias=bias, swiglu_limit=0.75)
    return layer, w


def routing(T, E, k, seed=1, H=64):
    """hidden [T, H], distinct top-k ids per token, positive weights summing to one."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    return torch.randn(T, H, generator=g), ids, torch.softmax(torch.randn(T, k, generator=g), -1)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


# ---- the whole conformance suite on the accelerator code path --------------------------------------

def test_conformance_suite_passes_on_cpu_accel_for_every_format():
    report = run_suite(["cpu.accel"])
    failed = [f"{r.case}: {r.detail}" for r in report.results if r.status == "failed"]
    assert not failed, failed[:10]
    summary = report.summary()["cpu.accel"]
    assert set(summary) == set(FORMATS)
    assert all(s["run"] >= 57 and s["skipped"] == 0 for s in summary.values()), summary
    assert report.ok


def test_cpu_accel_runs_the_grouped_gemm_for_float_formats_and_the_loop_otherwise():
    # The conformance run above goes through both GEMM paths: say which applies to what.
    assert CPU_PLAN.gemm_for("bf16", 64, 48) == "grouped"
    assert CPU_PLAN.gemm_for("fp32", 448, 128) == "grouped"
    assert CPU_PLAN.gemm_for("bf16", 50, 37) == "loop"  # rows not 16-byte multiples
    for fmt in ("int8", "int4_g32", "fp8_e4m3"):
        assert CPU_PLAN.gemm_for(fmt, 64, 48) == "loop"


def test_cpu_accel_is_never_chosen_automatically():
    reg = get_registry()
    for path in sorted(INVENTORIES.glob("*.json")):
        sel = select_backends(reg, load_inventory(path), force=[])
        assert sel.for_device("cpu") != "cpu.accel", path.name
    assert select_backends(reg, load_inventory(), force=[]).for_device("cpu") != "cpu.accel"


# ---- the GEMM paths agree ------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("T", [1, 5, 300])  # 300 tokens x 3 = 900 pairs: past the split-activation limit
def test_grouped_and_loop_paths_agree(fmt, T):
    layer, w = layer_and_weights(fmt)
    held = [0, 2, 3, 5, 6]  # experts 1, 4, 7 are not held: they must contribute nothing on both paths
    hidden, ids, tw = routing(T, layer.num_experts, layer.top_k)
    ref = oracle().forward(oracle().prepare(layer, w, held, fmt), hidden, ids, tw)
    outs = {}
    for path in ("grouped", "loop"):
        b = accel(path)
        outs[path] = b.forward(b.prepare(layer, w, held, fmt), hidden, ids, tw)
        assert rel(outs[path], ref) < (BF16_BOUND if fmt == "bf16" else 2e-3), path
    assert rel(outs["grouped"], outs["loop"]) < BF16_BOUND
    # The loop computes in fp32 from exact weights: for fp32 it is the oracle up to summation order.
    if fmt == "fp32":
        assert rel(outs["loop"], ref) < 1e-5 and rel(outs["grouped"], ref) < 1e-5


def test_forcing_a_path_that_does_not_apply_is_refused_at_prepare():
    layer, w = layer_and_weights("int4_g32")
    with pytest.raises(BackendUnavailable, match="grouped GEMM does not take int4_g32"):
        accel("grouped").prepare(layer, w, range(8), "int4_g32")
    with pytest.raises(BackendUnavailable, match="Triton kernel does not run on cpu"):
        accel("triton").prepare(layer, w, range(8), "int4_g32")
    with pytest.raises(ValueError, match="gemm must be"):
        accel("cutlass")


def test_inputs_on_another_device_are_refused_with_device_error():
    layer, w = layer_and_weights("bf16")
    b = accel()
    p = b.prepare(layer, w, range(8), "bf16")
    hidden, ids, tw = routing(2, 8, 3)
    with pytest.raises(DeviceError, match="is on meta, but this backend computes on cpu"):
        b.forward(p, hidden.to("meta"), ids, tw)


def test_pending_forms_satisfy_the_protocol():
    layer, w = layer_and_weights("bf16")
    b = accel()
    p = b.prepare(layer, w, range(8), "bf16")
    hidden, ids, tw = routing(3, 8, 3)
    pending = b.submit(p, hidden, ids, tw)
    assert isinstance(pending, FuturePending) and isinstance(pending, Pending)
    assert torch.equal(pending.wait(timeout=60), b.forward(p, hidden, ids, tw))
    assert pending.done()
    assert issubclass(EventPending, Pending)


# ---- the synchronisation-free decode step -------------------------------------------------------

_HOST_READS = ("item", "tolist", "cpu", "numpy", "__int__", "__float__", "__bool__", "__index__")


@contextlib.contextmanager
def no_host_reads(monkeypatch):
    """Every way Python code reads a tensor's value on the host raises inside this block."""
    def trap(name):
        def raiser(self, *a, **k):
            raise AssertionError(f"host read Tensor.{name} in the decode step")
        return raiser

    with monkeypatch.context() as m:
        for name in _HOST_READS:
            m.setattr(torch.Tensor, name, trap(name))
        yield


def traced_ops(fn):
    """(op, input shapes) of every op fn runs, leaving out what happens inside aten::_grouped_mm: torch's
    CPU version is a loop of matmuls that reads the offsets on the host (the CUDA one is one kernel
    taking them on the device; the GPU test checks that under sync_debug_mode("error"))."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()

    def inside_grouped_mm(e):
        e = e.cpu_parent
        while e is not None:
            if e.name == "aten::_grouped_mm":
                return True
            e = e.cpu_parent
        return False

    return [(e.name, tuple(map(tuple, e.input_shapes))) for e in prof.events() if not inside_grouped_mm(e)]


@pytest.mark.parametrize("fmt,bias", [("bf16", False), ("fp32", True)])
def test_decode_runner_buffers_are_fixed_and_it_equals_forward(fmt, bias, monkeypatch):
    layer, w = layer_and_weights(fmt, bias=bias)
    b = accel()
    held = [0, 1, 2, 4, 6, 7]
    p = b.prepare(layer, w, held, fmt)
    runner = b.decode_runner(p, 4, hidden_dtype=torch.bfloat16)
    assert runner.path == "grouped"
    buffers = [t.data_ptr() for t in (runner.hidden, runner.topk_ids, runner.topk_weights, runner.out)]
    all_one = torch.full((4, 3), 5, dtype=torch.int64)
    all_one[:, 1:] = torch.tensor([3, 1])  # expert 3 is not held
    traces = []
    for seed, ids_override in ((1, None), (2, None), (3, all_one)):
        hidden, ids, tw = routing(4, 8, 3, seed=seed)
        hidden = hidden.to(torch.bfloat16)
        ids = ids if ids_override is None else ids_override
        with no_host_reads(monkeypatch):
            traces.append(traced_ops(lambda: runner.run(hidden, ids, tw)))
        out = runner.out
        assert out is runner.run(hidden, ids, tw)  # the static output buffer, every step
        assert torch.equal(out, b.forward(p, hidden, ids, tw))  # the eager forward, bit for bit
        assert rel(out, oracle().forward(oracle().prepare(layer, w, held, fmt), hidden, ids, tw)) < BF16_BOUND
    assert [t.data_ptr() for t in (runner.hidden, runner.topk_ids, runner.topk_weights, runner.out)] == buffers
    # No op reads back or sizes its output from data, and the kernel sequence and every shape are the
    # same whatever the routing: what a captured graph needs.
    names = {n for n, _ in traces[0]}
    assert not names & {"aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::unique",
                        "aten::_unique2", "aten::bincount"}, names
    assert traces[0] == traces[1] == traces[2]


def test_the_no_host_read_trap_catches_the_loop_path(monkeypatch):
    # The check above can fail: the loop path reads the segment sizes once, and the trap sees it.
    layer, w = layer_and_weights("int8")
    b = accel("loop")
    p = b.prepare(layer, w, range(8), "int8")
    hidden, ids, tw = routing(2, 8, 3)
    with no_host_reads(monkeypatch), pytest.raises(AssertionError, match="host read Tensor.tolist"):
        b.compute(p, b.validate(p, hidden, ids, tw, torch.float32))


def test_decode_runner_ids_out_of_range_contribute_nothing_and_bad_calls_are_typed():
    layer, w = layer_and_weights("bf16")
    b = accel()
    p = b.prepare(layer, w, range(8), "bf16")
    runner = b.decode_runner(p, 2, hidden_dtype=torch.float32)
    hidden, ids, tw = routing(2, 8, 3)
    ok = b.forward(p, hidden, ids[:, :2].contiguous(), tw[:, :2].contiguous())
    bad = ids.clone()
    bad[:, 2] = torch.tensor([8, -1])  # unchecked path: no device fault, the pair contributes nothing
    assert torch.equal(runner.run(hidden, bad, tw), ok)
    with pytest.raises(ShapeError, match="batch size 2"):
        runner.run(hidden[:1], ids[:1], tw[:1])
    with pytest.raises(DeviceError):
        runner.run(hidden.to("meta"), ids, tw)
    with pytest.raises(FormatError, match="no synchronisation-free kernel computes int4_g32"):
        layer4, w4 = layer_and_weights("int4_g32")
        b.decode_runner(b.prepare(layer4, w4, range(8), "int4_g32"), 2)
    with pytest.raises(BackendUnavailable, match="graph capture needs a CUDA or HIP device"):
        b.decode_runner(p, 2, graph=True)
    with pytest.raises(ShapeError):
        b.decode_runner(p, 0)


# ---- probes on recorded inventories ----------------------------------------------------------------

CPU_ONLY = TorchBuild("2.13.0+cpu", grouped_mm=True, scaled_mm_blockwise=True)
CUDA_BUILD = TorchBuild("2.13.0+cu128", cuda="12.8", triton=True, grouped_mm=True, scaled_mm_blockwise=True)
ROCM_BUILD = TorchBuild("2.13.0+rocm6.3", hip="6.3", triton=True, grouped_mm=True, scaled_mm_blockwise=True)
NPU_BUILD = TorchBuild("2.13.0+cpu", torch_npu=True, grouped_mm=True)


def inv(name):
    return load_inventory(INVENTORIES / name)


def test_probe_cuda_on_the_rtx4090_server():
    i = inv("xeon_amx_2socket_rtx4090.json")
    p = probe_accelerator("cuda", i, CPU_ONLY)
    # The GPU is there, only the software is missing: unusable, and a downgrade --strict refuses.
    assert (p.score, p.downgrade) == (0, True)
    assert p.reason == ("found NVIDIA GeForce RTX 4090 (24 GiB, sm_89), but torch 2.13.0+cpu is a CPU-only "
                        "build: install a CUDA build of torch")
    p = probe_accelerator("cuda", i, CUDA_BUILD)
    assert p.usable and not p.downgrade
    assert p.reason == ("NVIDIA GeForce RTX 4090 (24 GiB, sm_89) as cuda:0: torch._grouped_mm for bf16 (rows of "
                        "16-byte multiples); Triton dequantize-GEMM for the other formats; graph capture: yes")
    # sm_89 has no blockwise fp8 scaled_mm; an H100 (sm_90) does.
    assert plan_kernels("cuda", "9.0", CUDA_BUILD).fp8_scaled_mm
    assert not plan_kernels("cuda", "8.9", CUDA_BUILD).fp8_scaled_mm
    assert "ROCm build" in probe_accelerator("cuda", i, ROCM_BUILD).reason
    assert probe_accelerator("rocm", i, ROCM_BUILD).reason == "no ROCm device found"


def test_probe_rocm_on_the_mi300x_box():
    i = inv("epyc_rocm_mi300x.json")
    p = probe_accelerator("rocm", i, ROCM_BUILD)
    assert p.usable
    assert p.reason == ("2x AMD Instinct MI300X (192 GiB, gfx942) as cuda:0: torch._grouped_mm for bf16 (rows "
                        "of 16-byte multiples); Triton dequantize-GEMM for the other formats; graph capture: yes")
    p = probe_accelerator("rocm", i, CUDA_BUILD)
    assert (p.score, p.downgrade) == (0, True) and "is not a ROCm build" in p.reason
    assert probe_accelerator("cuda", i, ROCM_BUILD).reason == "no CUDA device found"
    # MI250 (gfx90a): no grouped GEMM on HIP, Triton for everything.
    assert plan_kernels("rocm", "gfx90a", ROCM_BUILD).gemm_for("bf16", 4096, 1024) == "triton"


def test_probe_ascend_on_the_910b_box():
    i = inv("kunpeng_ascend_910b.json")
    p = probe_accelerator("npu", i, NPU_BUILD)
    assert p.usable
    assert p.reason == ("8x Ascend910B (64 GiB) as npu:0: torch_npu.npu_grouped_matmul for bf16/fp16; dequantize "
                        "per expert + matmul loop for the other formats; graph capture: no")
    p = probe_accelerator("npu", i, CPU_ONLY)
    assert (p.score, p.downgrade) == (0, True) and "torch_npu is not importable" in p.reason
    assert probe_accelerator("npu", inv("desktop_avx2_only.json"), CPU_ONLY).reason == \
        "torch_npu not importable: no Ascend support installed"


def test_registered_probes_on_this_machine_and_selection_per_inventory():
    reg = get_registry()
    assert {"cuda", "rocm", "ascend", "cpu.accel"} <= set(reg.backends)
    assert all(set(reg.backend(n).formats) == set(FORMATS) for n in ("cuda", "rocm", "ascend", "cpu.accel"))
    build = detect_build()
    sel = select_backends(reg, inv("xeon_amx_2socket_rtx4090.json"), force=[])
    v = sel.verdict("cuda")
    if build.cuda:
        assert v.chosen and v.probe.usable
    else:  # this machine's torch: the 4090 is found, the build cannot drive it
        assert not v.probe.usable and v.probe.downgrade and "RTX 4090" in v.probe.reason


def test_old_gpus_fall_back_to_the_loop():
    plan = plan_kernels("cuda", "7.0", CUDA_BUILD)  # V100: no grouped GEMM, below Triton's floor here
    assert plan.gemm_for("bf16", 4096, 1024) == "loop" and plan.decode_gemm_for("bf16", 4096, 1024) is None
    assert plan_kernels("cuda", "9.0", TorchBuild("2.13.0", cuda="12.8", grouped_mm=True)).gemm_for(
        "int4_g128", 4096, 1024) == "loop"  # no triton installed
