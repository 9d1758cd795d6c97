"""The reference weight formats: round-trip bounds, known values, packing, partial FP8 blocks, errors."""
import math

import pytest
import torch

from moetier.errors import DTypeError, FormatError, NonFiniteError, ShapeError
from moetier.formats import (FORMATS, QuantizedTensor, dequantize, get_format, pack_int4, quantize, unpack_int4)


def rand(*shape, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() & 0xFFFF_FFFF)
    return torch.randn(*shape, generator=g)


# Worst-case round-trip bound per element, relative to the max |w| of the scale's block:
# round-to-nearest with step s = amax/qmax errs by at most s/2; float formats by half an ulp.
@pytest.mark.parametrize("fmt,bound", [
    ("fp32", 0.0), ("bf16", 2.0 ** -8), ("fp16", 2.0 ** -11),
    ("int8", 0.5 / 127), ("int4_g32", 0.5 / 7), ("int4_g64", 0.5 / 7), ("int4_g128", 0.5 / 7),
])
def test_round_trip_error_within_half_a_step(fmt, bound):
    w = rand(37, 200)
    q = quantize(w, fmt)
    back = dequantize(q, torch.float64)
    f = get_format(fmt)
    if f.kind == "float":
        # Relative bound for normal numbers; below the smallest normal the spacing is fixed, so the error
        # is at most half a subnormal step (fp16: 2^-25; random N(0,1) draws do land there).
        fi = torch.finfo(f.dtype)
        err = (back - w.double()).abs()
        assert (err <= bound * w.double().abs() + fi.tiny * fi.eps / 2).all()
        return
    if f.kind == "int8":
        amax = w.abs().amax(dim=1, keepdim=True).double()
    else:
        g = f.group_size
        groups = math.ceil(200 / g)
        padded = torch.zeros(37, groups * g)
        padded[:, :200] = w
        amax = padded.abs().view(37, groups, g).amax(dim=2).repeat_interleave(g, dim=1)[:, :200].double()
    # The scale is stored in fp32: q * scale carries up to qmax * s * 2^-24 more, i.e. a relative
    # 2 * qmax * 2^-24 (int8: 1.5e-5) of the half step (measured up to 5.2e-6).
    qmax = 127 if f.kind == "int8" else 7
    assert ((back - w.double()).abs() <= amax * bound * (1 + 2 * qmax * 2.0 ** -24) + 1e-12).all()


def test_fp8_partial_last_block_uses_block_of_128_rows():
    # 200 x 130: the scale grid is 2 x 2, and rows 128..199 (cols 128..129) form partial blocks.
    w = rand(200, 130)
    w[150:, :] *= 1000.0  # the partial block row gets a very different scale
    q = quantize(w, "fp8_e4m3")
    assert tuple(q.scales.shape) == (2, 2)
    assert q.scales[1, 0] > 100 * q.scales[0, 0]
    back = dequantize(q, torch.float64)
    # e4m3 has 3 mantissa bits: relative error of a normal value <= 2^-4.
    amax_blocks = torch.zeros(200, 130, dtype=torch.float64)
    for bi in range(2):
        for bj in range(2):
            blk = (slice(bi * 128, (bi + 1) * 128), slice(bj * 128, (bj + 1) * 128))
            amax_blocks[blk] = w[blk].abs().max().double()
    err = (back - w.double()).abs()
    assert (err <= w.double().abs() * 2 ** -4 + amax_blocks * 2 ** -9 / 448 * 64).all()
    # the wrong rule (block = 200 / 2 = 100 rows) would scale row 110 with block row 1: check it does not.
    assert torch.allclose(back[110], (q.data[110].double() * q.scales[0].double().repeat_interleave(128)[:130]))


def test_fp8_known_values():
    w = torch.zeros(128, 128)
    w[0, 0], w[0, 1], w[5, 7] = 448.0, -2.0, 0.015625
    q = quantize(w, "fp8_e4m3")
    assert q.scales.item() == 1.0  # amax 448 = e4m3 max: scale exactly 1
    assert q.data[0, 0].float() == 448.0 and q.data[0, 1].float() == -2.0 and q.data[5, 7].float() == 0.015625
    assert torch.equal(dequantize(q), w)


def test_int8_known_values_and_zero_rows():
    w = torch.tensor([[127.0, -63.5, 0.0], [0.0, 0.0, 0.0]])
    q = quantize(w, "int8")
    assert q.scales.tolist() == [1.0, 1.0]
    assert q.data.tolist() == [[127, -64, 0], [0, 0, 0]] or q.data.tolist() == [[127, -63, 0], [0, 0, 0]]
    assert torch.equal(dequantize(q)[1], torch.zeros(3))


def test_int4_packing_low_nibble_first_offset_8():
    codes = torch.tensor([[-8, 7, 0, -1, 3]], dtype=torch.int8)
    packed = pack_int4(codes)
    # (-8+8) | (7+8)<<4 = 0xF0 ; (0+8) | (-1+8)<<4 = 0x78 ; (3+8) | pad 8<<4 = 0x8B
    assert packed.tolist() == [[0xF0, 0x78, 0x8B]]
    assert torch.equal(unpack_int4(packed, 5), codes)


def test_int4_partial_last_group():
    w = rand(3, 70)  # group 64: second group has 6 columns
    q = quantize(w, "int4_g64")
    assert tuple(q.scales.shape) == (3, 2)
    assert torch.allclose(q.scales[:, 1], w[:, 64:].abs().amax(dim=1) / 7)


def test_every_format_listed_round_trips_shape_and_dtype():
    for name in FORMATS:
        in_f = get_format(name).block_size or 33  # block formats hold whole blocks per row
        q = quantize(rand(9, in_f), name)
        assert q.shape == (9, in_f) and dequantize(q).shape == (9, in_f)
        assert q.nbytes == get_format(name).nbytes(9, in_f)
        if q.fmt.block_size:  # block formats: nbytes is exactly the bytes stored
            assert q.nbytes == q.data.numel() + (0 if q.scales is None else q.scales.numel())


# Block formats: bytes per block (scales included) as llama.cpp's structs and the OCP MX spec define them.
@pytest.mark.parametrize("fmt,block,nbytes", [
    ("q8_0", 32, 34), ("q4_0", 32, 18), ("q4_1", 32, 20), ("q5_0", 32, 22), ("q5_1", 32, 24), ("q2_k", 256, 84),
    ("q3_k", 256, 110), ("q4_k", 256, 144), ("q5_k", 256, 176), ("q6_k", 256, 210), ("iq4_nl", 32, 18), ("iq4_xs", 256, 136),
    ("mxfp4", 32, 17),
])
def test_block_format_sizes_are_exact(fmt, block, nbytes):
    f = get_format(fmt)
    assert (f.block_size, f.block_bytes) == (block, nbytes)
    assert f.nbytes(3, 4 * block) == 3 * 4 * nbytes
    q = quantize(rand(3, 4 * block), fmt)
    assert q.data.dtype == torch.uint8
    if fmt == "mxfp4":
        assert q.data.shape == (3, 2 * block) and q.scales.shape == (3, 4) and q.scales.dtype == torch.uint8
    else:
        assert q.data.shape == (3, 4 * nbytes) and q.scales is None


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k",
                                 "iq4_nl", "iq4_xs", "mxfp4"])
def test_partial_blocks_are_refused_naming_the_rule(fmt):
    block = get_format(fmt).block_size
    bad = block + 16
    rule = f"in_features % {block} == 0"
    with pytest.raises(FormatError, match=rule):
        quantize(rand(4, bad), fmt)
    with pytest.raises(FormatError, match=rule):
        get_format(fmt).nbytes(4, bad)
    good = quantize(rand(4, block), fmt)
    with pytest.raises(FormatError, match=rule):
        QuantizedTensor(good.fmt, (4, bad), good.data, good.scales)
    # rows (the output dimension) are free
    assert quantize(rand(5, block), fmt).shape == (5, block)


def test_block_formats_check_their_arrays():
    q = quantize(rand(4, 256), "q4_k")
    with pytest.raises(FormatError, match="takes no scales"):
        QuantizedTensor(q.fmt, (4, 256), q.data, torch.ones(4))
    with pytest.raises(ShapeError):
        QuantizedTensor(q.fmt, (4, 256), q.data[:, :-1], None)
    m = quantize(rand(4, 64), "mxfp4")
    with pytest.raises(DTypeError, match="uint8"):
        QuantizedTensor(m.fmt, (4, 64), m.data, m.scales.float())


def test_errors_are_typed():
    with pytest.raises(FormatError, match="unknown weight format 'int3'"):
        quantize(rand(4, 4), "int3")
    with pytest.raises(ShapeError):
        quantize(rand(4), "int8")
    with pytest.raises(DTypeError):
        quantize(torch.ones(4, 4, dtype=torch.int32), "int8")
    bad = rand(4, 4)
    bad[1, 1] = float("nan")
    with pytest.raises(NonFiniteError):
        quantize(bad, "bf16")
    q = quantize(rand(4, 4), "int8")
    with pytest.raises(ShapeError):
        QuantizedTensor(q.fmt, (4, 4), q.data, q.scales[:3])
    with pytest.raises(FormatError):
        QuantizedTensor(q.fmt, (4, 4), q.data, None)
    with pytest.raises(DTypeError):
        QuantizedTensor(q.fmt, (4, 4), q.data.to(torch.int16), q.scales)
