"""RMSNorm on an expert backend's kernels.

A decode step normalizes one row per layer four times or more (before attention and before the MLP, the
per-head q/k norms of Qwen3, the latent norms of DeepSeek's MLA, the final norm): in torch each is six
operators, ~25 us on a CPU, ~0.8 ms of a Qwen3-30B-A3B-dimension step. A backend that declares
`norm_dtypes` computes it with its own kernels; `ExpertBackend.rms_norm` is the contract,
`check_rms_norm_inputs` what it accepts and `reference_rms_norm` the float64 math.

The convention is transformers' Llama-family RMSNorm (LlamaRMSNorm, Qwen3MoeRMSNorm, DeepseekV3RMSNorm,
...): in fp32, n = x * (1 / sqrt(mean(x^2) + eps)); n rounded to x's dtype; y = weight * n in that dtype
(one more rounding in bf16). Variants with another formula (Gemma's and Qwen3-Next's 1 + weight, gated
norms) are not this operation.
"""
from __future__ import annotations

import math

import torch

from .errors import DeviceError, DTypeError, ShapeError

NORM_DTYPES = (torch.float32, torch.bfloat16)


def check_rms_norm_inputs(backend: str, dtypes, x, weight, eps) -> None:
    """Raise a typed error naming what is wrong with an rms_norm call."""
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise DTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type != "cpu":
            raise DeviceError(f"{name} is on {t.device}, but backend {backend} computes norms on the CPU")
    if x.dtype != weight.dtype or x.dtype not in dtypes:
        have = ", ".join(str(d).removeprefix("torch.") for d in dtypes) or "none"
        raise DTypeError(f"backend {backend} computes RMSNorm on x and weight of one dtype of: {have}; got "
                         f"{x.dtype}, {weight.dtype}")
    if weight.ndim != 1 or x.ndim < 1 or x.shape[-1] != weight.shape[0]:
        raise ShapeError(f"weight must be [D] and x [..., D], got {list(weight.shape)} and {list(x.shape)}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not math.isfinite(eps) or eps < 0:
        raise DTypeError(f"eps must be a finite number >= 0, got {eps!r}")


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps) over the last dimension, in float64 (no roundings)."""
    x64 = x.to(torch.float64)
    return weight.to(torch.float64) * (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps))
