"""Decode-time dense linear layers on the CPU: torch's bf16 matrix-vector product is slow.

At decode a dense linear layer (attention projections, LM head) multiplies one or a few rows by a bf16
weight. On the CPU torch computes that through its bf16 GEMM path, which streams the weight at a few GB/s
(measured here: 2-12 GB/s for the Qwen3-30B-A3B projections and LM head, against 20+ GB/s for the fp32
GEMV of the same weight, whose bytes are twice as many). `fp32_decode_linears` gives each dense
`nn.Linear` an fp32 copy of its weight used for inputs of at most `max_rows` rows; larger inputs (prefill)
keep the bf16 path, where the GEMM is compute-bound and bf16 is the faster one.

Numerics: a bf16 x bf16 product is exact in fp32 and both paths accumulate in fp32 and round the result
to the input's dtype, so the two differ only in summation order. Memory: the fp32 copies cost twice the
dense weights' bytes beside them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ATTR = "moetier_fp32_weight"


def fp32_decode_linears(model: torch.nn.Module, *, max_rows: int = 8) -> int:
    """Give every bf16/fp16 `nn.Linear` outside the routed experts an fp32 weight for inputs of at most
    `max_rows` rows; returns how many layers were changed (idempotent)."""
    changed = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or ".experts." in f".{name}.":
            continue
        if module.weight.dtype not in (torch.bfloat16, torch.float16) or module.weight.device.type != "cpu":
            continue
        if getattr(module, ATTR, None) is None:
            setattr(module, ATTR, module.weight.detach().float().contiguous())
            module.forward = _forward(module, max_rows)
        changed += 1
    return changed


def _forward(module: torch.nn.Linear, max_rows: int):
    bf16_forward = module.forward
    w32 = getattr(module, ATTR)
    b32 = None if module.bias is None else module.bias.detach().float()

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.numel() // max(1, x.shape[-1]) > max_rows:
            return bf16_forward(x)
        return F.linear(x.float(), w32, b32).to(x.dtype)

    return forward
