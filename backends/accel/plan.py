"""Which kernel computes what, per device kind: one pure function of the device kind, its compute
capability and the torch build. The probe reports this plan and the backend runs it, so what `moetier
doctor` says is what runs."""
from __future__ import annotations

from dataclasses import dataclass

from .build import TorchBuild

FLOAT_FORMATS = ("fp32", "bf16", "fp16")
ELEMENT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class KernelPlan:
    """The kernels that apply on one device.

    grouped: the grouped GEMM over expert-sorted tokens ("torch._grouped_mm",
    "torch_npu.npu_grouped_matmul" or None), for the float formats in `grouped_formats`, when hidden and
    intermediate rows are multiples of `grouped_align_bytes` long (its kernels need 16-byte strides). triton: the fused dequantize-GEMM Triton kernel
    (every format, device-side routing). graphs: a decode step can be captured in a device graph.
    fp8_scaled_mm: blockwise fp8 x fp8 scaled matmul exists here (used only when asked for: it quantizes
    activations to fp8). notes: why a kernel does not apply.
    """

    device_kind: str
    grouped: str | None = None
    grouped_formats: tuple[str, ...] = ()
    grouped_align_bytes: int = 16
    triton: bool = False
    graphs: bool = False
    fp8_scaled_mm: bool = False
    notes: tuple[str, ...] = ()

    def gemm_for(self, fmt: str, hidden: int, intermediate: int) -> str:
        """The GEMM path of a forward: "grouped", "triton", or "loop" (a host-synchronised loop of
        matmuls over the expert segments, dequantizing each used expert)."""
        if self.grouped_fits(fmt, hidden, intermediate):
            return "grouped"
        return "triton" if self.triton else "loop"

    def decode_gemm_for(self, fmt: str, hidden: int, intermediate: int) -> str | None:
        """The GEMM path of the synchronisation-free decode step, or None when no kernel here has one."""
        path = self.gemm_for(fmt, hidden, intermediate)
        return None if path == "loop" else path

    def grouped_fits(self, fmt: str, hidden: int, intermediate: int) -> bool:
        if self.grouped is None or fmt not in self.grouped_formats:
            return False
        align = self.grouped_align_bytes
        return (hidden * ELEMENT_BYTES[fmt]) % align == 0 and (intermediate * ELEMENT_BYTES[fmt]) % align == 0

    def describe(self) -> str:
        parts = []
        if self.grouped:
            align = f" (rows of {self.grouped_align_bytes}-byte multiples)" if self.grouped_align_bytes > 1 else ""
            parts.append(f"{self.grouped} for {'/'.join(self.grouped_formats)}{align}")
        if self.triton:
            parts.append("Triton dequantize-GEMM for the other formats")
        else:
            parts.append("dequantize per expert + matmul loop for the other formats")
        if self.fp8_scaled_mm:
            parts.append("blockwise fp8 scaled_mm (opt-in)")
        parts.append("graph capture: " + ("yes" if self.graphs else "no"))
        return "; ".join(parts)


def _cuda_capability(capability: str | None) -> tuple[int, int] | None:
    try:
        major, minor = (capability or "").split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return None


def plan_kernels(kind: str, capability: str | None, build: TorchBuild) -> KernelPlan:
    """The kernel plan for a device of `kind` ("cuda", "rocm", "npu" or "cpu") and `capability` ("9.0",
    "gfx942"), given what the torch build has."""
    notes: list[str] = []
    if kind == "cpu":
        grouped = "torch._grouped_mm" if build.grouped_mm else None
        if grouped is None:
            notes.append(f"torch {build.torch_version} has no torch._grouped_mm")
        return KernelPlan("cpu", grouped, FLOAT_FORMATS if grouped else (), 16, triton=False, graphs=False,
                          notes=tuple(notes) + ("Triton does not compile for the CPU",))
    if kind == "cuda":
        cc = _cuda_capability(capability)
        grouped_ok = build.grouped_mm and cc is not None and cc >= (8, 0)
        if not grouped_ok:
            notes.append("torch._grouped_mm needs sm_80 or newer" if build.grouped_mm
                         else f"torch {build.torch_version} has no torch._grouped_mm")
        triton_ok = build.triton and cc is not None and cc >= (7, 5)
        if not build.triton:
            notes.append("triton is not installed")
        fp8 = build.scaled_mm_blockwise and cc is not None and cc >= (9, 0)
        # CUTLASS grouped GEMM: bf16 only, K and N 16-byte aligned.
        return KernelPlan("cuda", "torch._grouped_mm" if grouped_ok else None, ("bf16",) if grouped_ok else (), 16,
                          triton=triton_ok, graphs=True, fp8_scaled_mm=fp8, notes=tuple(notes))
    if kind == "rocm":
        # torch._grouped_mm runs on MI300-class GPUs (gfx942/gfx950) through its fallback path; gfx90a
        # (MI250) is not supported (pytorch issues 161366, 166816).
        arch = capability or ""
        grouped_ok = build.grouped_mm and arch.startswith(("gfx942", "gfx950"))
        if not grouped_ok:
            notes.append(f"torch._grouped_mm not used on {arch or 'this GPU'} (supported on gfx942/gfx950)")
        if not build.triton:
            notes.append("triton is not installed")
        return KernelPlan("rocm", "torch._grouped_mm" if grouped_ok else None, ("bf16",) if grouped_ok else (), 16,
                          triton=build.triton, graphs=True, notes=tuple(notes))
    if kind == "npu":
        grouped = "torch_npu.npu_grouped_matmul" if build.torch_npu else None
        notes.append("no Triton path on Ascend; no graph capture in this backend")
        return KernelPlan("npu", grouped, ("bf16", "fp16") if grouped else (), 1, triton=False, graphs=False,
                          notes=tuple(notes))
    raise ValueError(f"unknown device kind {kind!r}")
