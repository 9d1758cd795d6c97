"""GGUF block formats (q8_0, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k, q4_k, q5_k, q6_k, iq4_nl, iq4_xs) against the `gguf` package, llama.cpp's
own Python.

Dequantization must be bit-identical to gguf.quants.dequantize on any bytes (our reference quantizer's
output and random bytes, NaN patterns included); the 32-value types' quantization must produce gguf.quants.quantize's
bytes; the K-quant reference quantizers (moetier's own, no search) must stay within half a step; and
cpu.numba's in-kernel block decoder must give the reference values.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from moetier.formats import FORMATS, QuantizedTensor, dequantize, quantize
from moetier.ggml_blocks import BLOCK_TYPES, IQ4_VALUES, affine_parts, iq4_indices, k_scales, scale_min

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType  # noqa: E402

GGUF_TYPES = {"q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0,
              "q4_1": GGMLQuantizationType.Q4_1, "q5_0": GGMLQuantizationType.Q5_0,
              "q5_1": GGMLQuantizationType.Q5_1, "q2_k": GGMLQuantizationType.Q2_K, "q3_k": GGMLQuantizationType.Q3_K,
              "q4_k": GGMLQuantizationType.Q4_K, "q5_k": GGMLQuantizationType.Q5_K,
              "q6_k": GGMLQuantizationType.Q6_K, "iq4_nl": GGMLQuantizationType.IQ4_NL,
              "iq4_xs": GGMLQuantizationType.IQ4_XS}
NAMES = tuple(GGUF_TYPES)


def fresh(seed=None):
    seed = int(torch.randint(0, 2**31 - 1, (1,))) if seed is None else seed
    return torch.Generator().manual_seed(seed), seed


def bits(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32)).view(np.uint32)


def test_block_table_matches_the_gguf_package():
    for name, t in GGUF_TYPES.items():
        bt = BLOCK_TYPES[name]
        assert bt.ggml_type == int(t)
        assert (bt.block_size, bt.type_size) == gguf.GGML_QUANT_SIZES[t]
        assert (FORMATS[name].block_size, FORMATS[name].block_bytes) == (bt.block_size, bt.type_size)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("rows,blocks", [(1, 1), (7, 3), (33, 2)])
def test_dequantize_is_bit_identical_to_gguf(name, rows, blocks):
    g, seed = fresh()
    bt = BLOCK_TYPES[name]
    in_f = blocks * bt.block_size
    w = torch.randn(rows, in_f, generator=g) * torch.rand(rows, 1, generator=g) * 3
    q = quantize(w, name)
    ours = dequantize(q, torch.float32).numpy()
    theirs = gguf.quants.dequantize(q.data.numpy(), GGUF_TYPES[name])
    assert theirs.shape == (rows, in_f)
    np.testing.assert_array_equal(bits(ours), bits(theirs), err_msg=f"seed {seed}")
    # float64 is exactly those fp32 values (the format's definition), not a re-derivation
    assert torch.equal(dequantize(q, torch.float64), torch.from_numpy(theirs).double())


@pytest.mark.parametrize("name", NAMES)
def test_dequantize_any_bytes_is_bit_identical_to_gguf(name):
    # Random bytes exercise every scale / min / high-bit pattern, including fp16 inf and NaN fields.
    g, seed = fresh()
    bt = BLOCK_TYPES[name]
    data = torch.randint(0, 256, (16, 4 * bt.type_size), generator=g, dtype=torch.uint8)
    ours = dequantize(QuantizedTensor(FORMATS[name], (16, 4 * bt.block_size), data)).numpy()
    with np.errstate(invalid="ignore", over="ignore"):
        theirs = gguf.quants.dequantize(data.numpy(), GGUF_TYPES[name])
    # A NaN's sign and payload come from the operation order (inf * 0, inf - inf), which the format
    # does not define: NaNs must sit in the same places; every other value is bit-identical.
    nan = np.isnan(theirs)
    np.testing.assert_array_equal(np.isnan(ours), nan, err_msg=f"seed {seed}")
    np.testing.assert_array_equal(bits(np.where(nan, 0, ours)), bits(np.where(nan, 0, theirs).astype(theirs.dtype)),
                                  err_msg=f"seed {seed}")


@pytest.mark.parametrize("name", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
def test_32_value_types_quantize_to_gguf_bytes(name):
    g, seed = fresh()
    w = torch.randn(40, 96, generator=g)
    w[3] = 0.0  # an all-zero block: scale 0
    w[5, :32] = torch.tensor([0.5, -0.5, 1.5, -2.5] * 8)  # exact ties for the rounding rule
    w[6, :32] = 7.0  # a constant block
    w[7, 5] = -w[7].abs().max() * 2  # q4_0 / q5_0's signed max: the most negative value leads
    w[8, 32:64] = torch.linspace(-3, 1, 32)  # q4_1 / q5_1: min and max at the block's ends
    theirs = gguf.quants.quantize(w.numpy(), GGUF_TYPES[name])
    ours = quantize(w, name).data.numpy()
    np.testing.assert_array_equal(ours, theirs, err_msg=f"seed {seed}")


def _k_step(name: str, data: torch.Tensor, in_f: int) -> torch.Tensor:
    """The quantization step of every value's sub-block (d*sc), read back from the blocks."""
    bt = BLOCK_TYPES[name]
    blocks = data.reshape(-1, bt.type_size)
    n = blocks.shape[0]
    if name == "q6_k":
        d = blocks[:, 208:210].contiguous().view(torch.float16).float()
        sc = blocks[:, 192:208].contiguous().view(torch.int8).float()
        return (d * sc).abs().repeat_interleave(16, dim=1).reshape(data.shape[0], in_f)
    if name in ("q2_k", "q3_k"):  # read through the other decoder (k_scales) than the values (affine_parts)
        k = k_scales(name, data, in_f)
        return (k.d.repeat_interleave(16, dim=1) * k.sc.float()).abs().repeat_interleave(16, dim=1)
    d = blocks[:, 0:2].contiguous().view(torch.float16).float()
    sc, _ = scale_min(blocks[:, 4:16])
    return (d * sc.float()).repeat_interleave(32, dim=1).reshape(n // (in_f // 256), in_f)


@pytest.mark.parametrize("name", ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"])
def test_k_quant_reference_quantizer_error_within_half_a_step(name):
    # Round to nearest on each sub-block's own stored grid (d*sc), which the quantizer sizes (rounding the
    # scales and mins up) so that no value is clamped: |error| <= step / 2 everywhere, up to the fp32
    # rounding of d*q - m (~2^-24 of a value of at most 63 steps).
    g, seed = fresh()
    w = torch.randn(24, 512, generator=g) * torch.rand(24, 1, generator=g)
    w[2, :256] = -0.75  # a constant negative super-block: reproduced through the min alone
    w[3, 256:] = 0.0
    q = quantize(w, name)
    back = dequantize(q, torch.float64)
    step = _k_step(name, q.data, 512).double()
    err = (back - w.double()).abs()
    assert (err <= step * 0.5 + 64 * 2.0 ** -24 * back.abs().amax(dim=1, keepdim=True) + 1e-30).all(), f"seed {seed}"
    assert torch.equal(back[3, 256:], torch.zeros(256, dtype=torch.float64))
    rel = float((back - w.double()).norm() / w.double().norm())
    # RTN on N(0,1) draws: step ~ range / levels, rms error ~ step / sqrt(12)
    # (q2_k: 4 levels over a 16-value range of ~3.5 sigma -> ~0.34; q3_k: 7 levels over +-max -> ~0.2)
    assert rel < {"q2_k": 0.4, "q3_k": 0.25, "q4_k": 0.1, "q5_k": 0.05, "q6_k": 0.03}[name], f"seed {seed}: rel {rel}"


def test_known_values_q8_0_and_q4_0():
    # q8_0: d = 0.5 (f16 0x3800), qs = -128..-97 -> x = -64..-48.5
    blk = bytes([0x00, 0x38]) + bytes((np.arange(-128, -96).astype(np.int8)).view(np.uint8))
    q = QuantizedTensor(FORMATS["q8_0"], (1, 32), torch.frombuffer(bytearray(blk), dtype=torch.uint8).view(1, 34))
    assert dequantize(q).tolist() == [[0.5 * v for v in range(-128, -96)]]
    # q4_0: d = 2 (0x4000); byte j = (j & 15) | (15 - j) << 4: x[j] = 2 (j - 8), x[j + 16] = 2 (7 - j)
    blk = bytes([0x00, 0x40]) + bytes(((j & 15) | ((15 - j) << 4)) for j in range(16))
    q = QuantizedTensor(FORMATS["q4_0"], (1, 32), torch.frombuffer(bytearray(blk), dtype=torch.uint8).view(1, 18))
    assert dequantize(q).tolist() == [[2.0 * (j - 8) for j in range(16)] + [2.0 * (7 - j) for j in range(16)]]


def test_known_values_q4_k_scale_packing():
    # d = 1, dmin = 0.5; sub-block s gets scale s + 1 and min 63 - s (the high sub-blocks use the split
    # 2 + 4 bit fields); every nibble 3: x = (s + 1) * 3 - 0.5 * (63 - s).
    sc = torch.arange(1, 9, dtype=torch.uint8).view(1, 8)
    mn = (63 - torch.arange(8)).to(torch.uint8).view(1, 8)
    from moetier.ggml_blocks import pack_scale_min

    packed = pack_scale_min(sc, mn)
    assert torch.equal(torch.cat(scale_min(packed), dim=1), torch.cat([sc, mn], dim=1))
    blk = torch.cat([torch.tensor([0x00, 0x3C, 0x00, 0x38], dtype=torch.uint8).view(1, 4), packed,
                     torch.full((1, 128), 0x33, dtype=torch.uint8)], dim=1)
    x = dequantize(QuantizedTensor(FORMATS["q4_k"], (1, 256), blk))[0]
    want = torch.tensor([(s + 1) * 3 - 0.5 * (63 - s) for s in range(8)]).repeat_interleave(32)
    assert torch.equal(x, want)
    np.testing.assert_array_equal(x.numpy(), gguf.quants.dequantize(blk.numpy(), GGUF_TYPES["q4_k"])[0])


def test_known_values_q2_k_and_q3_k():
    # Written out by hand from the block structs. q2_k: d = 1, dmin = 0.5, sub-block s: sc = s % 16,
    # m = 15 - s; qs[32h + l] = 0b11100100 (codes 0, 1, 2, 3 for i = 0..3): value 128h + 32i + l = i.
    sc_m = bytes((s % 16) | ((15 - s) << 4) for s in range(16))
    blk = sc_m + bytes([0b11100100] * 64) + bytes([0x00, 0x3C, 0x00, 0x38])
    x = dequantize(QuantizedTensor(FORMATS["q2_k"], (1, 256), torch.frombuffer(bytearray(blk), dtype=torch.uint8)
                                   .view(1, 84)))[0].tolist()
    assert x == [(v // 16) * ((v // 32) % 4) - 0.5 * (15 - v // 16) for v in range(256)]
    # q3_k: d = 2; sub-block s has the 6-bit scale 32 + s - 8 (split 4 + 2 bits); low bits as above; hmask
    # bit j of byte l set for odd l only: value 32j + l is i - 4 + 4 (l % 2), i = j % 4.
    s6 = [32 + s - 8 for s in range(16)]
    low = bytes((s6[b] & 15) | ((s6[b + 8] & 15) << 4) for b in range(8))
    high = bytes(sum(((s6[4 * c + b] >> 4) & 3) << (2 * c) for c in range(4)) for b in range(4))
    blk = bytes([0xFF if l % 2 else 0x00 for l in range(32)]) + bytes([0b11100100] * 64) + low + high + bytes([0x00, 0x40])
    x = dequantize(QuantizedTensor(FORMATS["q3_k"], (1, 256), torch.frombuffer(bytearray(blk), dtype=torch.uint8)
                                   .view(1, 110)))[0].tolist()
    assert x == [2.0 * (v // 16 - 8) * ((v // 32) % 4 - 4 + 4 * (v % 2)) for v in range(256)]
    np.testing.assert_array_equal(np.asarray(x, np.float32),
                                  gguf.quants.dequantize(np.frombuffer(blk, np.uint8).reshape(1, -1), GGUF_TYPES["q3_k"])[0])


@pytest.mark.parametrize("name", ["iq4_nl", "iq4_xs"])
def test_iq4_reference_quantizer_picks_the_nearest_grid_value(name):
    # moetier's own quantizer (gguf has none): each value's index is the nearest grid value under its block's
    # stored scale, so |error| <= half the widest grid gap (24) times that scale, or the clamp past 113.
    g, seed = fresh()
    w = torch.randn(12, 512, generator=g) * torch.rand(12, 1, generator=g) * 2
    w[4] = 0.0
    q = quantize(w, name)
    p = affine_parts(name, q.data, 512)
    step = p.scales.abs().repeat_interleave(32, dim=1).double()
    err = (dequantize(q, torch.float64) - w.double()).abs()
    assert (err <= 14 * step + 1e-6 * w.abs().amax()).all(), f"seed {seed}"
    assert torch.equal(dequantize(q)[4], torch.zeros(512))
    rel = float((dequantize(q, torch.float64) - w.double()).norm() / w.double().norm())
    assert rel < 0.12, f"seed {seed}: rel {rel}"  # 4-bit RTN on normal draws: ~0.08
    idx = iq4_indices(name, q.data, 512)
    assert torch.equal(torch.tensor(IQ4_VALUES, dtype=torch.int8)[idx.long()], p.codes)


def test_known_values_iq4_nl_and_iq4_xs():
    # d = 0.5: index j of the 16 low nibbles, 15 - j of the high ones
    nib = bytes(((j & 15) | ((15 - j) << 4)) for j in range(16))
    want = [0.5 * v for v in IQ4_VALUES] + [0.5 * v for v in reversed(IQ4_VALUES)]
    blk = torch.frombuffer(bytearray(bytes([0x00, 0x38]) + nib), dtype=torch.uint8).view(1, 18)
    assert dequantize(QuantizedTensor(FORMATS["iq4_nl"], (1, 32), blk))[0].tolist() == want
    # iq4_xs: d = 0.5, sub-block s has ls = 33 + s (scale 0.5 (s + 1)): low nibbles 1..8, high bits of 33+s = 2
    ls = [33 + s for s in range(8)]
    lo = bytes(((ls[2 * i] & 15) | ((ls[2 * i + 1] & 15) << 4)) for i in range(4))
    h = sum(((v >> 4) & 3) << (2 * s) for s, v in enumerate(ls))
    blk = bytes([0x00, 0x38, h & 0xFF, h >> 8]) + lo + nib * 8
    x = dequantize(QuantizedTensor(FORMATS["iq4_xs"], (1, 256), torch.frombuffer(bytearray(blk), dtype=torch.uint8)
                                   .view(1, 136)))[0]
    assert x.tolist() == [v * (s + 1) for s in range(8) for v in want]
    np.testing.assert_array_equal(x.numpy(), gguf.quants.dequantize(np.frombuffer(blk, np.uint8).reshape(1, 136),
                                                                    GGUF_TYPES["iq4_xs"])[0])


def test_known_values_q4_1_q5_0_q5_1():
    # d = 2 (0x4000), m = -1 (0xBC00); nibble byte j = (j & 15) | (15 - j) << 4; qh = 0xFFFF0000 sets the
    # fifth bit of values 16..31 only.
    nib = bytes(((j & 15) | ((15 - j) << 4)) for j in range(16))
    lo, hi = [j for j in range(16)], [15 - j for j in range(16)]
    qh = bytes([0x00, 0x00, 0xFF, 0xFF])

    def values(name, blk):
        nb = BLOCK_TYPES[name].type_size
        return dequantize(QuantizedTensor(FORMATS[name], (1, 32), torch.frombuffer(bytearray(blk), dtype=torch.uint8)
                                          .view(1, nb)))[0].tolist()

    assert values("q4_1", bytes([0x00, 0x40, 0x00, 0xBC]) + nib) == [2.0 * q - 1 for q in lo + hi]
    assert values("q5_0", bytes([0x00, 0x40]) + qh + nib) == [2.0 * (q - 16) for q in lo + [h + 16 for h in hi]]
    assert values("q5_1", bytes([0x00, 0x40, 0x00, 0xBC]) + qh + nib) == [2.0 * q - 1 for q in lo + [h + 16 for h in hi]]


@pytest.mark.parametrize("name", NAMES + ("mxfp4",))
def test_numba_block_decoder_gives_the_reference_values(name):
    pytest.importorskip("numba")
    from moetier.backends import cpu_numba
    from moetier.backends import numba_kernels as k

    g, seed = fresh()
    f = FORMATS[name]
    rows, n = 9, 2 * f.block_size
    q = quantize(torch.randn(rows, n, generator=g), name)
    want = dequantize(q).numpy()
    raw = cpu_numba._row_bytes(q).reshape(1, rows, -1)  # the bytes the kernel streams
    kind = cpu_numba._KINDS[name]
    z16, zi8, z32 = np.zeros((1, 1, 1), np.uint16), np.zeros((1, 1, 1), np.int8), np.zeros((1, 1, 1), np.float32)
    got = np.empty((rows, n), np.float32)
    for r in range(rows):
        buf = np.zeros(n + k.SCRATCH_ALIGN, np.float32)
        k.decode_row(kind, 1, n, 0, r, raw, z16, zi8, z32, np.zeros((1, rows, 0), np.float32), buf, buf.view(np.uint32))
        got[r] = buf[:n]
    if name in ("q4_1", "q5_1", "q2_k", "q4_k", "q5_k"):
        # d*q - m: LLVM may fuse it into one FMA (one rounding instead of two): at most an ulp of the terms.
        tol = 2.0 ** -22 * np.abs(want).max(axis=1, keepdims=True)
        assert (np.abs(got - want) <= tol).all(), f"seed {seed}"
    else:  # products only: exact
        np.testing.assert_array_equal(bits(got), bits(want), err_msg=f"seed {seed}")
