"""Dense matrices on an expert backend's kernels.

A decode step reads every dense weight once (attention projections, dense MLPs, shared experts, the LM
head): on a CPU-only machine that is as many bytes as the routed experts it reads (Qwen3-30B-A3B: 0.44 GB
of dense weights against 0.60 GB of top-8 experts in bf16). A backend whose kernels stream expert
matrices at the memory limit computes these with the same kernels when it declares `dense_formats`;
`ExpertBackend.pack_linear` / `linear` are the contract, `PackedLinear` what crosses it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import DeviceError, DTypeError, PreparedExpertsError, ShapeError
from .formats import WeightFormat

LINEAR_DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class PackedLinear:
    """One matrix W [out_features, in_features] (and a bias) in a backend's layout: y = x W^T + b.

    groups G > 1: a block-diagonal matrix of G blocks [out_features / G, in_features / G] (multi-head latent
    attention's per-head W_kb / W_vb), stored as the blocks stacked [out_features, in_features / G]: block g
    multiplies x's columns [g, g + 1) * in_features / G into outputs [g, g + 1) * out_features / G."""

    backend: str
    fmt: WeightFormat
    out_features: int
    in_features: int  # x's width (all groups)
    has_bias: bool
    nbytes: int  # what the packed form occupies (padding and scales included)
    payload: Any = field(repr=False, compare=False)
    groups: int = 1


def check_linear_input(backend: str, packed: PackedLinear, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """x as the kernels take it ([T, in_features], float32 or bfloat16, contiguous, on the CPU), detached."""
    if not isinstance(packed, PackedLinear) or packed.backend != backend:
        got = packed.backend if isinstance(packed, PackedLinear) else type(packed).__name__
        raise PreparedExpertsError(f"backend {backend} got a matrix packed by {got}; pack it with this backend's "
                                   f"pack_linear()")
    if not isinstance(x, torch.Tensor):
        raise DTypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.device.type != "cpu":
        raise DeviceError(f"x is on {x.device}, but backend {backend} computes dense matrices on the CPU")
    if x.ndim != 2 or x.shape[1] != packed.in_features:
        raise ShapeError(f"x must be [T, {packed.in_features}], got {list(x.shape)}")
    if x.dtype not in LINEAR_DTYPES or out_dtype not in LINEAR_DTYPES:
        raise DTypeError(f"x and the output must be float32 or bfloat16, got {x.dtype} -> {out_dtype}")
    return x.detach().contiguous()
