"""The fused dequantize-GEMM Triton kernel over expert-sorted rows, for every moetier format.

Rows are laid out in blocks of BLOCK_M that each belong to one expert (each expert's segment padded up
to a multiple of BLOCK_M, as vLLM's fused_moe does); the block -> expert table and the padded row list
are built on the device from the Dispatch, with sizes that depend only on N = T*k, so the launch grid
is fixed and nothing is read back to the host. Weights are read in their storage format and decoded in
registers: int4 nibbles and fp8 e4m3 bytes become exact bf16 codes, and the scales multiply the fp32
partial sums (per K block for int4 groups and fp8 128x128 blocks, once per row for int8), so the
weights are used exactly and only the activations are rounded (to bf16).

Imported only when the plan uses Triton. On CPU tensors Triton runs only under its interpreter
(TRITON_INTERPRET=1, set before triton is imported): the tests use it to check this kernel without a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .layout import WeightStack
from .routing import Dispatch

KIND = {"float": 0, "int8": 1, "int4": 2, "fp8": 3}
BLOCK_M = 16  # tl.dot needs M >= 16; decode has few rows per expert, so the smallest block


@triton.jit
def _moe_gemm_kernel(
    a_ptr, a_rows_ptr, stride_am,
    b_ptr, stride_be, stride_bn,
    s_ptr, stride_se, stride_sn, stride_sk,
    srow_ptr,
    c_ptr, stride_cm,
    prow_ptr, bslot_ptr,
    n_pairs, n_out, k_dim,
    KIND: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr, DOT_F32: tl.constexpr, SPLIT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot = tl.load(bslot_ptr + pid_m)
    if slot < 0:  # a block past the last expert's padded segment
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    p = tl.load(prow_ptr + offs_m)
    row_ok = p < n_pairs
    a_row = tl.load(a_rows_ptr + p, mask=row_ok, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < n_out
    b_base = b_ptr + slot.to(tl.int64) * stride_be
    s_base = s_ptr + slot.to(tl.int64) * stride_se
    if KIND == 3:
        srow = tl.load(srow_ptr + offs_n, mask=n_ok, other=0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_dim, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_dim
        a = tl.load(a_ptr + a_row[:, None] * stride_am + offs_k[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        bmask = k_ok[:, None] & n_ok[None, :]
        if KIND == 2:  # int4: two codes per byte, even column in the low nibble, stored q + 8
            byte = tl.load(b_base + offs_n[None, :] * stride_bn + offs_k[:, None] // 2, mask=bmask, other=136)
            nib = (byte.to(tl.int32) >> ((offs_k[:, None] % 2) * 4)) & 15
            w = (nib - 8).to(tl.float32)
        elif KIND == 3:  # fp8 e4m3fn bytes decoded to fp32 bit patterns (exact)
            byte = tl.load(b_base + offs_n[None, :] * stride_bn + offs_k[:, None], mask=bmask, other=0).to(tl.uint32)
            e = (byte >> 3) & 15
            m = byte & 7
            normal = (((byte >> 7) << 31) | ((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
            sub = m.to(tl.float32) * 0.001953125  # e == 0: m * 2^-9
            sub = tl.where((byte >> 7) == 1, -sub, sub)
            w = tl.where(e == 0, sub, normal)
        elif KIND == 1:  # int8 codes, exact in fp32 (and in bf16)
            w = tl.load(b_base + offs_n[None, :] * stride_bn + offs_k[:, None], mask=bmask, other=0).to(tl.float32)
        else:
            w = tl.load(b_base + offs_n[None, :] * stride_bn + offs_k[:, None], mask=bmask, other=0)
        a_hi = a.to(DOT_DTYPE)
        if DOT_F32:  # the interpreter's bf16 dot is wrong: same rounding, exact fp32 products
            wd = w.to(DOT_DTYPE).to(tl.float32)
            part = tl.dot(a_hi.to(tl.float32), wd)
            if SPLIT:
                part += tl.dot((a - a_hi.to(tl.float32)).to(DOT_DTYPE).to(tl.float32), wd)
        elif IEEE:
            part = tl.dot(a_hi, w.to(DOT_DTYPE), input_precision="ieee")
        else:
            wd = w.to(DOT_DTYPE)
            part = tl.dot(a_hi, wd)
            if SPLIT:  # fp32 activations as bf16 high part + bf16 remainder (see gemm.SPLIT_MAX_PAIRS)
                part += tl.dot((a - a_hi.to(tl.float32)).to(DOT_DTYPE), wd)
        if KIND == 2:
            s = tl.load(s_base + offs_n * stride_sn + (k0 // GROUP) * stride_sk, mask=n_ok, other=0.0)
            acc += part * s[None, :]
        elif KIND == 3:
            s = tl.load(s_base + srow * stride_sn + (k0 // 128) * stride_sk, mask=n_ok, other=0.0)
            acc += part * s[None, :]
        else:
            acc += part
    if KIND == 1:
        acc = acc * tl.load(s_base + offs_n * stride_sn, mask=n_ok, other=0.0)[None, :]
    tl.store(c_ptr + p[:, None].to(tl.int64) * stride_cm + offs_n[None, :], acc,
             mask=row_ok[:, None] & n_ok[None, :])


def padded_rows(held: int, pairs: int) -> int:
    """Rows of the padded layout: every non-empty expert segment rounded up to BLOCK_M (at most
    min(held, pairs) segments are non-empty). Depends on the batch only through N."""
    rows = pairs + min(held, pairs) * (BLOCK_M - 1)
    return triton.cdiv(rows, BLOCK_M) * BLOCK_M


def block_layout(d: Dispatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(prow [P]: sorted pair of each padded row, N for padding; bslot [P/BLOCK_M]: expert slot of each
    block, -1 past the end), computed on the device."""
    dev = d.order.device
    N, held = d.pairs, d.held
    P = padded_rows(held, N)
    counts = d.counts[:held]
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    pend = torch.cumsum(padded, 0)
    pstart = pend - padded
    start = d.ends - counts
    i = torch.arange(N, device=dev)
    s = d.sorted_slots
    served = s < held
    sc = torch.clamp(s, max=held - 1)
    dest = torch.where(served, pstart.index_select(0, sc) + (i - start.index_select(0, sc)), torch.full_like(i, P))
    prow = torch.full((P + 1,), N, dtype=torch.int64, device=dev)
    prow.scatter_(0, dest, i)  # pairs nobody serves all land on the dump row P
    bstart = torch.arange(0, P, BLOCK_M, device=dev)
    bslot = torch.searchsorted(pend, bstart, right=True)
    bslot = torch.where(bslot < held, bslot, torch.full_like(bslot, -1))
    return prow[:P], bslot


_DOT = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def moe_gemm(a: torch.Tensor, a_rows: torch.Tensor, stack: WeightStack, d: Dispatch, *,
             split: bool = False) -> torch.Tensor:
    """Y [N, n_out] fp32 in sorted-pair order: Y[i] = A[a_rows[i]] @ W_{slot(i)}^T (rows nobody serves
    unwritten). A is in the compute dtype, or fp32 with split=True (bf16 high part + remainder)."""
    N = d.pairs
    c = torch.empty(N, stack.n, dtype=torch.float32, device=a.device)
    if N == 0 or d.held == 0:
        return c
    prow, bslot = block_layout(d)
    kind = KIND[stack.kind]
    data = stack.data.view(torch.uint8) if stack.kind == "fp8" else stack.data
    scales = stack.scales if stack.scales is not None else c
    ss = (scales.stride(0), scales.stride(1), scales.stride(2) if scales.ndim == 3 else 0) \
        if stack.scales is not None else (0, 0, 0)
    srow = stack.scale_rows if stack.scale_rows is not None else bslot
    dot_dtype = torch.bfloat16 if split else a.dtype
    block_k = 32 if stack.kind in ("int4", "fp8") else 64  # divides every int4 group and the fp8 block
    block_n = 64
    grid = (bslot.numel(), triton.cdiv(stack.n, block_n))
    _moe_gemm_kernel[grid](
        a, a_rows, a.stride(0),
        data, data.stride(0), data.stride(1),
        scales, *ss,
        srow,
        c, c.stride(0),
        prow, bslot,
        N, stack.n, stack.k,
        KIND=kind, GROUP=stack.fmt.group_size or 128,
        BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k,
        DOT_DTYPE=_DOT[dot_dtype], IEEE=dot_dtype == torch.float32, DOT_F32=a.device.type == "cpu", SPLIT=split,
    )
    return c
