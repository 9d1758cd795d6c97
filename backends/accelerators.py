"""cuda, rocm, ascend and cpu.accel: the accelerator backend (moetier.backends.accel) registered once per
device kind, plus once on the CPU so every test run puts the accelerator code through the conformance
suite. Probes read the inventory and the torch build only; the factory imports the compute code."""
from __future__ import annotations

import torch

from moetier import BackendSpec, hookimpl
from moetier.errors import BackendUnavailable
from moetier.formats import FORMATS

from .accel.build import detect_build
from .accel.plan import plan_kernels
from .accel.probes import probe_accelerator, probe_cpu_accel

# name -> (device kind of the inventory and BackendSpec, torch device type, description)
ACCELERATORS = {
    "cuda": ("cuda", "cuda", "NVIDIA GPUs through torch (grouped GEMM, Triton dequantize-GEMM, CUDA graphs)"),
    "rocm": ("rocm", "cuda", "AMD GPUs through torch's HIP build (the cuda backend's code)"),
    "ascend": ("npu", "npu", "Huawei Ascend NPUs through torch_npu (npu_grouped_matmul where importable)"),
}


def _usable_plan(kind: str, capability: str | None):
    plan = plan_kernels(kind, capability, detect_build())
    if plan.triton:
        try:
            from .accel import triton_moe  # noqa: F401  (compiles nothing yet; checks triton really imports)
        except Exception as exc:  # a broken triton must not take the backend down: say so, use the torch paths
            from dataclasses import replace

            plan = replace(plan, triton=False, notes=plan.notes + (f"triton failed to import: {exc}",))
    return plan


def _factory(name: str):
    kind, torch_type, _ = ACCELERATORS[name]

    def make(inv, **kwargs):
        from .accel.backend import AccelBackend

        devs = inv.accelerators_of(kind)
        if not devs:
            raise BackendUnavailable(f"{name}: no device of kind {kind} in the inventory")
        if kind == "npu":
            try:
                import torch_npu  # noqa: F401  (registers the npu device with torch)
            except Exception as exc:
                raise BackendUnavailable(f"{name}: torch_npu failed to import: {exc}") from None
        plan = _usable_plan(kind, devs[0].capability)
        return AccelBackend(name, torch.device(torch_type, devs[0].index), plan, **kwargs)

    return make


def _make_cpu_accel(inv, **kwargs):
    from .accel.backend import AccelBackend

    return AccelBackend("cpu.accel", torch.device("cpu"), plan_kernels("cpu", None, detect_build()), **kwargs)


def _probe(kind: str):
    return lambda inv: probe_accelerator(kind, inv, detect_build())


@hookimpl
def moetier_register_backends(register):
    for name, (kind, _, description) in ACCELERATORS.items():
        register(BackendSpec(name=name, device=kind, formats=tuple(FORMATS), probe=_probe(kind),
                             factory=_factory(name), description=description))
    register(BackendSpec(name="cpu.accel", device="cpu", formats=tuple(FORMATS),
                         probe=lambda inv: probe_cpu_accel(detect_build()), factory=_make_cpu_accel,
                         description="the accelerator backend's code on the CPU (testing; never chosen automatically)"))
