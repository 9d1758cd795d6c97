"""The mxfp4 weight format against transformers' own MXFP4 dequantization (gpt-oss's shipped layout),
and the OCP reference quantizer's rules (shared exponent, nearest e2m1 with ties to even, saturation)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from moetier.formats import FORMATS, QuantizedTensor, dequantize, quantize
from moetier.mxfp4 import E2M1_VALUES


def fresh():
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    return torch.Generator().manual_seed(seed), seed


def test_dequantize_is_bit_identical_to_transformers():
    mx = pytest.importorskip("transformers.integrations.mxfp4")
    g, seed = fresh()
    E, out_f, in_f = 3, 20, 96
    codes = torch.randint(0, 256, (E, out_f, in_f // 2), generator=g, dtype=torch.uint8)
    # every e8m0 value whose products stay finite in fp32 (6 * 2^(254-127) overflows: 2^127 * 6 > fp32 max)
    scales = torch.randint(0, 254, (E, out_f, in_f // 32), generator=g, dtype=torch.uint8)
    # transformers takes the on-disk [E, out, in/32, 16] blocks and returns [E, in, out] (x @ W orientation)
    theirs = mx.convert_moe_packed_tensors(codes.view(E, out_f, in_f // 32, 16), scales, dtype=torch.float32)
    for e in range(E):
        ours = dequantize(QuantizedTensor(FORMATS["mxfp4"], (out_f, in_f), codes[e].contiguous(), scales[e].contiguous()))
        np.testing.assert_array_equal(ours.numpy().view(np.uint32), theirs[e].T.contiguous().numpy().view(np.uint32),
                                      err_msg=f"seed {seed}, expert {e}")


def test_layout_low_nibble_is_the_even_element():
    # one block: byte j = code(2j) | code(2j + 1) << 4 with codes 0..15 then 15..0; scale 2^(130 - 127) = 8
    c = list(range(16)) + list(range(15, -1, -1))
    data = torch.tensor([[c[2 * j] | (c[2 * j + 1] << 4) for j in range(16)]], dtype=torch.uint8)
    q = QuantizedTensor(FORMATS["mxfp4"], (1, 32), data, torch.tensor([[130]], dtype=torch.uint8))
    assert dequantize(q)[0].tolist() == [8 * E2M1_VALUES[k] for k in c]


def test_quantize_follows_the_ocp_rules():
    w = torch.zeros(3, 64)
    # block 0: amax 6 * 2^-3 -> shared exponent floor(log2(0.75)) - 2 = -3: the grid values come back exactly
    w[0, :16] = torch.tensor([v / 8 for v in E2M1_VALUES]).abs() * torch.tensor([1.0, -1.0] * 8)
    # block 1: amax 11 -> scale 2^(floor(log2 11) - 2) = 2; values / 2 round to the nearest, ties to even
    w[0, 32:40] = torch.tensor([8.0, 0.5, 1.5, 2.5, 3.5, 5.0, 7.0, 11.0])
    # row 1: one huge value saturates its neighbours' grid; row 2: zeros
    w[1, 0], w[1, 1] = 100.0, 1.0
    q = quantize(w, "mxfp4")
    assert q.scales[0].tolist() == [127 - 3, 127 + 1] and q.scales[2].tolist() == [0, 0]
    back = dequantize(q)
    assert torch.equal(back[0, :16], w[0, :16])
    # /2: 4, .25, .75, 1.25, 1.75, 2.5, 3.5, 5.5 -> 4, 0 (tie to even), 1 (tie up to even), 1 (tie to even),
    # 2 (tie up), 2 (tie to even), 4 (tie up), 6 (nearest)
    assert back[0, 32:40].tolist() == [8.0, 0.0, 2.0, 2.0, 4.0, 4.0, 8.0, 12.0]
    # 100: exponent floor(log2 100) - 2 = 4, 100/16 = 6.25 saturates to 6 -> 96; 1/16 rounds to 0
    assert back[1, :2].tolist() == [96.0, 0.0]
    assert torch.equal(back[2], torch.zeros(64))


def test_round_trip_error_bound():
    # Within a block of max |w| = a, 2^E <= a < 2^(E+1), the grid step is at most 2^(E-1) (half of it is the
    # rounding error) and saturation at 6 * 2^(E-2) cuts at most a - 1.5 * 2^E < 2^(E-1): error <= 2^(E-1).
    g, seed = fresh()
    w = torch.randn(16, 256, generator=g) * torch.rand(16, 1, generator=g) * 4
    back = dequantize(quantize(w, "mxfp4"), torch.float64)
    amax = w.abs().view(16, 8, 32).amax(dim=2).repeat_interleave(32, dim=1).double()
    bound = torch.exp2(torch.floor(torch.log2(amax)) - 1)
    assert ((back - w.double()).abs() <= bound).all(), f"seed {seed}"
