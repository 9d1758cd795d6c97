"""The jitted fused-MoE kernels of cpu.numba. Importing this module needs numba; cpu_numba imports it lazily.

Every format goes through one compiled function: weights arrive as raw bytes ([E, rows, row_bytes] uint8)
plus fp32 scales already laid out per row ([E, rows, n_groups]), and a small integer `kind` picks how a row
is decoded. Keeping the argument types identical across formats means one compilation serves them all, so
the first call pays the JIT once (and `cache=True` keeps it on disk for the next process).

A weight row is decoded into an fp32 scratch row that stays in L1 and is then dotted with every token the
expert serves, so each packed byte is read from memory exactly once per call.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

# Format kinds understood by `decode_row` (cpu_numba maps WeightFormat names onto these).
KIND_FP32, KIND_BF16, KIND_FP16, KIND_INT8, KIND_INT4, KIND_FP8 = range(6)
ACT_SILU, ACT_SWIGLU_OAI = 0, 1

# Rows of gate/up (phase 1) and of down (phase 2) one parallel work item covers: large enough that the
# per-item bookkeeping is noise, small enough that Qwen-sized layers give every core dozens of items.
ROWS_PER_ITEM = 16
TOKENS_PER_PASS = 4  # tokens dotted against one decoded row in a single pass over it

# No 'nnan'/'ninf': with nan_policy="propagate" a NaN input must come out as NaN, not be optimised away.
# 'reassoc' is what lets LLVM vectorise the fp32 dot-product reductions.
_FAST = {"reassoc", "contract", "nsz", "arcp"}
_JIT = dict(nogil=True, cache=True, fastmath=_FAST)


@njit(inline="always", **_JIT)
def decode_row(kind, group, raw, scales, n, lut, buf):
    """Decode the first n values of one packed weight row (`raw`, its `scales`) into fp32 `buf`."""
    if kind == KIND_FP32:
        src = raw.view(np.float32)
        for k in range(n):
            buf[k] = src[k]
    elif kind == KIND_BF16:
        src16 = raw.view(np.uint16)
        bits = buf.view(np.uint32)
        for k in range(n):
            bits[k] = np.uint32(src16[k]) << np.uint32(16)
    elif kind == KIND_FP16:
        src16 = raw.view(np.uint16)
        bits = buf.view(np.uint32)
        for k in range(n):
            h = np.uint32(src16[k])
            em = h & np.uint32(0x7FFF)
            sign = (h & np.uint32(0x8000)) << np.uint32(16)
            if em >= np.uint32(0x7C00):  # inf / nan: all-ones exponent, mantissa kept
                bits[k] = sign | np.uint32(0x7F800000) | ((em & np.uint32(0x3FF)) << np.uint32(13))
            elif em >= np.uint32(0x0400):  # normal: rebias the exponent by 127 - 15
                bits[k] = sign | ((em << np.uint32(13)) + np.uint32(0x38000000))
            else:  # subnormal: mantissa * 2^-24 is exact in fp32
                buf[k] = np.float32(em) * np.float32(5.9604644775390625e-08)
                bits[k] = bits[k] | sign
    elif kind == KIND_INT8:
        src8 = raw.view(np.int8)
        s = scales[0]
        for k in range(n):
            buf[k] = np.float32(src8[k]) * s
    elif kind == KIND_INT4:
        # Two codes per byte, low nibble first, stored as q + 8; groups are even-sized, so a group never
        # starts in the middle of a byte. buf has room for one value past n (the odd row's pad nibble).
        for gi in range((n + group - 1) // group):
            s = scales[gi]
            j0 = (gi * group) // 2
            j1 = (min(gi * group + group, n) + 1) // 2
            for j in range(j0, j1):
                b = np.int32(raw[j])
                buf[2 * j] = np.float32((b & 15) - 8) * s
                buf[2 * j + 1] = np.float32((b >> 4) - 8) * s
    else:  # KIND_FP8: e4m3 code -> value through the 256-entry table, times its 128-column block scale
        for gi in range((n + group - 1) // group):
            s = scales[gi]
            for k in range(gi * group, min(gi * group + group, n)):
                buf[k] = lut[raw[k]] * s


@njit(inline="always", **_JIT)
def _dot(a, b, n):
    acc = np.float32(0.0)
    for k in range(n):
        acc += a[k] * b[k]
    return acc


@njit(inline="always", **_JIT)
def _act(act, alpha, limit, g, u):
    if act == ACT_SILU:
        return g / (np.float32(1.0) + np.exp(-g)) * u
    g = min(g, limit)
    u = min(max(u, -limit), limit)
    return (u + np.float32(1.0)) * (g / (np.float32(1.0) + np.exp(-alpha * g)))


@njit(**_JIT)
def group_pairs(topk_ids, topk_weights, slot_of):
    """Group the (token, slot) pairs routed to held experts by local expert.

    Returns offsets [E+1] into pair_tok/pair_w (pairs of local expert e are offsets[e]:offsets[e+1], tokens
    ascending) and the local ids of the experts that got at least one pair.
    """
    T, K = topk_ids.shape
    E = 0
    for g in range(slot_of.shape[0]):
        E = max(E, slot_of[g] + 1)
    counts = np.zeros(E + 1, np.int64)
    for t in range(T):
        for j in range(K):
            e = slot_of[topk_ids[t, j]]
            if e >= 0:
                counts[e + 1] += 1
    offsets = np.cumsum(counts)
    fill = offsets[:-1].copy()
    pair_tok = np.empty(offsets[-1], np.int64)
    pair_w = np.empty(offsets[-1], np.float32)
    for t in range(T):
        for j in range(K):
            e = slot_of[topk_ids[t, j]]
            if e >= 0:
                pair_tok[fill[e]] = t
                pair_w[fill[e]] = topk_weights[t, j]
                fill[e] += 1
    n_active = 0
    for e in range(E):
        if offsets[e + 1] > offsets[e]:
            n_active += 1
    active = np.empty(n_active, np.int64)
    n_active = 0
    for e in range(E):
        if offsets[e + 1] > offsets[e]:
            active[n_active] = e
            n_active += 1
    return offsets, pair_tok, pair_w, active


@njit(parallel=True, **_JIT)
def gate_up(kind, group, act, alpha, limit, H, I, x, offsets, pair_tok, active,
            g_raw, g_sc, u_raw, u_sc, g_bias, u_bias, lut, h_out):
    """Phase 1: h_out[p, :] = act(gate x_p + bg, up x_p + bu) for every pair p, parallel over (expert, row block).

    Work items interleave experts (item i -> expert i % n_active) so a static split of the item range
    gives each thread a mix of busy and quiet experts.
    """
    n_active = active.shape[0]
    n_blocks = (I + ROWS_PER_ITEM - 1) // ROWS_PER_ITEM
    use_bias = act == ACT_SWIGLU_OAI  # the reference adds gate/up biases only in the swiglu_oai branch
    for item in prange(n_active * n_blocks):
        e = active[item % n_active]
        r0 = (item // n_active) * ROWS_PER_ITEM
        r1 = min(r0 + ROWS_PER_ITEM, I)
        bg = np.empty(H + 1, np.float32)
        bu = np.empty(H + 1, np.float32)
        p0, p1 = offsets[e], offsets[e + 1]
        for r in range(r0, r1):
            decode_row(kind, group, g_raw[e, r], g_sc[e, r], H, lut, bg)
            decode_row(kind, group, u_raw[e, r], u_sc[e, r], H, lut, bu)
            gb = g_bias[e, r] if use_bias else np.float32(0.0)
            ub = u_bias[e, r] if use_bias else np.float32(0.0)
            p = p0
            while p + TOKENS_PER_PASS <= p1:  # four tokens per pass over the decoded rows
                x0, x1, x2, x3 = x[pair_tok[p]], x[pair_tok[p + 1]], x[pair_tok[p + 2]], x[pair_tok[p + 3]]
                g0 = g1 = g2 = g3 = u0 = u1 = u2 = u3 = np.float32(0.0)
                for k in range(H):
                    wg, wu = bg[k], bu[k]
                    g0 += wg * x0[k]
                    g1 += wg * x1[k]
                    g2 += wg * x2[k]
                    g3 += wg * x3[k]
                    u0 += wu * x0[k]
                    u1 += wu * x1[k]
                    u2 += wu * x2[k]
                    u3 += wu * x3[k]
                h_out[p, r] = _act(act, alpha, limit, g0 + gb, u0 + ub)
                h_out[p + 1, r] = _act(act, alpha, limit, g1 + gb, u1 + ub)
                h_out[p + 2, r] = _act(act, alpha, limit, g2 + gb, u2 + ub)
                h_out[p + 3, r] = _act(act, alpha, limit, g3 + gb, u3 + ub)
                p += TOKENS_PER_PASS
            while p < p1:
                xt = x[pair_tok[p]]
                h_out[p, r] = _act(act, alpha, limit, _dot(bg, xt, H) + gb, _dot(bu, xt, H) + ub)
                p += 1


@njit(parallel=True, **_JIT)
def down_accumulate(kind, group, H, I, offsets, pair_tok, pair_w, active, d_raw, d_sc, d_bias, lut, h, out):
    """Phase 2: out[t, r] += w_p * (down_e[r] . h_p + bd_e[r]), parallel over blocks of output rows r.

    One thread owns each block of output columns, so experts accumulate into `out` without races and in a
    fixed order (the result does not depend on the thread count).
    """
    n_blocks = (H + ROWS_PER_ITEM - 1) // ROWS_PER_ITEM
    for blk in prange(n_blocks):
        r0 = blk * ROWS_PER_ITEM
        r1 = min(r0 + ROWS_PER_ITEM, H)
        bd = np.empty(I + 1, np.float32)
        for ai in range(active.shape[0]):
            e = active[ai]
            p0, p1 = offsets[e], offsets[e + 1]
            for r in range(r0, r1):
                decode_row(kind, group, d_raw[e, r], d_sc[e, r], I, lut, bd)
                bias = d_bias[e, r]
                p = p0
                while p + TOKENS_PER_PASS <= p1:
                    h0, h1, h2, h3 = h[p], h[p + 1], h[p + 2], h[p + 3]
                    y0 = y1 = y2 = y3 = np.float32(0.0)
                    for k in range(I):
                        wd = bd[k]
                        y0 += wd * h0[k]
                        y1 += wd * h1[k]
                        y2 += wd * h2[k]
                        y3 += wd * h3[k]
                    out[pair_tok[p], r] += pair_w[p] * (y0 + bias)
                    out[pair_tok[p + 1], r] += pair_w[p + 1] * (y1 + bias)
                    out[pair_tok[p + 2], r] += pair_w[p + 2] * (y2 + bias)
                    out[pair_tok[p + 3], r] += pair_w[p + 3] * (y3 + bias)
                    p += TOKENS_PER_PASS
                while p < p1:
                    out[pair_tok[p], r] += pair_w[p] * (_dot(bd, h[p], I) + bias)
                    p += 1
