"""Probes of the accelerator backends: the hardware from the inventory, the software from the torch
build (both cheap: no driver call, no heavy import), and the kernel plan the backend would run."""
from __future__ import annotations

from moetier import Probe

from .build import TorchBuild
from .plan import plan_kernels

LABELS = {"cuda": "CUDA", "rocm": "ROCm", "npu": "Ascend NPU"}
SCORE = 100  # the only backend of its device kind; the number only has to be positive


def describe_devices(devs) -> str:
    d = devs[0]
    cap = ""
    if d.kind == "cuda" and d.capability:
        cap = ", sm_" + d.capability.replace(".", "")
    elif d.kind == "rocm" and d.capability:
        cap = ", " + d.capability
    count = f"{len(devs)}x " if len(devs) > 1 else ""
    return f"{count}{d.name} ({d.memory_bytes / 2**30:.0f} GiB{cap})"


def software_problem(kind: str, build: TorchBuild) -> str | None:
    """Why this torch build cannot drive a device of `kind` (None: it can)."""
    v = build.torch_version
    if kind == "cuda":
        if build.hip:
            return f"torch {v} is a ROCm build: install a CUDA build of torch"
        if not build.cuda:
            return f"torch {v} is a CPU-only build: install a CUDA build of torch"
    elif kind == "rocm":
        if not build.hip:
            return f"torch {v} is not a ROCm build: install torch for ROCm"
    elif kind == "npu":
        if not build.torch_npu:
            return f"torch_npu is not importable: install the torch_npu matching torch {v}"
    return None


def probe_accelerator(kind: str, inventory, build: TorchBuild) -> Probe:
    devs = inventory.accelerators_of(kind)
    if not devs:
        if kind == "npu" and not build.torch_npu:
            return Probe(0, "torch_npu not importable: no Ascend support installed")
        return Probe(0, f"no {LABELS[kind]} device found")
    found = describe_devices(devs)
    problem = software_problem(kind, build)
    if problem:
        # The hardware is there and only software is missing: choosing the CPU instead is a downgrade.
        return Probe(0, f"found {found}, but {problem}", downgrade=True)
    plan = plan_kernels(kind, devs[0].capability, build)
    device = "npu:0" if kind == "npu" else "cuda:0"
    return Probe(SCORE, f"{found} as {device}: {plan.describe()}")


def probe_cpu_accel(build: TorchBuild) -> Probe:
    plan = plan_kernels("cpu", None, build)
    # Score 1: below cpu.torch (10), which always runs, so selection never picks this one by itself.
    return Probe(1, f"the accelerator code path on the CPU, for testing it; never chosen automatically: "
                    f"{plan.describe()}")
