"""The grouped GEMM of one weight stack over expert-sorted rows, three ways:

- "grouped": one grouped-GEMM call (torch._grouped_mm, or torch_npu.npu_grouped_matmul on Ascend) with
  the segment ends on the device: no host synchronisation;
- "triton": the fused dequantize-GEMM kernel of triton_moe (every format, device-side routing);
- "loop": one host read of the segment sizes, then per used expert: dequantize, matmul.

Each returns Y [N, n_out] in sorted-pair order (the grouped kernels in the compute dtype, the others
in fp32). Rows of pairs no held expert serves are unspecified
(the grouped kernels leave them unwritten); the caller masks them.
"""
from __future__ import annotations

import torch

from .dequant import dequantize_slot
from .layout import WeightStack
from .routing import Dispatch

GEMM_PATHS = ("grouped", "triton", "loop")
# Up to this many (token, expert) pairs a bf16 GEMM splits its fp32 activations into a bf16 high part
# and a bf16 remainder (two rows, or two dots, against the same weights): the input then carries ~16
# significant bits instead of 8. Such GEMMs are bandwidth-bound (few rows per expert), so the second
# row costs no weight traffic; above it, rounding errors of many rows average out instead.
SPLIT_MAX_PAIRS = 256


def split_activations(d: Dispatch, dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and d.pairs <= SPLIT_MAX_PAIRS


def grouped_gemm(a: torch.Tensor, a_rows: torch.Tensor | None, stack: WeightStack, d: Dispatch, path: str,
                 dtype: torch.dtype, *, split: bool = False, grouped_impl: str | None = None) -> torch.Tensor:
    """Y[i] = A[a_rows[i]] @ W_{slot(i)}^T for every sorted pair i (a_rows None: row i of A).

    A is fp32; the path rounds it to the compute dtype `dtype` (split: into two bf16 parts) except the
    loop, which computes in fp32 throughout.
    """
    if path == "triton":
        from .triton_moe import moe_gemm

        rows = a_rows if a_rows is not None else torch.arange(d.pairs, device=a.device)
        return moe_gemm(a if split else a.to(dtype), rows, stack, d, split=split)
    x = a.index_select(0, a_rows) if a_rows is not None else a
    if path == "grouped":
        if not split:
            return _grouped(x.to(dtype), stack, d.ends, grouped_impl)
        hi = x.to(dtype)
        lo = (x - hi.to(x.dtype)).to(dtype)
        # hi and lo of each row side by side: every expert segment doubles, the weights are read once.
        y2 = _grouped(torch.stack([hi, lo], dim=1).view(2 * d.pairs, -1), stack, d.ends * 2, grouped_impl)
        y2 = y2.view(d.pairs, 2, -1).to(torch.float32)
        return y2[:, 0] + y2[:, 1]
    if path == "loop":
        return _loop(x, stack, d)
    raise ValueError(f"unknown GEMM path {path!r}; known: {', '.join(GEMM_PATHS)}")


def _grouped(x: torch.Tensor, stack: WeightStack, ends: torch.Tensor, impl: str | None) -> torch.Tensor:
    if impl == "torch_npu.npu_grouped_matmul":
        import torch_npu  # the factory imported it already; this names the op's namespace

        return torch_npu.npu_grouped_matmul([x], [stack.data.transpose(1, 2)], group_list=ends, split_item=3,
                                            group_type=0, group_list_type=0)[0]
    return torch._grouped_mm(x, stack.data.transpose(1, 2), offs=ends.to(torch.int32))


def _loop(x: torch.Tensor, stack: WeightStack, d: Dispatch) -> torch.Tensor:
    # The fallback favours accuracy over speed: weights dequantized exactly to fp32, fp32 activations,
    # products and sums, an fp32 result.
    y = torch.zeros(d.pairs, stack.n, dtype=torch.float32, device=x.device)
    xf = x.to(torch.float32)
    counts = d.counts[:d.held].tolist()  # the one host synchronisation of this path
    start = 0
    for slot, n in enumerate(counts):
        if n:
            w = dequantize_slot(stack, slot, torch.float32)
            torch.matmul(xf[start:start + n], w.T, out=y[start:start + n])
        start += n
    return y
