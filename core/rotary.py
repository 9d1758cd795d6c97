"""Rotary position embedding of attention heads on an expert backend's kernels, after an optional
per-head RMSNorm (Qwen3's q/k norms).

In torch, a decode step's q/k norms and rotary embedding are ~10 operators per layer (~45 us on a CPU).
A backend that declares `rotary_dtypes` computes them in one call; `ExpertBackend.rotary` is the contract,
`check_rotary_inputs` what it accepts and `reference_rotary` the float64 math.

The convention is transformers' `apply_rotary_pos_emb` with rotate-half over the first R dims of each
head (R = cos.shape[-1]; the rest pass through, as partial-rotary models keep them), cos and sin the
rotary module's output for the tokens' positions: y = x * cos + rotate_half(x) * sin, each operator
rounded to x's dtype, after `moetier.norm`'s RMSNorm of each head when a norm weight is given.
"""
from __future__ import annotations

import math

import torch

from .errors import DeviceError, DTypeError, ShapeError
from .norm import NORM_DTYPES, check_rms_norm_inputs, reference_rms_norm

ROTARY_DTYPES = NORM_DTYPES
MAX_HEAD_SIZE = 1024


def check_rotary_inputs(backend: str, dtypes, x, cos, sin, norm_weight, eps) -> None:
    """Raise a typed error naming what is wrong with a rotary call."""
    for name, t in (("x", x), ("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor):
            raise DTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type != "cpu":
            raise DeviceError(f"{name} is on {t.device}, but backend {backend} computes rotary embeddings on the CPU")
    if not (x.dtype == cos.dtype == sin.dtype) or x.dtype not in dtypes:
        have = ", ".join(str(d).removeprefix("torch.") for d in dtypes) or "none"
        raise DTypeError(f"backend {backend} computes rotary embeddings on x, cos and sin of one dtype of: {have}; "
                         f"got {x.dtype}, {cos.dtype}, {sin.dtype}")
    if x.ndim != 3 or cos.ndim != 2 or sin.shape != cos.shape or cos.shape[0] != x.shape[0]:
        raise ShapeError(f"x must be [T, heads, D] and cos / sin [T, R], got {list(x.shape)}, {list(cos.shape)}, "
                         f"{list(sin.shape)}")
    R, D = cos.shape[1], x.shape[2]
    if R % 2 or R > D or D > MAX_HEAD_SIZE:
        raise ShapeError(f"the rotary dims R={R} must be even and at most the head size {D} (itself at most "
                         f"{MAX_HEAD_SIZE})")
    if norm_weight is not None:
        check_rms_norm_inputs(backend, dtypes, x, norm_weight, eps)
    elif not isinstance(eps, (int, float)) or not math.isfinite(eps):
        raise DTypeError(f"eps must be a finite number, got {eps!r}")


def reference_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, norm_weight: torch.Tensor | None = None,
                     eps: float = 0.0) -> torch.Tensor:
    """The math in float64 (no roundings): each head RMS-normalized with norm_weight when given, then
    x * cos + rotate_half(x) * sin over the first R dims; x [T, H, D], cos / sin [T, R]."""
    x = x.to(torch.float64) if norm_weight is None else reference_rms_norm(x, norm_weight, eps)
    R = cos.shape[-1]
    rot, rest = x[..., :R], x[..., R:]
    x1, x2 = rot[..., :R // 2], rot[..., R // 2:]
    c, s = cos.to(torch.float64)[:, None, :], sin.to(torch.float64)[:, None, :]
    return torch.cat((rot * c + torch.cat((-x2, x1), dim=-1) * s, rest), dim=-1)
