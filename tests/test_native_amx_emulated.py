"""The amx variant's tile kernels, run here over a software tile unit (tests/amx_emulator).

This CPU has no AMX, so the real `_moe_amx` module can never load here (test_native_loader proves the
guard refuses it). The same sources compiled with MOETIER_AMX_EMULATOR replace only the eight tile
operations (load, store, zero, tdpbf16ps, tdpbusd, configure, release) with an emulation of their ISA
definitions; the tiling, the tail blocks of odd sizes, the token blocks, the gathers and the epilogues
are the code an AMX machine runs.

Bounds:
- Against the float64 oracle: as for the vdpbf16ps / vpdpbusd paths (test_native_numerics): bf16 and
  weights dequantized to bf16 1e-2; int8 with int8 activations 4e-2.
- Against the avx512_bf16 build on the same prepared inputs: both round the same activations to bf16
  (or quantize them to the same int8 codes) and multiply the same weights; only the order of the fp32
  (bf16) or final float (int8, exact int32 sums) additions differs: ~sqrt(K) * 2^-24 ~ 1e-6 in the
  gate/up outputs. That difference can flip the rounding of an intermediate value to bf16, or its int8
  code, when it lies at a rounding boundary (a few of the ~60k intermediates here); one flip moves the
  output by ~1e-4 relative at these sizes (measured 1.2e-4). Bound 1e-3; a dropped or misplaced
  column block, token tile or panel moves it above 1e-1.
"""
from __future__ import annotations

import pytest
import torch

from moetier.conformance.runner import run_suite
from moetier.conformance.tolerances import tolerance
from test_native_common import (INVENTORY, RUNNABLE, make_backend, random_layer, reference, rel_err,
                                routing)

pytestmark = pytest.mark.skipif("avx512_bf16" not in RUNNABLE,
                                reason="the emulated amx build needs an AVX-512 BF16/VNNI CPU")


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    from amx_emulator.build import build

    return build(tmp_path_factory.mktemp("amx_emulated"))


def emulated_backend(module, threads: int = 2, **kwargs):
    from moetier.backends.native.backend import NativeBackend

    return NativeBackend("cpu.amx", "amx", INVENTORY, threads=threads, extension=module, **kwargs)


def test_emulated_build_has_the_tile_path(emulated):
    assert emulated.HAS_AMX_TILES and emulated.VARIANT == "amx"
    assert emulated.emulated_tile_dots() >= 0


# Mixed formats: each projection on its own tile path (int8 gate/up on the int8 tiles with a bf16 down on
# the bf16 tiles; int4 gate/up on vpdpbusd with an int8 down on the tiles).
@pytest.mark.parametrize("fmt", ["bf16", "int8", "fp8_e4m3", "fp16", "int8+bf16", "int4_g64+int8"])
@pytest.mark.parametrize("tokens", [40, 300])
def test_tile_path_matches_oracle_and_the_vnni_kernels(emulated, fmt, tokens, monkeypatch):
    """Odd sizes (bf16 tail of 8 columns, int8 tail of 8 of 64), 1 and 2 token tiles, 1 and 2 panels."""
    gen = torch.Generator().manual_seed(torch.seed())
    E, k, H, I = 6, 3, 200, 72  # H=200: 13 down panels (one call with a single panel), Kp % 32 = 8
    layer, weights = random_layer(gen, fmt, E, k, H, I)
    held = [0, 1, 2, 4, 5]
    hidden = torch.randn(tokens, H, generator=gen)
    ids, w = routing(gen, tokens, E, k)
    counts = torch.bincount(ids.flatten(), minlength=E)[held]
    assert counts.min() > 4, "every held expert must take the prefill (tile) path"
    be = emulated_backend(emulated)
    before = emulated.emulated_tile_dots()
    out = be.forward(be.prepare(layer, weights, held, fmt), hidden, ids, w)
    assert emulated.emulated_tile_dots() > before, "the tile kernels did not run"
    ref = reference(layer, weights, held, fmt, hidden, ids, w)
    bound = tolerance(fmt)  # 4e-2 with int8 or int4 weights, 1e-2 otherwise (the larger part's when mixed)
    assert rel_err(out, ref) < bound
    # fp8: the VNNI build's dequantizing path (the tiles dequantize the same way), not its VBMI kernel,
    # which multiplies the exact weights and would differ by the weights' rounding to bf16.
    vnni = make_backend("avx512_bf16", monkeypatch, fp8_vbmi=False)
    same = vnni.forward(vnni.prepare(layer, weights, held, fmt), hidden, ids, w)
    assert rel_err(out, same) < 1e-3


def test_decode_and_int4_do_not_use_tiles(emulated):
    gen = torch.Generator().manual_seed(torch.seed())
    be = emulated_backend(emulated)
    for fmt, tokens in (("bf16", 2), ("int4_g64", 64)):
        layer, weights = random_layer(gen, fmt, 4, 2, 64, 48)
        hidden = torch.randn(tokens, 64, generator=gen)
        ids, w = routing(gen, tokens, 4, 2)
        before = emulated.emulated_tile_dots()
        out = be.forward(be.prepare(layer, weights, [0, 1, 2, 3], fmt), hidden, ids, w)
        assert emulated.emulated_tile_dots() == before
        assert rel_err(out, reference(layer, weights, [0, 1, 2, 3], fmt, hidden, ids, w)) < 4e-2


@pytest.mark.parametrize("threads", [1, 3])
def test_bitwise_independent_of_threads(emulated, threads):
    gen = torch.Generator().manual_seed(torch.seed())
    layer, weights = random_layer(gen, "bf16", 4, 2, 96, 80)
    hidden = torch.randn(64, 96, generator=gen)
    ids, w = routing(gen, 64, 4, 2)
    outs = []
    for n in (2, threads):
        be = emulated_backend(emulated, threads=n)
        outs.append(be.forward(be.prepare(layer, weights, [0, 1, 2, 3], "bf16"), hidden, ids, w))
    assert torch.equal(outs[0], outs[1])


def test_conformance_suite_passes_on_the_tile_kernels(emulated):
    report = run_suite([emulated_backend(emulated)], seed=int(torch.randint(0, 2**31, ()).item()))
    failures = [(r.fmt, r.case, r.detail) for r in report.results if r.status == "failed"]
    assert report.ok and report.n_run >= 56 * 8, failures


@pytest.mark.parametrize("fmt", ["bf16", "int8", "fp8_e4m3", "fp16", "int4_g64", "q4_k", "q6_k"])
def test_zero_in_gives_zero_out_on_tiles(emulated, fmt):
    """The exact-zero cases of test_native_zeros on the tile kernels (prefill) and the decode paths."""
    from test_native_zeros import check_exact_zeros

    check_exact_zeros(lambda: emulated_backend(emulated), fmt, int(torch.randint(0, 2**31, ()).item()))


@pytest.mark.parametrize("fmt", ["q8_0", "q4_1", "q5_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_xs"])
def test_gguf_formats_take_vpdpbusd_not_tiles(emulated, fmt, monkeypatch):
    """Per-group scales (and mins) do not fit the int8 tiles' one scale per row: GGUF prefill on the amx
    build runs the same vpdpbusd kernels as the avx512_bf16 build, bit for bit, and no tile dot."""
    gen = torch.Generator().manual_seed(torch.seed())
    E, k, H, I = 4, 2, 256, 256
    layer, weights = random_layer(gen, fmt, E, k, H, I)
    hidden = torch.randn(64, H, generator=gen)
    ids, w = routing(gen, 64, E, k)
    be = emulated_backend(emulated)
    before = emulated.emulated_tile_dots()
    out = be.forward(be.prepare(layer, weights, range(E), fmt), hidden, ids, w)
    assert emulated.emulated_tile_dots() == before
    assert rel_err(out, reference(layer, weights, range(E), fmt, hidden, ids, w)) < 4e-2
    vnni = make_backend("avx512_bf16", monkeypatch)
    assert torch.equal(out, vnni.forward(vnni.prepare(layer, weights, range(E), fmt), hidden, ids, w))


@pytest.mark.parametrize("fmt", ["bf16", "int8", "fp8_e4m3", "fp16"])
def test_dense_matrices_on_tiles(emulated, fmt, monkeypatch):
    """Dense matrices (moetier.dense) prefill on the tiles: against the oracle (the format's bound) and the
    VNNI build (1e-3, the argument above); odd sizes (N=200: a panel pair and a single panel, K=224: a
    tail of column blocks), one and two token tiles (40 tokens), and decode (3 tokens) off the tiles."""
    from moetier.formats import quantize

    gen = torch.Generator().manual_seed(torch.seed())
    be = emulated_backend(emulated)
    vnni = make_backend("avx512_bf16", monkeypatch, fp8_vbmi=False)
    q = quantize(torch.randn(200, 224, generator=gen) / 15, fmt)
    b = torch.randn(200, generator=gen)
    packed, packed_vnni = be.pack_linear(q, b), vnni.pack_linear(q, b)
    for tokens in (40, 3):
        x = torch.randn(tokens, 224, generator=gen)
        before = emulated.emulated_tile_dots()
        out = be.linear(packed, x)
        assert (emulated.emulated_tile_dots() > before) == (tokens > 4), "tiles for prefill only"
        ref = x.double() @ q.dequantize(torch.float64).T + b.double()
        assert rel_err(out, ref) < (4e-2 if fmt == "int8" else 1e-2)
        assert rel_err(out, vnni.linear(packed_vnni, x)) < 1e-3


@pytest.mark.parametrize("fmt", ["q8_0", "q4_k"])
def test_grouped_dense_matrices_stay_off_the_tiles(emulated, fmt, monkeypatch):
    """Grouped int8 and min-carrying layouts as dense matrices prefill on vpdpbusd in the amx build, as the
    experts do: no tile instruction runs, and the result is the VNNI build's bit for bit."""
    from moetier.formats import quantize

    gen = torch.Generator().manual_seed(torch.seed())
    be, vnni = emulated_backend(emulated), make_backend("avx512_bf16", monkeypatch)
    q = quantize(torch.randn(96, 512, generator=gen) / 20, fmt)
    x = torch.randn(40, 512, generator=gen)
    before = emulated.emulated_tile_dots()
    out = be.linear(be.pack_linear(q), x)
    assert emulated.emulated_tile_dots() == before
    assert torch.equal(out, vnni.linear(vnni.pack_linear(q), x))
