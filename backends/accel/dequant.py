"""The torch fallback of on-the-fly dequantization: one expert's stacked matrix to the compute dtype,
with the reference formats' arithmetic (code x fp32 scale, in fp32, rounded once)."""
from __future__ import annotations

import torch

from moetier.formats import FP8_BLOCK, unpack_int4

from .layout import WeightStack


def dequantize_slot(stack: WeightStack, slot: int, dtype: torch.dtype) -> torch.Tensor:
    """Slot `slot` of `stack` as a [N, K] matrix in `dtype`."""
    data = stack.data[slot]
    if stack.kind == "float":
        return data.to(dtype)
    scales = stack.scales[slot]
    if stack.kind == "int8":
        w = data.to(torch.float32) * scales[:, None]
    elif stack.kind == "int4":
        g = stack.fmt.group_size
        w = unpack_int4(data, stack.k).to(torch.float32) * scales.repeat_interleave(g, dim=1)[:, :stack.k]
    elif stack.kind == "fp8":
        per_row = scales.index_select(0, stack.scale_rows)  # [N, ceil(K/128)]
        w = data.to(torch.float32) * per_row.repeat_interleave(FP8_BLOCK, dim=1)[:, :stack.k]
    else:
        raise ValueError(f"no dequantizer for {stack.fmt}")
    return w.to(dtype)
