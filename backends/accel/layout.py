"""The device layout of a prepared layer: the held experts' matrices stacked per kind, gate and up
fused into one [2I, H] matrix per expert, on the backend's device.

Quantized formats keep their storage (codes and fp32 scales, the reference layout of moetier.formats);
kernels dequantize on the fly. Gate and up rows are concatenated, so per-row scales (int8) and per-row
groups (int4) concatenate as they are; fp8's 128-row blocks do not straddle the seam because each row
carries the index of its own scale row (`scale_rows`), gate blocks first, then up blocks.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from moetier.experts import ExpertLayerSpec, ExpertTensors
from moetier.formats import FP8_BLOCK, WeightFormat


def compute_dtype(fmt: WeightFormat) -> torch.dtype:
    """The dtype GEMM operands are in: the float formats' own, bf16 for the quantized ones (their codes
    are exact in bf16; scales are applied in fp32)."""
    return fmt.dtype if fmt.kind == "float" else torch.bfloat16


@dataclass(frozen=True, eq=False)
class WeightStack:
    """One matrix kind of every held expert: data [S, N, K] (int4: [S, N, ceil(K/2)] bytes), scales
    [S, N] (int8), [S, N, ceil(K/g)] (int4), [S, blocks_n, ceil(K/128)] (fp8); scale_rows [N] (fp8):
    the scale row of each output row."""

    fmt: WeightFormat
    n: int
    k: int
    data: torch.Tensor
    scales: torch.Tensor | None = None
    scale_rows: torch.Tensor | None = None

    @property
    def kind(self) -> str:
        return self.fmt.kind


@dataclass(frozen=True, eq=False)
class DeviceExperts:
    """A prepared layer on the device. Slots 0..held-1 are the held experts in id order; slot_of maps an
    expert id (and one sentinel id, E, for anything not held) to its slot, `held` meaning "not held"."""

    layer: ExpertLayerSpec
    fmt: WeightFormat
    device: torch.device
    compute_dtype: torch.dtype
    held: int
    slot_of: torch.Tensor  # int64 [E + 1]
    w13: WeightStack  # [S, 2I, H]
    w2: WeightStack  # [S, H, I]
    b13: torch.Tensor | None = None  # fp32 [S + 1, 2I], last row zero (the not-held slot)
    b2: torch.Tensor | None = None  # fp32 [S + 1, H]


def _stack(fmt: WeightFormat, mats: list, n: int, k: int, device: torch.device, dtype: torch.dtype,
           fused_rows: tuple[int, int] | None = None) -> WeightStack:
    """Stack one matrix per expert; `mats` holds per expert a list of QuantizedTensors concatenated by rows."""
    data = torch.stack([torch.cat([q.data for q in parts], dim=0) for parts in mats])
    if fmt.kind == "float":
        return WeightStack(fmt, n, k, data.to(device=device, dtype=dtype).contiguous())
    scales = torch.stack([torch.cat([q.scales for q in parts], dim=0) for parts in mats])
    scale_rows = None
    if fmt.kind == "fp8":
        rows = []
        base = 0
        for r in fused_rows or (n,):
            rows.append(base + torch.arange(r) // FP8_BLOCK)
            base += math.ceil(r / FP8_BLOCK)
        scale_rows = torch.cat(rows).to(device=device, dtype=torch.int64)
    return WeightStack(fmt, n, k, data.to(device).contiguous(), scales.to(device).contiguous(), scale_rows)


def pack_experts(layer: ExpertLayerSpec, fmt: WeightFormat, experts: Mapping[int, ExpertTensors],
                 device: torch.device) -> DeviceExperts:
    ids = sorted(experts)
    E, H, I = layer.num_experts, layer.hidden_size, layer.intermediate_size
    cdt = compute_dtype(fmt)
    slot_of = torch.full((E + 1,), len(ids), dtype=torch.int64)
    for s, e in enumerate(ids):
        slot_of[e] = s
    w13 = _stack(fmt, [[experts[e].gate, experts[e].up] for e in ids], 2 * I, H, device, cdt, fused_rows=(I, I))
    w2 = _stack(fmt, [[experts[e].down] for e in ids], H, I, device, cdt)
    b13 = b2 = None
    if layer.has_bias:
        b13 = torch.zeros(len(ids) + 1, 2 * I, dtype=torch.float32)
        b2 = torch.zeros(len(ids) + 1, H, dtype=torch.float32)
        for s, e in enumerate(ids):
            t = experts[e]
            b13[s, :I], b13[s, I:], b2[s] = t.gate_bias, t.up_bias, t.down_bias
        b13, b2 = b13.to(device), b2.to(device)
    return DeviceExperts(layer, fmt, device, cdt, len(ids), slot_of.to(device), w13, w2, b13, b2)
