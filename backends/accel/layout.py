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


class _Stacker:
    """One matrix kind of every held expert, filled one expert at a time (each expert is read from its
    source once and dropped), straight into device tensors."""

    def __init__(self, fmt: WeightFormat, held: int, n: int, k: int, device: torch.device, dtype: torch.dtype,
                 fused_rows: tuple[int, ...]):
        self.fmt, self.n, self.k, self.device, self.dtype = fmt, n, k, device, dtype
        self.fused_rows = fused_rows
        self.held = held
        self.data = self.scales = None

    def put(self, slot: int, parts: list) -> None:
        data = torch.cat([q.data for q in parts], dim=0)
        if self.fmt.kind == "float":
            data = data.to(self.dtype)
        if self.data is None:
            self.data = torch.empty((self.held,) + tuple(data.shape), dtype=data.dtype, device=self.device)
        self.data[slot].copy_(data)
        if self.fmt.kind != "float":
            scales = torch.cat([q.scales for q in parts], dim=0)
            if self.scales is None:
                self.scales = torch.empty((self.held,) + tuple(scales.shape), dtype=scales.dtype, device=self.device)
            self.scales[slot].copy_(scales)

    def done(self) -> WeightStack:
        scale_rows = None
        if self.fmt.kind == "fp8":
            rows, base = [], 0
            for r in self.fused_rows:
                rows.append(base + torch.arange(r) // FP8_BLOCK)
                base += math.ceil(r / FP8_BLOCK)
            scale_rows = torch.cat(rows).to(device=self.device, dtype=torch.int64)
        return WeightStack(self.fmt, self.n, self.k, self.data, self.scales, scale_rows)


def pack_experts(layer: ExpertLayerSpec, fmt: WeightFormat, experts: Mapping[int, ExpertTensors],
                 device: torch.device) -> DeviceExperts:
    """`experts` may read each expert from its source on access: each is accessed exactly once."""
    ids = sorted(experts)
    E, H, I = layer.num_experts, layer.hidden_size, layer.intermediate_size
    cdt = compute_dtype(fmt)
    slot_of = torch.full((E + 1,), len(ids), dtype=torch.int64)
    w13 = _Stacker(fmt, len(ids), 2 * I, H, device, cdt, (I, I))
    w2 = _Stacker(fmt, len(ids), H, I, device, cdt, (H,))
    b13 = b2 = None
    if layer.has_bias:
        b13 = torch.zeros(len(ids) + 1, 2 * I, dtype=torch.float32)
        b2 = torch.zeros(len(ids) + 1, H, dtype=torch.float32)
    for s, e in enumerate(ids):
        slot_of[e] = s
        t = experts[e]
        w13.put(s, [t.gate, t.up])
        w2.put(s, [t.down])
        if b13 is not None:
            b13[s, :I], b13[s, I:], b2[s] = t.gate_bias, t.up_bias, t.down_bias
    if b13 is not None:
        b13, b2 = b13.to(device), b2.to(device)
    return DeviceExperts(layer, fmt, device, cdt, len(ids), slot_of.to(device), w13.done(), w2.done(), b13, b2)
