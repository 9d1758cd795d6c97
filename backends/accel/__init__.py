"""The accelerator backend: one torch implementation of the expert contract for CUDA, ROCm (HIP builds
of the same code), Ascend (torch_npu) and, for testing the same code path everywhere, the CPU.

Modules, one per concern: build (what the torch build has), plan (which kernel runs what, per device),
probes, layout (experts stacked on the device), routing (tokens sorted by expert), gemm (the grouped
GEMM three ways), dequant (the torch dequantize fallback), triton_moe (the fused dequantize-GEMM Triton
kernel), forward (one MoE forward), decode (the synchronisation-free decode step), backend
(AccelBackend). The plugin that registers it is moetier.backends.accelerators.
"""
from .build import TorchBuild, detect_build
from .plan import KernelPlan, plan_kernels

__all__ = ["TorchBuild", "detect_build", "KernelPlan", "plan_kernels"]
