"""cuda, rocm, ascend: accelerator backends. Their probes are honest about the hardware today; the
compute lands with their own issues, so none of them is usable yet."""
from __future__ import annotations

import importlib.util

from moetier import BackendSpec, Probe, hookimpl


def _gpu_probe(kind: str, label: str):
    def probe(inv):
        devs = inv.accelerators_of(kind)
        if not devs:
            return Probe(0, f"no {label} device found")
        names = ", ".join(f"{d.name} ({d.memory_bytes / 2**30:.0f} GiB)" for d in devs)
        return Probe(0, f"{label} backend not built yet (found {names})", downgrade=True)
    return probe


def _ascend_probe(inv):
    devs = inv.accelerators_of("npu")
    if not devs:
        if importlib.util.find_spec("torch_npu") is None:
            return Probe(0, "torch_npu not importable: no Ascend support installed")
        return Probe(0, "no Ascend NPU found")
    return Probe(0, f"ascend backend not built yet (found {len(devs)} NPU)", downgrade=True)


@hookimpl
def moetier_register_backends(register):
    register(BackendSpec(name="cuda", device="cuda", formats=(), probe=_gpu_probe("cuda", "CUDA"),
                         factory=lambda inv: None, description="NVIDIA GPUs through torch"))
    register(BackendSpec(name="rocm", device="rocm", formats=(), probe=_gpu_probe("rocm", "ROCm"),
                         factory=lambda inv: None, description="AMD GPUs through torch (HIP)"))
    register(BackendSpec(name="ascend", device="npu", formats=(), probe=_ascend_probe,
                         factory=lambda inv: None, description="Huawei Ascend NPUs through torch_npu"))
