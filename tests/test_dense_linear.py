"""Dense matrices on the native kernels (moetier.dense; kernels/dense_linear.h) against the float64 oracle.

Bounds, relative Frobenius error against x W^T + b in float64 on the same (dequantized) weights:
- decode (<= 4 tokens) of float weights and of integer weights on short rows (K < 256) runs in fp32 on
  weights exact in fp32: only the summation order differs, ~sqrt(K) * 2^-24 ~ 1e-6; bound FP32_BOUND 2e-5
  (the conformance fp32 bound). fp8 decode on the VBMI kernels splits x into bf16 hi + lo parts, which
  carry ~16 significant bits: ~2^-17 ~ 1e-5 worst, bound 5e-5 (measured 2.3e-6).
- everything else rounds activations (bf16 for vdpbf16ps, int8 per token for vpdpbusd): the conformance
  suite's bound of the format (bf16 / fp16 / fp8 1e-2; int8 / int4 4e-2), the same argument as for one
  expert matrix. A wrong panel, scale, group or bias moves the error above 1e-1.
"""
from __future__ import annotations

import os

import pytest
import torch

from moetier.conformance.tolerances import tolerance
from moetier.errors import DeviceError, DTypeError, FormatError, PreparedExpertsError, ShapeError
from moetier.formats import QuantizedTensor, get_format, quantize
from moetier.reference import oracle
from test_native_common import DOT_VARIANTS, RUNNABLE, make_backend, needs_native, rel_err

pytestmark = needs_native

FORMATS = ("fp32", "bf16", "fp16", "int8", "int4_g32", "int4_g64", "int4_g128", "fp8_e4m3")
# GGUF blocks and mxfp4: rows of whole blocks (256 values for the K-quants, 32 for the others)
BLOCKS = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_nl", "iq4_xs", "mxfp4")
FP32_BOUND = 2e-5
FP8_SPLIT_BOUND = 5e-5
INT8_DECODE_MIN_K = 256  # kernels/moe_layer.h: shorter rows decode on the exact fp32 path


def fresh_gen() -> torch.Generator:
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))


def bound(variant: str, fmt: str, T: int, K: int, backend) -> float:
    if fmt == "fp32":
        return FP32_BOUND
    if fmt.startswith("int") or fmt in BLOCKS:  # the integer dot path, every variant
        return tolerance(fmt) if T > 4 or K >= INT8_DECODE_MIN_K else FP32_BOUND
    if variant not in DOT_VARIANTS:
        return FP32_BOUND  # no vdpbf16ps kernels: float formats on the fp32 path
    if T > 4:
        return tolerance(fmt)
    if fmt == "fp8_e4m3" and backend.fp8_vbmi:
        return FP8_SPLIT_BOUND
    return FP32_BOUND


def check(backend, variant, fmt, N, K, T, *, bias: bool, dtype=torch.float32):
    gen = fresh_gen()
    w = torch.randn(N, K, generator=gen) / K ** 0.5
    b = torch.randn(N, generator=gen) if bias else None
    q = quantize(w, fmt)
    packed = backend.pack_linear(q, b)
    x = torch.randn(T, K, generator=gen).to(dtype)
    y = backend.linear(packed, x)
    assert y.shape == (T, N) and y.dtype == dtype
    ref = x.double() @ q.dequantize(torch.float64).T + (0 if b is None else b.double())
    err = rel_err(y, ref)
    limit = max(bound(variant, fmt, T, K, backend), 4e-3 if dtype == torch.bfloat16 else 0)  # bf16 output rounding
    assert err <= limit, f"{variant} {fmt} N={N} K={K} T={T} bias={bias}: {err:.2e} > {limit:g}"
    return packed, x, y


@pytest.mark.parametrize("variant", RUNNABLE)
@pytest.mark.parametrize("fmt", FORMATS)
def test_matches_the_oracle(variant, fmt, monkeypatch):
    """Odd sizes: N=200 is 13 panels (a bundle of one), K=224 pads the int4 g64/g128 and fp8 groups; K=320 is long
    enough for int8-activation decode. Decode (1, 4 tokens), bundle prefill (7) and block prefill (40)."""
    backend = make_backend(variant, monkeypatch)
    for N, K in ((200, 224), (48, 320)):
        for T in (1, 4, 7, 40):
            check(backend, variant, fmt, N, K, T, bias=T % 2 == 1)


@pytest.mark.parametrize("variant", RUNNABLE)
@pytest.mark.parametrize("fmt", BLOCKS)
def test_block_formats_match_the_oracle(variant, fmt, monkeypatch):
    """The GGUF layouts (grouped int8, per-group mins) and mxfp4 (e2m1 codes in int4 panels) as dense
    matrices: K=256 decodes on the int8 dot path where the build has it, the exact fp32 path otherwise
    (the fp32 bound: the packed values are the file's values themselves); K=512 with N=200 (a bundle of
    one)."""
    backend = make_backend(variant, monkeypatch)
    for N, K in ((200, 512), (48, 256)):
        for T in (1, 4, 7, 40):
            check(backend, variant, fmt, N, K, T, bias=T % 2 == 1)


@pytest.mark.parametrize("variant", RUNNABLE)
@pytest.mark.parametrize("T", [1, 40])
def test_mxfp4_int8_path_is_exact_on_integer_activations(variant, T, monkeypatch):
    """Activations that are integers with |x| max 127 in every row quantize to int8 exactly (scale 1), so the
    vpdpbusd path (12 + twice the e2m1 value per byte, the offset taken back out) must give the exact sum
    like the fp32 path: every code of the byte table checked to the fp32 bound, not the int8 budget."""
    gen = fresh_gen()
    N, K = 48, 512
    # Random codes, so every e2m1 code (-0 included, which the quantizer never writes) is exercised.
    codes = torch.randint(0, 256, (N, K // 2), generator=gen, dtype=torch.uint8)
    scales = torch.randint(120, 132, (N, K // 32), generator=gen, dtype=torch.uint8)
    q = QuantizedTensor(get_format("mxfp4"), (N, K), codes, scales)
    x = torch.randint(-127, 128, (T, K), generator=gen).float()
    x[:, 0] = 127.0
    backend = make_backend(variant, monkeypatch)
    y = backend.linear(backend.pack_linear(q, None), x)
    ref = x.double() @ q.dequantize(torch.float64).T
    err = rel_err(y, ref)
    assert err <= FP32_BOUND, f"{variant} T={T}: {err:.2e}"


@pytest.mark.parametrize("variant", RUNNABLE)
@pytest.mark.parametrize("e", [0, 1, 2, 127, 160])
def test_mxfp4_scales_are_exact_powers_of_two(variant, e, monkeypatch):
    """The panels keep the e8m0 bytes and read them as 2^(e - 128) (the table holds twice the e2m1 values):
    the subnormal scales of e = 0 and 1 included, on the fp32 path (1 token, K = 64) and the vpdpbusd
    path (K = 512), every row exact to one fp32 rounding."""
    gen = fresh_gen()
    backend = make_backend(variant, monkeypatch)
    for K, T in ((64, 1), (512, 1), (512, 40)):
        codes = torch.randint(0, 256, (32, K // 2), generator=gen, dtype=torch.uint8)
        q = QuantizedTensor(get_format("mxfp4"), (32, K), codes, torch.full((32, K // 32), e, dtype=torch.uint8))
        x = torch.randint(-127, 128, (T, K), generator=gen).float()
        x[:, 0] = 127.0
        y = backend.linear(backend.pack_linear(q, None), x).double()
        ref = x.double() @ q.dequantize(torch.float64).T
        assert ((y - ref).abs() <= 2 ** -22 * ref.abs()).all(), f"{variant} e={e} K={K} T={T}"


@pytest.mark.parametrize("variant", RUNNABLE)
def test_bf16_in_and_out(variant, monkeypatch):
    backend = make_backend(variant, monkeypatch)
    for fmt in ("bf16", "int8"):
        for T in (1, 33):
            check(backend, variant, fmt, 96, 320, T, bias=True, dtype=torch.bfloat16)


def test_the_thread_count_changes_no_bit(monkeypatch):
    variant = RUNNABLE[-1]
    one, two = make_backend(variant, monkeypatch, threads=1), make_backend(variant, monkeypatch, threads=2)
    gen = fresh_gen()
    for fmt in ("bf16", "int4_g64", "fp8_e4m3"):
        q = quantize(torch.randn(520, 256, generator=gen), fmt)
        b = torch.randn(520, generator=gen)
        p1, p2 = one.pack_linear(q, b), two.pack_linear(q, b)
        for T in (1, 3, 50):
            x = torch.randn(T, 256, generator=gen)
            assert torch.equal(one.linear(p1, x), two.linear(p2, x)), f"{fmt} T={T}"


def test_a_zero_row_gives_exact_zeros(monkeypatch):
    backend = make_backend(RUNNABLE[-1], monkeypatch)
    gen = fresh_gen()
    for fmt in ("bf16", "int8", "int4_g32", "fp8_e4m3"):
        packed = backend.pack_linear(quantize(torch.randn(64, 256, generator=gen), fmt))
        for T in (1, 20):
            x = torch.randn(T, 256, generator=gen)
            x[T // 2] = 0
            y = backend.linear(packed, x)
            assert torch.equal(y[T // 2], torch.zeros(64)) and not torch.signbit(y[T // 2]).any(), fmt


def test_nan_propagates_to_its_row_only(monkeypatch):
    backend = make_backend(RUNNABLE[-1], monkeypatch)
    packed = backend.pack_linear(quantize(torch.randn(32, 256), "int8"))
    x = torch.randn(3, 256)
    x[1, 7] = float("nan")
    y = backend.linear(packed, x)
    assert y[1].isnan().all() and y[[0, 2]].isfinite().all()


def test_empty_input(monkeypatch):
    backend = make_backend(RUNNABLE[-1], monkeypatch)
    packed = backend.pack_linear(quantize(torch.randn(32, 64), "bf16"))
    assert backend.linear(packed, torch.empty(0, 64)).shape == (0, 32)


def test_bad_inputs_are_typed_errors(monkeypatch):
    backend = make_backend(RUNNABLE[-1], monkeypatch)
    q = quantize(torch.randn(32, 64), "bf16")
    packed = backend.pack_linear(q)
    with pytest.raises(ShapeError, match=r"\[T, 64\]"):
        backend.linear(packed, torch.randn(2, 65))
    with pytest.raises(ShapeError):
        backend.linear(packed, torch.randn(64))
    with pytest.raises(DTypeError, match="float32 or bfloat16"):
        backend.linear(packed, torch.randn(2, 64).half())
    with pytest.raises(DTypeError):
        backend.linear(packed, [[0.0] * 64])
    with pytest.raises(DeviceError):
        backend.linear(packed, torch.randn(2, 64, device="meta"))
    with pytest.raises(PreparedExpertsError, match="pack it with this backend"):
        backend.linear(oracle().pack_linear(q), torch.randn(2, 64))
    with pytest.raises(ShapeError, match="bias"):
        backend.pack_linear(q, torch.randn(31))
    with pytest.raises(DTypeError, match="QuantizedTensor"):
        backend.pack_linear(torch.randn(32, 64))
    backend.dense_formats = ("int8",)  # as a backend without bf16 dense kernels declares
    with pytest.raises(FormatError, match="bf16"):
        backend.pack_linear(q)


def test_a_backend_without_dense_kernels_says_so():
    from moetier.hardware import detect_inventory
    from moetier.plugins import get_registry

    spec = get_registry().backend("cpu.numba")
    if not spec.safe_probe(detect_inventory()).usable:
        pytest.skip("cpu.numba is not usable here")
    numba = spec.create(detect_inventory())
    assert numba.dense_formats == ()
    with pytest.raises(FormatError, match="cpu.numba"):
        numba.pack_linear(quantize(torch.randn(16, 32), "bf16"))


def test_the_oracle_computes_every_format():
    o = oracle()
    gen = fresh_gen()
    w, b, x = torch.randn(24, 256, generator=gen), torch.randn(24, generator=gen), torch.randn(5, 256, generator=gen)
    for fmt in ("bf16", "int8", "q8_0", "q4_k", "mxfp4"):
        q = quantize(w, fmt)
        y = o.linear(o.pack_linear(q, b), x)
        assert y.dtype == torch.float32
        assert rel_err(y, x.double() @ q.dequantize(torch.float64).T + b.double()) < 1e-7, fmt


@needs_native
@pytest.mark.parametrize("variant", RUNNABLE)
@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4_g64", "fp8_e4m3"])
@pytest.mark.parametrize("T", [1, 3, 9])
def test_several_matrices_in_one_call_compute_what_each_does(variant, fmt, T, monkeypatch):
    """compute_dense_many (a layer's q, k and v on one x: one conversion, one pool dispatch) gives each
    matrix's own result bit for bit, decode and prefill; matrices of different formats take one call each."""
    backend = make_backend(variant, monkeypatch, threads=2)
    g = fresh_gen()
    K = 256
    packed = [backend.pack_linear(quantize(torch.randn(n, K, generator=g) * 0.05, fmt),
                                  torch.randn(n, generator=g) if n == 80 else None) for n in (256, 64, 80)]
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(T, K, generator=g).to(dtype)
        many = backend.compute_dense_many(packed, x, dtype)
        for p, got in zip(packed, many):
            assert got.shape == (T, p.out_features) and got.dtype == dtype
            assert torch.equal(got, backend.linear(p, x))
    other = backend.pack_linear(quantize(torch.randn(32, K, generator=g), "bf16" if fmt != "bf16" else "int8"))
    x = torch.randn(T, K, generator=g)
    mixed = backend.compute_dense_many([packed[0], other], x, torch.float32)
    assert torch.equal(mixed[0], backend.linear(packed[0], x)) and torch.equal(mixed[1], backend.linear(other, x))
    # the binding itself refuses matrices that do not share the input's forms
    with pytest.raises(ValueError, match="differ"):
        backend._ext.dense_forward_many(backend._kernel_pool, [packed[0].payload, other.payload], x.numpy(), False,
                                        [torch.empty(T, 256).numpy(), torch.empty(T, 32).numpy()], False)


# ---- grouped (block-diagonal) matrices: multi-head latent attention's per-head W_kb / W_vb -------------

def grouped_reference(q: QuantizedTensor, groups: int, x: torch.Tensor, b) -> torch.Tensor:
    """x [T, G k] times the block-diagonal matrix of q's stacked blocks, in float64."""
    w = q.dequantize(torch.float64)
    blocks = w.view(groups, -1, w.shape[1])
    y = torch.einsum("tgk,gnk->tgn", x.double().view(x.shape[0], groups, -1), blocks).reshape(x.shape[0], -1)
    return y if b is None else y + b.double()


@pytest.mark.parametrize("variant", RUNNABLE)
@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4_g64", "fp8_e4m3", "q8_0"])
def test_grouped_matrices_match_the_oracle(variant, fmt, monkeypatch):
    """Blocks of 16 rows (four groups share a bundle), 48 (groups straddle bundles), 128 and 512 rows (a
    group spans bundles), over 1-5 tokens; each token's row of x meets only its own block (a block that
    read another group's x moves the error to ~1)."""
    backend = make_backend(variant, monkeypatch, threads=2)
    gen = fresh_gen()
    for rows, K, G in ((16, 256, 12), (48, 320, 5), (128, 256, 6), (512, 256, 3)):
        q = quantize(torch.randn(rows * G, K, generator=gen) / K ** 0.5, fmt)
        b = torch.randn(rows * G, generator=gen) if G % 2 else None
        packed = backend.pack_linear(q, b, groups=G)
        assert (packed.groups, packed.in_features, packed.out_features) == (G, G * K, G * rows)
        for T in (1, 2, 5):
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(T, G * K, generator=gen).to(dtype)
                y = backend.linear(packed, x)
                assert y.shape == (T, rows * G) and y.dtype == dtype
                err = rel_err(y, grouped_reference(q, G, x, b))
                limit = max(bound(variant, fmt, 1, K, backend), 4e-3 if dtype == torch.bfloat16 else 0)
                assert err <= limit, f"{variant} {fmt} rows={rows} G={G} T={T} {dtype}: {err:.2e} > {limit:g}"
        # the reference backend computes the same block-diagonal product
        o = oracle()
        x = torch.randn(2, G * K, generator=gen)
        assert rel_err(o.linear(o.pack_linear(q, b, groups=G), x), grouped_reference(q, G, x, b)) < 1e-7  # fp32 output


def test_grouped_matrices_are_refused_where_they_cannot_be_packed(monkeypatch):
    backend = make_backend(RUNNABLE[-1], monkeypatch)
    q = quantize(torch.randn(96, 64), "bf16")
    with pytest.raises(ShapeError, match="16-row panels per group"):
        backend.pack_linear(q, groups=12)  # 8 rows per group
    with pytest.raises(ShapeError, match="dividing out_features 96"):
        backend.pack_linear(q, groups=5)
    with pytest.raises(ShapeError, match="positive integer"):
        backend.pack_linear(q, groups=0)
    packed = backend.pack_linear(q, groups=3)
    with pytest.raises(ShapeError, match=r"\[T, 192\]"):
        backend.linear(packed, torch.randn(1, 64))
    # never one of several matrices sharing an input
    plain = backend.pack_linear(quantize(torch.randn(32, 192), "bf16"))
    x = torch.randn(1, 192)
    a, c = backend.compute_dense_many([packed, plain], x, torch.float32)
    assert torch.equal(a, backend.linear(packed, x)) and torch.equal(c, backend.linear(plain, x))
    backend.grouped_dense = False  # as a backend without block-diagonal kernels declares
    with pytest.raises(FormatError, match="grouped"):
        backend.pack_linear(q, groups=3)
