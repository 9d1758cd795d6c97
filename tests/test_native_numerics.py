"""Native kernels against the float64 oracle, every format, both paths, every variant this CPU runs.

Bounds (relative Frobenius error against the oracle on the same dequantized weights):
- decode path (<= 4 tokens per expert) and the fp32 prefill kernel: weights are dequantized exactly in
  registers and everything is accumulated in fp32, so only fp32 rounding remains: ~sqrt(K) * 2^-24
  ~ 1e-6 for K <= 300. fp8 decode on the VBMI kernels (avx512_bf16/amx variants on a CPU with
  AVX512-VBMI) multiplies exact bf16 weights by the activations split into two bf16 parts, hi + lo,
  which miss each activation by at most 2^-18 of it: ~4e-6 (measured 1.4-5.8e-6). Bound 2e-5.
- bf16 prefill with vdpbf16ps (avx512_bf16/amx variants): the input and the intermediate act(g) * u are
  rounded to bf16 (rms relative error 2^-9/sqrt(3) ~ 1.1e-3 each, in quadrature ~ 1.6e-3). fp16 and fp8
  prefill there also round the scaled weights to bf16 (one more such term, ~2e-3). Bound 1e-2.
- int8/int4 on the integer dot path (prefill, and decode when hidden and intermediate are >= 256, every
  variant: vpdpbusd or vpmaddubsw): activations quantized per row to int8 (step amax/127, ~0.8% rms of
  the row each for the input and the intermediate, ~1.2% combined, measured 1.1-1.3%). Bound 4e-2.
- a bf16 output adds one rounding (~1.1e-3 rms): bound 1e-2 on top of the path's own.
A wrong scale, dropped group, swapped nibble or transposed block moves the error above 1e-1.
"""
from __future__ import annotations

import pytest
import torch

from test_native_common import (DOT_VARIANTS, RUNNABLE, make_backend, needs_native, random_layer, reference,
                                rel_err, routing)

pytestmark = needs_native

FORMATS = ("fp32", "fp16", "bf16", "int8", "int4_g32", "int4_g64", "int4_g128", "fp8_e4m3")
DECODE_MAX_TOKENS = 4


def bound(fmt: str, variant: str, prefill: bool, min_k: int = 0) -> float:
    # the integer dot path (int8_activations=True, the default; every variant): prefill, and decode on
    # rows >= 256 long
    if fmt.startswith("int") and (prefill or min_k >= 256):
        return 4e-2
    if variant in DOT_VARIANTS and fmt in ("bf16", "fp16", "fp8_e4m3") and prefill:  # fp16/fp8 weights also rounded to bf16
        return 1e-2
    return 2e-5


@pytest.mark.parametrize("variant", RUNNABLE)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("path", ["decode", "mid", "prefill"])
def test_format_matches_oracle(variant, fmt, path, monkeypatch):
    """decode: <= 4 tokens per expert; mid: 5-16 (the dot kernels on whole bundles, 4 tokens per call);
    prefill: more (two panels x 8 tokens per call, or the AMX tiles)."""
    gen = torch.Generator().manual_seed(torch.seed())
    # Odd sizes: not multiples of 8/16/32, partial int4 groups and partial fp8 128-blocks.
    E, k, H, I = 5, 2, 50, 37
    layer, weights = random_layer(gen, fmt, E, k, H, I)
    held = [0, 1, 3, 4]  # expert 2 lives on another tier: it must contribute nothing
    T = {"decode": 2, "mid": 26, "prefill": 120}[path]  # tokens per expert: <= 2, ~10, ~48
    hidden = torch.randn(T, H, generator=gen)
    ids, w = routing(gen, T, E, k)
    counts = torch.bincount(ids.flatten(), minlength=E)
    assert (counts[held].max() <= DECODE_MAX_TOKENS) == (path == "decode")
    if path == "prefill":
        assert counts[held].min() > 16
    be = make_backend(variant, monkeypatch)
    out = be.forward(be.prepare(layer, weights, held, fmt), hidden, ids, w)
    ref = reference(layer, weights, held, fmt, hidden, ids, w)
    assert out.dtype == torch.float32 and out.shape == (T, H)
    err = rel_err(out, ref)
    assert err < bound(fmt, variant, path != "decode"), f"{variant} {fmt} {path}: rel err {err:.2e}"


def _cpu_has_vbmi() -> bool:
    with open("/proc/cpuinfo") as f:
        return any(line.startswith("flags") and "avx512vbmi" in line.split() for line in f)


@pytest.mark.skipif(not set(DOT_VARIANTS) & set(RUNNABLE), reason="no vdpbf16ps variant runs on this CPU")
@pytest.mark.parametrize("fp8_vbmi", [True, False])
@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_fp8_with_and_without_vbmi(fp8_vbmi, path, monkeypatch):
    """fp8 on the VNNI build has two implementations: VBMI lookups into bf16 pairs (CPUs with VBMI) and
    e4m3 -> fp16 -> fp32 with panels dequantized to bf16 for prefill (Cooper Lake). Both against the oracle,
    on both hidden dtypes (bf16 hidden states take one product per weight on the VBMI decode)."""
    variant = [v for v in DOT_VARIANTS if v in RUNNABLE][0]
    gen = torch.Generator().manual_seed(torch.seed())
    E, k, H, I = 5, 2, 300, 130  # a partial fp8 block in both directions, three bundles of down panels + 3
    layer, weights = random_layer(gen, "fp8_e4m3", E, k, H, I, activation="swiglu_oai", bias=True)
    be = make_backend(variant, monkeypatch, fp8_vbmi=fp8_vbmi)
    prepared = be.prepare(layer, weights, range(E), "fp8_e4m3")
    assert prepared.payload.fp8_vbmi == (fp8_vbmi and _cpu_has_vbmi())
    T = 2 if path == "decode" else 30
    for dtype in (torch.float32, torch.bfloat16):
        hidden = torch.randn(T, H, generator=gen).to(dtype)
        ids, w = routing(gen, T, E, k)
        err = rel_err(be.forward(prepared, hidden, ids, w), reference(layer, weights, range(E), "fp8_e4m3", hidden, ids, w))
        assert err < bound("fp8_e4m3", variant, path == "prefill"), f"vbmi={fp8_vbmi} {path} {dtype}: {err:.2e}"


@pytest.mark.parametrize("variant", RUNNABLE)
@pytest.mark.parametrize("fmt", ["bf16", "int4_g32", "fp8_e4m3"])
def test_swiglu_oai_with_biases_and_bf16_io(variant, fmt, monkeypatch):
    gen = torch.Generator().manual_seed(torch.seed())
    E, k, H, I = 4, 2, 130, 200
    layer, weights = random_layer(gen, fmt, E, k, H, I, activation="swiglu_oai", bias=True)
    be = make_backend(variant, monkeypatch)
    prepared = be.prepare(layer, weights, range(E), fmt)
    for T in (1, 20):
        hidden = torch.randn(T, H, generator=gen).to(torch.bfloat16)
        ids, w = routing(gen, T, E, k)
        ref = reference(layer, weights, range(E), fmt, hidden, ids, w)
        out = be.forward(prepared, hidden, ids, w, out_dtype=torch.bfloat16)
        assert out.dtype == torch.bfloat16
        err = rel_err(out, ref)
        assert err < bound(fmt, variant, T > 2 * DECODE_MAX_TOKENS) + 1e-2, f"{variant} {fmt} T={T}: {err:.2e}"
        out32 = be.forward(prepared, hidden, ids, w)
        assert rel_err(out32, ref) < bound(fmt, variant, T > 2 * DECODE_MAX_TOKENS)


@pytest.mark.parametrize("variant", RUNNABLE)
def test_int8_activations_switch_selects_the_exact_prefill(variant, monkeypatch):
    """The int8-activation path is a real, different path: turning it off gives fp32-exact results."""
    gen = torch.Generator().manual_seed(torch.seed())
    layer, weights = random_layer(gen, "int8", 4, 2, 64, 48)
    hidden = torch.randn(40, 64, generator=gen)
    ids, w = routing(gen, 40, 4, 2)
    ref = reference(layer, weights, range(4), "int8", hidden, ids, w)
    errs = {}
    for quantized in (True, False):
        be = make_backend(variant, monkeypatch, int8_activations=quantized)
        errs[quantized] = rel_err(be.forward(be.prepare(layer, weights, range(4), "int8"), hidden, ids, w), ref)
    assert errs[False] < 2e-5
    assert 1e-4 < errs[True] < 4e-2  # activation quantization is visible, and bounded


@pytest.mark.parametrize("variant", RUNNABLE)
def test_threads_do_not_change_the_result(variant, monkeypatch):
    """Each output element is reduced by one task in expert order, so thread count is bitwise invisible."""
    gen = torch.Generator().manual_seed(torch.seed())
    layer, weights = random_layer(gen, "int4_g64", 8, 3, 96, 80)
    hidden = torch.randn(37, 96, generator=gen)
    ids, w = routing(gen, 37, 8, 3)
    outs = []
    for threads in (1, 2, 3):
        be = make_backend(variant, monkeypatch, threads=threads)
        outs.append(be.forward(be.prepare(layer, weights, range(8), "int4_g64"), hidden, ids, w))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert rel_err(outs[0], reference(layer, weights, range(8), "int4_g64", hidden, ids, w)) < 4e-2


@pytest.mark.parametrize("variant", RUNNABLE)
def test_duplicate_ids_and_unheld_experts(variant, monkeypatch):
    gen = torch.Generator().manual_seed(torch.seed())
    layer, weights = random_layer(gen, "bf16", 6, 3, 32, 24)
    hidden = torch.randn(4, 32, generator=gen)
    ids = torch.tensor([[1, 1, 5], [2, 3, 3], [0, 0, 0], [5, 4, 1]])  # repeats count twice; 0 and 3 not held
    w = torch.rand(4, 3, generator=gen)
    be = make_backend(variant, monkeypatch)
    out = be.forward(be.prepare(layer, weights, [1, 2, 4, 5], "bf16"), hidden, ids, w)
    ref = reference(layer, weights, [1, 2, 4, 5], "bf16", hidden, ids, w)
    assert torch.all(out[2] == 0)  # only unheld experts: exactly zero
    assert rel_err(out, ref) < 2e-5


@pytest.mark.parametrize("variant", RUNNABLE)
@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4_g64", "int4_g128"])
@pytest.mark.parametrize("tokens", [1, 3])
def test_model_sized_rows_decode(variant, fmt, tokens, monkeypatch):
    """Rows >= 256: integer decode switches to int8 activations (still bounded);
    bf16 and the int8 dot path stream four panels per call where a task has them. H = 1040 is 65 down panels: 1 and 2 threads cut
    them into tasks of 8 and 4 panels, so the calls differ (4 + 4, or 4 and a single last panel) while
    every panel's arithmetic must not: the outputs are bitwise equal."""
    gen = torch.Generator().manual_seed(torch.seed())
    E, k, H, I = 3, 2, 1040, 256
    layer, weights = random_layer(gen, fmt, E, k, H, I)
    hidden = torch.randn(tokens, H, generator=gen)
    ids, w = routing(gen, tokens, E, k)
    outs = []
    for threads in (1, 2):
        be = make_backend(variant, monkeypatch, threads=threads)
        outs.append(be.forward(be.prepare(layer, weights, range(E), fmt), hidden, ids, w))
    err = rel_err(outs[0], reference(layer, weights, range(E), fmt, hidden, ids, w))
    assert err < bound(fmt, variant, False, min(H, I))
    assert torch.equal(outs[0], outs[1])
    if fmt != "bf16":
        assert err > 1e-4  # the int8-activation path really ran
