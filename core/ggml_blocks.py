"""llama.cpp's quantization blocks (the tensor data of GGUF files), kept byte for byte.

A row of `in` values is `in / block_size` consecutive blocks of the type's C struct (ggml-common.h);
a matrix [out, in] is `out` such rows, so a GGUF tensor's bytes are used as they are. fp16 fields are
little-endian IEEE half. Every dequantizer below reproduces the `gguf` package's Python dequantizer
(`gguf.quants.dequantize`) bit for bit: the same fp32 operations in the same order (`d * q - m` is two
roundings, never a fused multiply-add).

    q8_0  32 values, 34 bytes : f16 d | i8 qs[32]                        x[j] = d * qs[j]
    q4_0  32 values, 18 bytes : f16 d | u8 qs[16]                        x[j] = d * ((qs[j] & 15) - 8),
                                                                         x[j+16] = d * ((qs[j] >> 4) - 8)
    q4_1  32 values, 20 bytes : f16 d | f16 m | u8 qs[16]                x[j] = d * (qs[j] & 15) + m,
                                                                         x[j+16] = d * (qs[j] >> 4) + m
    q5_0  32 values, 22 bytes : f16 d | u8 qh[4] | u8 qs[16]             as q4_0 with a fifth bit, less 16:
         q[j] = (qs[j] & 15) | bit j of qh << 4, q[j+16] = (qs[j] >> 4) | bit j+16 of qh << 4 (qh read as a
         little-endian uint32);                                          x[j] = d * (q[j] - 16)
    q5_1  32 values, 24 bytes : f16 d | f16 m | u8 qh[4] | u8 qs[16]     q as q5_0's, x[j] = d * q[j] + m
    q4_k 256 values, 144 bytes: f16 d | f16 dmin | u8 scales[12] | u8 qs[128]
         8 sub-blocks of 32 with 6-bit scale sc[s] and min m[s] (packing: `scale_min`);
         x[64g + l]      = (d*sc[2g])   * (qs[32g + l] & 15) - (dmin*m[2g])      g < 4, l < 32
         x[64g + 32 + l] = (d*sc[2g+1]) * (qs[32g + l] >> 4) - (dmin*m[2g+1])
    q5_k 256 values, 176 bytes: f16 d | f16 dmin | u8 scales[12] | u8 qh[32] | u8 qs[128]
         as q4_k with a fifth bit: value 64g + l adds 16 * bit (2g) of qh[l], value 64g + 32 + l adds
         16 * bit (2g + 1) of qh[l]
    iq4_nl 32 values, 18 bytes: f16 d | u8 qs[16]                       x[j] = d * IQ4[qs[j] & 15],
                                                                         x[j+16] = d * IQ4[qs[j] >> 4]
         IQ4 = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113} (a non-linear grid)
    iq4_xs 256 values, 136 bytes: f16 d | u16 scales_h | u8 scales_l[4] | u8 qs[128]
         8 sub-blocks of 32 as iq4_nl's with scale d * (ls - 32), ls = (scales_l[s/2] >> 4 (s%2)) & 15 |
         ((scales_h >> 2s) & 3) << 4 (6 bits)
    q2_k 256 values, 84 bytes: u8 scales[16] | u8 qs[64] | f16 d | f16 dmin
         16 sub-blocks of 16, scales[s] = sc | m << 4 (4 bits each); for half h < 2, l < 32, i < 4, value
         v = 128h + 32i + l has the 2-bit code q = (qs[32h + l] >> 2i) & 3;
         x[v] = (d * sc[v // 16]) * q - (dmin * m[v // 16])
    q3_k 256 values, 110 bytes: u8 hmask[32] | u8 qs[64] | u8 scales[12] | f16 d
         16 sub-blocks of 16 with 6-bit scales less 32 (packing: `q3_k_scales`); low two bits as q2_k's,
         the third bit of value 32j + l is bit j of hmask[l], set for the non-negative codes:
         q = low - 4 (1 - bit) in -4..3;                                 x[v] = (d * (sc[v // 16] - 32)) * q
    q6_k 256 values, 210 bytes: u8 ql[128] | u8 qh[64] | i8 scales[16] | f16 d
         for half h < 2, l < 32 (ql += 64h, qh += 32h), value v = 128h + 32i + l, i < 4:
         low nibble: i=0 ql[l] & 15, i=1 ql[l+32] & 15, i=2 ql[l] >> 4, i=3 ql[l+32] >> 4;
         high two bits: (qh[l] >> 2i) & 3;  q = (low | high << 4) - 32;  x[v] = (d * scales[v // 16]) * q

llama.cpp writes the 32-value types where a K-quant cannot hold a row (a row length that is not a multiple
of 256: Q4_K falls back to Q5_0, Q5_K to Q5_1, Q6_K to Q8_0), e.g. DeepSeek-V2-Lite's and Qwen1.5-MoE's
expert down matrices (1408 columns) and MLA's per-head k_b (128 columns) in their Q4_K_M files.

llama.cpp's Q2_K / Q3_K files (and unsloth's dynamic Q2_K_XL mixes) hold the giant models' experts in these
two; their scales per 16 values are what let 2.6 and 3.4 bits per weight work at all.

The quantizers: q8_0, q4_0, q4_1, q5_0 and q5_1 reproduce `gguf.quants.quantize` (which matches llama.cpp's reference
quantize_row_*_ref) byte for byte. The K-quant quantizers are moetier's own plain round-to-nearest
(min/max per sub-block, scales rounded up so no value is clamped; error <= half the stored step): valid
blocks every llama.cpp build reads, but not the bytes llama.cpp's `make_qkx2_quants` / `make_qx_quants`
search would choose (gguf has no K-quant quantizer to compare with). The IQ4 quantizers are moetier's own
too (nearest grid value under a scale that maps each block's largest magnitude to -127; gguf has none).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import FormatError

QK_K = 256


@dataclass(frozen=True)
class BlockType:
    """name: the moetier format; ggml_type: its GGMLQuantizationType number in GGUF files."""

    name: str
    ggml_type: int
    block_size: int  # values per block
    type_size: int  # bytes per block


BLOCK_TYPES: dict[str, BlockType] = {
    "q8_0": BlockType("q8_0", 8, 32, 34),
    "q4_0": BlockType("q4_0", 2, 32, 18),
    "q4_1": BlockType("q4_1", 3, 32, 20),
    "q5_0": BlockType("q5_0", 6, 32, 22),
    "q5_1": BlockType("q5_1", 7, 32, 24),
    "q4_k": BlockType("q4_k", 12, QK_K, 144),
    "q5_k": BlockType("q5_k", 13, QK_K, 176),
    "q2_k": BlockType("q2_k", 10, QK_K, 84),
    "q3_k": BlockType("q3_k", 11, QK_K, 110),
    "q6_k": BlockType("q6_k", 14, QK_K, 210),
    "iq4_nl": BlockType("iq4_nl", 20, 32, 18),
    "iq4_xs": BlockType("iq4_xs", 23, QK_K, 136),
}
K_SCALED = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_xs")  # d (and dmin) per 256, sub-scales inside
IQ4_TYPES = ("iq4_nl", "iq4_xs")  # 4-bit indices into IQ4_VALUES, not codes
IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
BY_GGML_TYPE = {b.ggml_type: b for b in BLOCK_TYPES.values()}

_U8 = torch.uint8


def _f16(b: torch.Tensor) -> torch.Tensor:
    """Little-endian half fields uint8 [n, 2] -> fp32 [n, 1]."""
    return b.contiguous().view(torch.float16).to(torch.float32)


def _to_f16_bytes(x: torch.Tensor, what: str) -> torch.Tensor:
    """fp32 [n, 1] -> its fp16 rounding as uint8 [n, 2]; a value fp16 cannot hold is refused."""
    h = x.to(torch.float16)
    if not torch.isfinite(h).all():
        raise FormatError(f"a block's {what} exceeds the fp16 range (|value| > 65504) of the GGUF block scale; "
                          "these weights cannot be stored in this GGUF type")
    return h.contiguous().view(_U8)


def _shifts(*s: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor(s, dtype=_U8).view(shape)


def scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q4_k/q5_k 12 packed bytes [n, 12] -> 6-bit scales and mins [n, 8] (llama.cpp get_scale_min_k4):
    s < 4: sc = b[s] & 63, m = b[s+4] & 63; s >= 4: sc = (b[s+4] & 15) | (b[s-4] >> 6) << 4,
    m = (b[s+4] >> 4) | (b[s] >> 6) << 4."""
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc, mn


def pack_scale_min(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """Inverse of `scale_min`: 6-bit values [n, 8] each -> the 12 packed bytes [n, 12]."""
    lo_sc, hi_sc, lo_m, hi_m = sc[:, :4], sc[:, 4:], mn[:, :4], mn[:, 4:]
    return torch.cat([lo_sc | ((hi_sc >> 4) << 6), lo_m | ((hi_m >> 4) << 6), (hi_sc & 0x0F) | ((hi_m & 0x0F) << 4)],
                     dim=1)


# ---- decode: uint8 blocks [n, type_size] -> codes and sub-block scales (and mins) ----------------------

@dataclass(frozen=True, eq=False)
class AffineParts:
    """A block format's values as integer codes and per-sub-block fp32 terms: for value j of a row,
    x[j] = scales[j // group] * codes[j] - mins[j // group] (in fp32, in that order: the product is exact,
    the subtraction rounds once). Every dequantizer here is this; kernels can compute on the parts."""

    # int8 [rows, in]: q8_0 -128..127, q2_k 0..3, q3_k -4..3, q4_0 -8..7, q4_1 / q4_k 0..15, q5_0 -16..15, q5_1 / q5_k 0..31, q6_k -32..31,
    # iq4: the grid values IQ4_VALUES
    codes: torch.Tensor
    scales: torch.Tensor  # fp32 [rows, in / group]
    mins: torch.Tensor | None  # fp32 [rows, in / group] (q4_1, q5_1: -m; q2_k, q4_k, q5_k), else None
    group: int  # values per sub-block


def _parts_q8_0(b: torch.Tensor):
    return b[:, 2:].contiguous().view(torch.int8), _f16(b[:, :2]), None


def _parts_q4_0(b: torch.Tensor):
    return _nibbles32(b[:, 2:]).to(torch.int8) - 8, _f16(b[:, :2]), None


def _nibbles32(qs: torch.Tensor) -> torch.Tensor:
    """A 32-value block's 16 nibble bytes [n, 16] -> its low 4 bits per value [n, 32] (low nibbles first)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1)


def _fifth_bits(qh: torch.Tensor) -> torch.Tensor:
    """q5_0 / q5_1's qh [n, 4] (a little-endian uint32) -> bit j for value j, as 16 or 0 [n, 32]."""
    return ((qh.unsqueeze(2) >> _shifts(*range(8), shape=(1, 1, 8))) & 0x01).reshape(-1, 32) << 4


def _parts_q4_1(b: torch.Tensor):
    return _nibbles32(b[:, 4:20]).to(torch.int8), _f16(b[:, :2]), -_f16(b[:, 2:4])


def _parts_q5_0(b: torch.Tensor):
    return (_nibbles32(b[:, 6:22]) | _fifth_bits(b[:, 2:6])).to(torch.int8) - 16, _f16(b[:, :2]), None


def _parts_q5_1(b: torch.Tensor):
    return (_nibbles32(b[:, 8:24]) | _fifth_bits(b[:, 4:8])).to(torch.int8), _f16(b[:, :2]), -_f16(b[:, 2:4])


def _iq4_values(idx: torch.Tensor) -> torch.Tensor:
    return torch.tensor(IQ4_VALUES, dtype=torch.int8)[idx.long()]


def _iq4_xs_ls(b: torch.Tensor) -> torch.Tensor:
    """iq4_xs blocks [n, 136] -> the 6-bit sub-block scales ls [n, 8] (the scale is d * (ls - 32))."""
    lo = ((b[:, 4:8].unsqueeze(2) >> _shifts(0, 4, shape=(1, 1, 2))) & 0x0F).reshape(-1, 8)
    h = b[:, 2].to(torch.int32) | (b[:, 3].to(torch.int32) << 8)
    hi = (h.unsqueeze(1) >> (2 * torch.arange(8, dtype=torch.int32))) & 3
    return lo.to(torch.int32) | (hi << 4)


def _iq4_nibbles(b: torch.Tensor) -> torch.Tensor:
    """iq4_nl [n, 18] or iq4_xs [n, 136] blocks -> each value's 4-bit grid index [n, values per block]."""
    qs = b[:, 2:] if b.shape[1] == BLOCK_TYPES["iq4_nl"].type_size else b[:, 8:].reshape(-1, 16)
    return _nibbles32(qs).reshape(b.shape[0], -1)


def _parts_iq4_nl(b: torch.Tensor):
    return _iq4_values(_iq4_nibbles(b)), _f16(b[:, :2]), None


def _parts_iq4_xs(b: torch.Tensor):
    return _iq4_values(_iq4_nibbles(b)), _f16(b[:, :2]) * (_iq4_xs_ls(b) - 32).to(torch.float32), None


def iq4_indices(name: str, data: torch.Tensor, in_features: int) -> torch.Tensor:
    """uint8 iq4_nl / iq4_xs rows -> each value's 4-bit index into IQ4_VALUES, uint8 [rows, in_features]."""
    b = data.contiguous().view(-1, BLOCK_TYPES[name].type_size)
    return _iq4_nibbles(b).reshape(data.shape[0], in_features)


def _k_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    sc, mn = scale_min(b[:, 4:16])
    return _f16(b[:, 0:2]) * sc.to(torch.float32), _f16(b[:, 2:4]) * mn.to(torch.float32)


def _parts_q4_k(b: torch.Tensor):
    n = b.shape[0]
    q = (b[:, 16:144].reshape(n, 4, 1, 32) >> _shifts(0, 4, shape=(1, 1, 2, 1))) & 0x0F
    return (q.reshape(n, QK_K).to(torch.int8), *_k_scales(b))


def _parts_q5_k(b: torch.Tensor):
    n = b.shape[0]
    ql = ((b[:, 48:176].reshape(n, 4, 1, 32) >> _shifts(0, 4, shape=(1, 1, 2, 1))) & 0x0F).reshape(n, 8, 32)
    qh = ((b[:, 16:48].reshape(n, 1, 1, 32) >> _shifts(*range(8), shape=(1, 1, 8, 1))) & 0x01).reshape(n, 8, 32)
    return ((ql | (qh << 4)).reshape(n, QK_K).to(torch.int8), *_k_scales(b))


def _crumbs(qs: torch.Tensor) -> torch.Tensor:
    """q2_k / q3_k's qs [n, 64] -> the low two bits of each of the block's 256 values (value 128h + 32i + l
    in bits 2i of qs[32h + l])."""
    n = qs.shape[0]
    return ((qs.reshape(n, 2, 1, 32) >> _shifts(0, 2, 4, 6, shape=(1, 1, 4, 1))) & 0x03).reshape(n, QK_K)


def _q2_k_scales(b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q2_k blocks [n, 84] -> d, dmin [n, 1] and the 4-bit sc, m [n, 16]."""
    return _f16(b[:, 80:82]), _f16(b[:, 82:84]), b[:, 0:16] & 0x0F, b[:, 0:16] >> 4


def _parts_q2_k(b: torch.Tensor):
    d, dmin, sc, m = _q2_k_scales(b)
    return _crumbs(b[:, 16:80]).to(torch.int8), d * sc.to(torch.float32), dmin * m.to(torch.float32)


def q3_k_scales(scales: torch.Tensor) -> torch.Tensor:
    """q3_k's 12 packed bytes [n, 12] -> its 16 sub-block scales, 6-bit, 0..63 (the scale is d * (s - 32)):
    the low four bits of s are nibble s // 8 of byte s % 8, the top two bits field s // 4 of byte 8 + s % 4."""
    lo = ((scales[:, 0:8].unsqueeze(1) >> _shifts(0, 4, shape=(1, 2, 1))) & 0x0F).reshape(-1, 16)
    hi = ((scales[:, 8:12].unsqueeze(1) >> _shifts(0, 2, 4, 6, shape=(1, 4, 1))) & 0x03).reshape(-1, 16)
    return lo | (hi << 4)


def pack_q3_k_scales(s: torch.Tensor) -> torch.Tensor:
    """Inverse of `q3_k_scales`: 6-bit values uint8 [n, 16] -> the 12 packed bytes [n, 12]."""
    lo = (s & 0x0F).view(-1, 2, 8)
    hi = (s >> 4).to(torch.int32).view(-1, 4, 4) << (2 * torch.arange(4, dtype=torch.int32)).view(1, 4, 1)
    return torch.cat([lo[:, 0] | (lo[:, 1] << 4), hi.sum(dim=1).to(_U8)], dim=1)


def _q3_k_codes(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    bit = ((b[:, 0:32].reshape(n, 1, 32) >> _shifts(*range(8), shape=(1, 8, 1))) & 0x01).reshape(n, QK_K)
    return _crumbs(b[:, 32:96]).to(torch.int8) - ((1 - bit.to(torch.int8)) << 2)


def _parts_q3_k(b: torch.Tensor):
    sc = q3_k_scales(b[:, 96:108]).to(torch.float32) - 32
    return _q3_k_codes(b), _f16(b[:, 108:110]) * sc, None


def _parts_q6_k(b: torch.Tensor):
    n = b.shape[0]
    scales = b[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
    ql = ((b[:, 0:128].reshape(n, 2, 1, 64) >> _shifts(0, 4, shape=(1, 1, 2, 1))) & 0x0F).reshape(n, 8, 32)
    qh = ((b[:, 128:192].reshape(n, 2, 1, 32) >> _shifts(0, 2, 4, 6, shape=(1, 1, 4, 1))) & 0x03).reshape(n, 8, 32)
    q = ((ql | (qh << 4)).to(torch.int8) - 32).reshape(n, QK_K)
    return q, _f16(b[:, 208:210]) * scales, None


# ---- quantize: fp32 [n, block_size] -> uint8 blocks [n, type_size] -----------------------------------

def _roundf(x: torch.Tensor) -> torch.Tensor:
    """Round half away from zero, computed as gguf.quants.np_roundf does (floor(a) + floor(2 (a - floor a)))
    so that values one ulp below .5 round exactly as there."""
    a = x.abs()
    f = torch.floor(a)
    return torch.sign(x) * (f + torch.floor(2 * (a - f)))


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / torch.where(d == 0, torch.ones_like(d), d))


def _q_q8_0(x: torch.Tensor) -> torch.Tensor:
    d = x.abs().amax(dim=1, keepdim=True) / 127
    qs = _roundf(x * _inverse(d)).to(torch.int8).view(_U8)
    return torch.cat([_to_f16_bytes(d, "scale"), qs], dim=1)


def _signed_amax(x: torch.Tensor) -> torch.Tensor:
    """Per row of x, its value of largest magnitude, sign kept (the first of equal magnitudes, as numpy's
    argmax): q4_0, q5_0 and iq4 map it to their grid's negative end."""
    return torch.gather(x, -1, x.abs().argmax(dim=-1, keepdim=True))


def _q_signed(x: torch.Tensor, half: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q4_0 / q5_0 (gguf.quants' arithmetic): d = the signed largest magnitude / -half, q = trunc(x / d + half
    + 0.5) in 0..2 half - 1; returns the fp16 bytes of d and the codes."""
    d = _signed_amax(x) / -half
    q = torch.trunc(x * _inverse(d) + (half + 0.5)).clamp(0, 2 * half - 1).to(_U8)
    return _to_f16_bytes(d, "scale"), q


def _q_q4_0(x: torch.Tensor) -> torch.Tensor:
    d_b, q = _q_signed(x, 8)
    return torch.cat([d_b, _pack32(q)], dim=1)


def _pack32(q: torch.Tensor) -> torch.Tensor:
    """Codes uint8 [n, 32] -> the nibble bytes [n, 16]: value j low, value j + 16 high (4 bits each)."""
    q = (q & 0x0F).view(-1, 2, 16)
    return q[:, 0] | (q[:, 1] << 4)


def _qh32(q: torch.Tensor) -> torch.Tensor:
    """5-bit codes uint8 [n, 32] -> qh [n, 4]: bit j (of a little-endian uint32) = code j's fifth bit."""
    hi = (q >> 4).view(-1, 4, 8).to(torch.int32) << torch.arange(8, dtype=torch.int32)
    return hi.sum(dim=2).to(_U8)


def _q_q5_0(x: torch.Tensor) -> torch.Tensor:
    d_b, q = _q_signed(x, 16)
    return torch.cat([d_b, _qh32(q), _pack32(q)], dim=1)


def _q_min_max(x: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q4_1 / q5_1 (gguf.quants' arithmetic): d = (max - min) / levels, q = trunc((x - min) / d + 0.5),
    min stored as m; returns the fp16 bytes of d and m and the codes."""
    mx, mn = x.amax(dim=1, keepdim=True), x.amin(dim=1, keepdim=True)
    d = (mx - mn) / levels
    q = torch.trunc((x - mn) * _inverse(d) + 0.5).clamp(0, levels).to(_U8)
    return _to_f16_bytes(d, "scale"), _to_f16_bytes(mn, "min"), q


def _q_q4_1(x: torch.Tensor) -> torch.Tensor:
    d_b, m_b, q = _q_min_max(x, 15)
    return torch.cat([d_b, m_b, _pack32(q)], dim=1)


def _q_q5_1(x: torch.Tensor) -> torch.Tensor:
    d_b, m_b, q = _q_min_max(x, 31)
    return torch.cat([d_b, m_b, _qh32(q), _pack32(q)], dim=1)


def _iq4_nearest(y: torch.Tensor) -> torch.Tensor:
    """The index of the IQ4 grid value nearest to each y (ties to the lower one)."""
    grid = torch.tensor(IQ4_VALUES, dtype=torch.float32)
    mid = (grid[1:] + grid[:-1]) / 2
    return torch.bucketize(y, mid, right=False).to(_U8)


def _iq4_scale(x: torch.Tensor) -> torch.Tensor:
    """Per row of x, the scale that maps its largest magnitude to the grid's -127 (the widest end)."""
    return _signed_amax(x) / -127


def _q_iq4_nl(x: torch.Tensor) -> torch.Tensor:
    d_b = _to_f16_bytes(_iq4_scale(x), "scale")
    idx = _iq4_nearest(x * _inverse(_f16(d_b)))
    return torch.cat([d_b, _pack32(idx)], dim=1)


def _q_iq4_xs(x: torch.Tensor) -> torch.Tensor:
    """Sub-block scales s (largest magnitude to -127) on the 6-bit grid d * l, d = max |s| / 31 rounded up to
    fp16 and |l| = ceil(|s| / d) <= 31; then the nearest grid value under each sub-block's d * l."""
    n = x.shape[0]
    sub = x.view(n, 8, 32)
    s = _iq4_scale(sub).squeeze(2)
    d_b = _f16_up(s.abs().amax(dim=1, keepdim=True) / 31, "scale")
    d = _f16(d_b)
    safe = torch.where(d == 0, torch.ones_like(d), d)
    # |l| rounded up: the sub-block's scale d * l is at least |s|, so no value lies past the grid's ends
    l = torch.sign(s) * torch.ceil(s.abs() / safe)
    ls = (torch.where(d == 0, torch.zeros_like(s), l).clamp(-31, 31) + 32).to(torch.int32)
    step = (d * (ls - 32).to(torch.float32)).unsqueeze(2)
    idx = _iq4_nearest(sub * _inverse(step)).view(n * 8, 32)
    lo = (ls & 15).to(_U8).view(n, 4, 2)
    h = ((ls >> 4) << (2 * torch.arange(8, dtype=torch.int32))).sum(dim=1)
    h_b = torch.stack([h & 0xFF, h >> 8], dim=1).to(_U8)
    return torch.cat([d_b, h_b, lo[:, :, 0] | (lo[:, :, 1] << 4), _pack32(idx).view(n, 128)], dim=1)


def _f16_up(x: torch.Tensor, what: str) -> torch.Tensor:
    """fp32 [n, 1] >= 0 -> the smallest fp16 >= x, as uint8 [n, 2] (a stored super-block scale must not
    be below the one the sub-block scales were sized for)."""
    b = _to_f16_bytes(x, what).view(torch.int16)
    below = b.view(torch.float16).to(torch.float32) < x
    b = torch.where(below, b + 1, b)  # one fp16 ulp up (positive values: the next bit pattern)
    if not torch.isfinite(b.view(torch.float16)).all():
        raise FormatError(f"a block's {what} exceeds the fp16 range (|value| > 65504) of the GGUF block scale; "
                          "these weights cannot be stored in this GGUF type")
    return b.contiguous().view(_U8)


def _ceil_ratio(num: torch.Tensor, den: torch.Tensor, top: int) -> torch.Tensor:
    """ceil(num / den) clamped to [0, top]; 0 where den is 0. (num <= top * den is guaranteed by the caller,
    and a correctly rounded fp32 quotient keeps that, so the clamp never cuts.)"""
    safe = torch.where(den == 0, torch.ones_like(den), den)
    return torch.where(den == 0, torch.zeros_like(num), torch.ceil(num / safe)).clamp(0, top)


def _k_min_scale_quant(x: torch.Tensor, levels: int, sub_size: int = 32, top: int = 63) -> tuple[torch.Tensor, ...]:
    """Asymmetric sub-blocks of `sub_size` (q4_k: levels 15, q5_k: 31; q2_k: 3 over sub-blocks of 16 with
    4-bit sc and m, top 15): x ~ (d*sc) * q - (dmin*m) with sc, m in 0..top.

    Mins are clipped at 0 as llama.cpp does (m >= 0), and both the min and the scale are rounded UP to
    their stored grids (m = ceil, sc = ceil, super-block d and dmin rounded up to fp16), so every value
    lies inside its sub-block's grid and the error is at most half the stored step d*sc: never a clamp."""
    n = x.shape[0]
    sub = x.view(n, QK_K // sub_size, sub_size)
    neg_min = -sub.amin(dim=2).clamp(max=0.0)
    m_b = _f16_up(neg_min.amax(dim=1, keepdim=True) / top, "min")
    dmin = _f16(m_b)
    mn = _ceil_ratio(neg_min, dmin, top)
    shift = (dmin * mn).unsqueeze(2)  # exact in fp32 (11 x 6 significant bits), >= -min
    scale = (sub.amax(dim=2) + shift.squeeze(2)) / levels
    d_b = _f16_up(scale.amax(dim=1, keepdim=True) / top, "scale")
    d = _f16(d_b)
    sc = _ceil_ratio(scale, d, top)
    step = (d * sc).unsqueeze(2)
    q = torch.round((sub + shift) * _inverse(step)).clamp(0, levels).to(_U8).view(n, QK_K)
    return d_b, m_b, sc.to(_U8), mn.to(_U8), q


def _q_q4_k(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    d_b, m_b, sc, mn, q = _k_min_scale_quant(x, 15)
    q = q.view(n, 4, 2, 32)
    return torch.cat([d_b, m_b, pack_scale_min(sc, mn), (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, 128)], dim=1)


def _q_q5_k(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    d_b, m_b, sc, mn, q = _k_min_scale_quant(x, 31)
    lo = (q & 0x0F).view(n, 4, 2, 32)
    qs = (lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(n, 128)
    hi = (q >> 4).view(n, 8, 32).to(torch.int32) << torch.arange(8, dtype=torch.int32).view(1, 8, 1)
    qh = hi.sum(dim=1).to(_U8)  # bit s of qh[l] = fifth bit of value 32 s + l
    return torch.cat([d_b, m_b, pack_scale_min(sc, mn), qh, qs], dim=1)


def _pack_crumbs(u: torch.Tensor) -> torch.Tensor:
    """Inverse of `_crumbs`: 2-bit codes uint8 [n, 256] -> qs [n, 64]."""
    n = u.shape[0]
    c = (u & 0x03).to(torch.int32).view(n, 2, 4, 32) << torch.tensor([0, 2, 4, 6], dtype=torch.int32).view(1, 1, 4, 1)
    return c.sum(dim=2).to(_U8).reshape(n, 64)


def _q_q2_k(x: torch.Tensor) -> torch.Tensor:
    d_b, m_b, sc, mn, q = _k_min_scale_quant(x, 3, sub_size=16, top=15)
    return torch.cat([sc | (mn << 4), _pack_crumbs(q), d_b, m_b], dim=1)


def _k_symmetric_quant(x: torch.Tensor, levels: int, top: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric sub-blocks of 16 (q3_k: q in [-3, 3], sub-scales 0..31; q6_k: [-31, 31], 0..127): sub-block
    scales rounded up under an fp16 d rounded up, so the error is at most half the stored step. Returns the
    fp16 bytes of d, the sub-scales and the codes q + levels + 1 (uint8 [n, 256])."""
    n = x.shape[0]
    sub = x.view(n, 16, 16)
    scale = sub.abs().amax(dim=2) / levels
    d_b = _f16_up(scale.amax(dim=1, keepdim=True) / top, "scale")
    d = _f16(d_b)
    sc = _ceil_ratio(scale, d, top)
    step = (d * sc).unsqueeze(2)
    u = (torch.round(sub * _inverse(step)).clamp(-levels, levels) + levels + 1).to(_U8).view(n, QK_K)
    return d_b, sc, u


def _q_q3_k(x: torch.Tensor) -> torch.Tensor:
    """llama.cpp's search may also use q = -4; this quantizer keeps -3..3."""
    n = x.shape[0]
    d_b, sc, u = _k_symmetric_quant(x, 3, 31)  # u = q + 4: bit 2 = q >= 0
    hmask = ((u >> 2).to(torch.int32).view(n, 8, 32) << torch.arange(8, dtype=torch.int32).view(1, 8, 1)).sum(dim=1)
    return torch.cat([hmask.to(_U8), _pack_crumbs(u), pack_q3_k_scales((sc + 32).to(_U8)), d_b], dim=1)


def _q_q6_k(x: torch.Tensor) -> torch.Tensor:
    """Stored q + 32, q in [-31, 31] (llama.cpp's search may also use -32), int8 sub-block scales."""
    n = x.shape[0]
    d_b, sc, q = _k_symmetric_quant(x, 31, 127)
    q = q.view(n, 2, 4, 32)  # [half, i, l]
    lo = q & 0x0F
    ql = torch.cat([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], dim=2)  # [n, 2, 64]
    hb = (q >> 4).to(torch.int32) << torch.tensor([0, 2, 4, 6], dtype=torch.int32).view(1, 1, 4, 1)
    qh = hb.sum(dim=2).to(_U8)  # [n, 2, 32]
    return torch.cat([ql.reshape(n, 128), qh.reshape(n, 64), sc.to(torch.int8).view(_U8), d_b], dim=1)


# name -> (decoder of blocks, values per sub-block)
_PARTS = {"q8_0": (_parts_q8_0, 32), "q4_0": (_parts_q4_0, 32), "q4_1": (_parts_q4_1, 32),
          "q5_0": (_parts_q5_0, 32), "q5_1": (_parts_q5_1, 32), "q2_k": (_parts_q2_k, 16),
          "q3_k": (_parts_q3_k, 16), "q4_k": (_parts_q4_k, 32), "q5_k": (_parts_q5_k, 32),
          "q6_k": (_parts_q6_k, 16), "iq4_nl": (_parts_iq4_nl, 32), "iq4_xs": (_parts_iq4_xs, 32)}
_QUANT = {"q8_0": _q_q8_0, "q4_0": _q_q4_0, "q4_1": _q_q4_1, "q5_0": _q_q5_0, "q5_1": _q_q5_1,
          "q2_k": _q_q2_k, "q3_k": _q_q3_k, "q4_k": _q_q4_k, "q5_k": _q_q5_k, "q6_k": _q_q6_k,
          "iq4_nl": _q_iq4_nl, "iq4_xs": _q_iq4_xs}


def affine_parts(name: str, data: torch.Tensor, in_features: int) -> AffineParts:
    """uint8 [rows, in/block_size * type_size] -> the rows' codes, sub-block scales and mins."""
    bt = BLOCK_TYPES[name]
    decode, group = _PARTS[name]
    rows = data.shape[0]
    codes, scales, mins = decode(data.contiguous().view(-1, bt.type_size))
    per_row = in_features // group
    return AffineParts(codes.reshape(rows, in_features), scales.reshape(rows, per_row),
                       None if mins is None else mins.reshape(rows, per_row), group)


@dataclass(frozen=True, eq=False)
class KScales:
    """The two levels of a K-quant row's scales as stored: per superblock of 256 the fp16 d (and dmin) as
    fp32, exact, per sub-block the 6-bit sc and m (q4_k, q5_k: 32 values), the 4-bit sc and m (q2_k: 16
    values) or the signed sc (q6_k: int8, 16 values; q3_k: s - 32, 16 values; iq4_xs: ls - 32, 32 values);
    AffineParts' scales are d * sc, its mins dmin * m."""

    d: torch.Tensor  # fp32 [rows, in / 256]
    dmin: torch.Tensor | None  # fp32 [rows, in / 256]; without mins None
    sc: torch.Tensor  # [rows, in / group]: uint8 (q4_k, q5_k 0..63; q2_k 0..15), else int8
    m: torch.Tensor | None  # uint8 [rows, in / group], 0..63 (q2_k 0..15); without mins None


def k_scales(name: str, data: torch.Tensor, in_features: int) -> KScales:
    """uint8 q2_k / q3_k / q4_k / q5_k / q6_k / iq4_xs rows [rows, in/256 * type_size] -> their d, dmin, sc
    and m."""
    if name not in K_SCALED:
        raise FormatError(f"{name} has no two-level scales ({', '.join(K_SCALED)} have)")
    b = data.contiguous().view(-1, BLOCK_TYPES[name].type_size)
    rows, blocks = data.shape[0], in_features // QK_K
    if name == "q2_k":
        d, dmin, sc, m = _q2_k_scales(b)
        return KScales(d.reshape(rows, blocks), dmin.reshape(rows, blocks), sc.reshape(rows, blocks * 16),
                       m.reshape(rows, blocks * 16))
    if name == "q3_k":
        sc = q3_k_scales(b[:, 96:108]).to(torch.int8) - 32
        return KScales(_f16(b[:, 108:110]).reshape(rows, blocks), None, sc.reshape(rows, blocks * 16), None)
    if name == "iq4_xs":
        return KScales(_f16(b[:, 0:2]).reshape(rows, blocks), None,
                       (_iq4_xs_ls(b) - 32).to(torch.int8).reshape(rows, blocks * 8), None)
    if name == "q6_k":
        return KScales(_f16(b[:, 208:210]).reshape(rows, blocks), None,
                       b[:, 192:208].contiguous().view(torch.int8).reshape(rows, blocks * 16), None)
    sc, mn = scale_min(b[:, 4:16])
    return KScales(_f16(b[:, 0:2]).reshape(rows, blocks), _f16(b[:, 2:4]).reshape(rows, blocks),
                   sc.reshape(rows, blocks * 8), mn.reshape(rows, blocks * 8))


def dequantize_rows(name: str, data: torch.Tensor, in_features: int) -> torch.Tensor:
    """uint8 [rows, in/block_size * type_size] -> fp32 [rows, in_features], as gguf.quants.dequantize."""
    p = affine_parts(name, data, in_features)
    rows = data.shape[0]
    x = p.scales.unsqueeze(2) * p.codes.view(rows, -1, p.group).to(torch.float32)
    if p.mins is not None:
        x = x - p.mins.unsqueeze(2)
    return x.reshape(rows, in_features)


def quantize_rows(name: str, w: torch.Tensor) -> torch.Tensor:
    """fp32 [rows, in] (in a multiple of the block size) -> uint8 [rows, in/block_size * type_size]."""
    bt = BLOCK_TYPES[name]
    rows, in_f = w.shape
    blocks = w.to(torch.float32).contiguous().view(-1, bt.block_size)
    return _QUANT[name](blocks).reshape(rows, in_f // bt.block_size * bt.type_size).contiguous()
