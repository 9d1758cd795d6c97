"""MXFP4 (OCP Microscaling Formats v1.0): blocks of 32 e2m1 values sharing one e8m0 power-of-two scale,
along the input dimension, stored as gpt-oss ships it (and transformers' integrations/mxfp4.py reads it):

    codes  uint8 [out, in/2]  : the row's blocks of 16 bytes; byte j of a block holds element 2j in its
                                low nibble and element 2j+1 in its high nibble (gpt-oss `*_blocks`
                                [.., out, in/32, 16] with the last two axes flattened)
    scales uint8 [out, in/32] : e8m0, biased 127 (gpt-oss `*_scales`)
    W[r, c] = E2M1[code] * 2^(scales[r, c // 32] - 127),
    E2M1 = {0, .5, 1, 1.5, 2, 3, 4, 6, -0, -.5, -1, -1.5, -2, -3, -4, -6} (code bit 3 is the sign)

4.25 bits per weight. `in` must be a multiple of 32 (the shipped layout has no partial block).
Dequantization is transformers' own (`convert_moe_packed_tensors`: a table lookup then `torch.ldexp`),
bit for bit in fp32. The reference quantizer follows the OCP spec (section 6.3): shared exponent
floor(log2(amax)) - 2 (e2m1's largest exponent), elements rounded to the nearest e2m1 value with ties to
the even code and saturated at +-6.

Note: GGUF's MXFP4 type (39) packs the same numbers differently (element j and j+16 share a byte, and
its scale byte leads each 17-byte block); it is not this format.
"""
from __future__ import annotations

import torch

BLOCK = 32
E8M0_BIAS = 127
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
# Magnitude thresholds between consecutive e2m1 values and whether a tie goes up (to the even code).
_THRESHOLDS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))


def dequantize(codes: torch.Tensor, scales: torch.Tensor, in_features: int) -> torch.Tensor:
    """codes uint8 [out, in/2], scales uint8 [out, in/32] -> fp32 [out, in]."""
    out_f = codes.shape[0]
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32)
    vals = torch.empty(out_f, in_features, dtype=torch.float32)
    vals[:, 0::2] = lut[(codes & 0x0F).to(torch.int64)]
    vals[:, 1::2] = lut[(codes >> 4).to(torch.int64)]
    exp = (scales.to(torch.int32) - E8M0_BIAS).repeat_interleave(BLOCK, dim=1)
    return torch.ldexp(vals, exp)


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 [out, in] (in a multiple of 32) -> (codes uint8 [out, in/2], scales uint8 [out, in/32])."""
    out_f, in_f = w.shape
    blocks = w.to(torch.float32).reshape(out_f, in_f // BLOCK, BLOCK)
    amax = blocks.abs().amax(dim=2)
    _, e = torch.frexp(amax)  # amax = m * 2^e, m in [0.5, 1): floor(log2(amax)) = e - 1
    biased = torch.where(amax > 0, e - 1 - 2 + E8M0_BIAS, torch.zeros_like(e)).clamp(0, 254)
    y = torch.ldexp(blocks, (E8M0_BIAS - biased).unsqueeze(2))  # exact: a power-of-two rescale
    a = y.abs()
    code = torch.zeros_like(a, dtype=torch.int32)
    for t, tie_up in _THRESHOLDS:
        code += (a >= t if tie_up else a > t).to(torch.int32)
    code = torch.where((y < 0) & (code > 0), code | 8, code).to(torch.uint8).reshape(out_f, in_f)
    packed = code[:, 0::2] | (code[:, 1::2] << 4)
    return packed.contiguous(), biased.to(torch.uint8).contiguous()
