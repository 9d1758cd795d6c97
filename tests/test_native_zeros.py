"""Zero in, zero out, bit for bit, on every variant, format and path of the native kernels.

An all-zero hidden row, or an expert whose gate (or, for SiLU, up) weights are all zero, has an exact
answer: +0.0 in every output element, or, in a biased layer, exactly what the biases alone give. No
tolerance applies: the int8-activation paths quantize a zero row to zero codes and must add nothing
else (an offset folded out in floating point left residues up to ~1e-4 before). Checked as
- bits: every output element of such a row is +0.0 (fp32 and bf16 outputs);
- an expert with zero gate weights changes nothing: the layer holding it gives bitwise the output of
  the same layer without it;
- biased layers: a zero hidden row gives bitwise the output that the same biases give through an
  expert whose gate and up weights are zero (where the gate/up products are exactly zero on every path
  because the weights are), with the same down weights and routing.
Shapes: rows >= 256 so integer decode takes the int8-activation path on the VNNI variants; H = 264 is a
partial panel, a partial int4_g128 group and a partial fp8 block (GGUF formats, whose rows are whole
blocks, take the next multiple of their block: 288 for q8_0/q4_0, 512 for the K-quants). Decode: T = 2 (<= 2 tokens per
expert); prefill: T = 40 (~20 per expert, every expert on the prefill kernels).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from moetier import ExpertLayerSpec, ExpertWeights
from moetier.formats import QuantizedTensor, get_format, quantize
from test_native_common import DOT_VARIANTS, RUNNABLE, make_backend, needs_native, random_layer, routing

FORMATS = ("fp32", "fp16", "bf16", "int8", "int4_g32", "int4_g64", "int4_g128", "fp8_e4m3",
           "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_nl", "iq4_xs")
E, K, H0, I = 4, 2, 264, 256


def hidden_size(fmt: str) -> int:
    block = get_format(fmt).block_size or 1
    return -(-H0 // block) * block
PATHS = {"decode": 2, "prefill": 40}


def _bits_zero(t: torch.Tensor) -> bool:
    """Every element is +0.0 (not -0.0, not a tiny residue)."""
    view = {torch.float32: torch.int32, torch.bfloat16: torch.int16}[t.dtype]
    return bool(torch.all(t.view(view) == 0))


def _with(weights: ExpertWeights, zero: QuantizedTensor, zero_gate: bool = False, zero_up: bool = False,
          experts=None, biases: bool = False) -> ExpertWeights:
    H = zero.shape[1]
    """`weights` with the gate / up matrices of `experts` (default: all) replaced by `zero`, and random biases."""
    gen = torch.Generator().manual_seed(len(weights.experts))
    out = {}
    for e, t in weights.experts.items():
        if experts is None or e in experts:
            t = dataclasses.replace(t, gate=zero if zero_gate else t.gate, up=zero if zero_up else t.up)
        if biases:
            t = dataclasses.replace(t, gate_bias=torch.randn(I, generator=gen), up_bias=torch.randn(I, generator=gen),
                                    down_bias=torch.randn(H, generator=gen))
        out[e] = t
    return ExpertWeights(out)


def check_exact_zeros(backend_factory, fmt: str, seed: int) -> None:
    """Every exact-zero case above for one backend and format, on the decode and the prefill path."""
    H = hidden_size(fmt)
    gen = torch.Generator().manual_seed(seed)
    _, weights = random_layer(gen, fmt, E, K, H, I)
    zero = quantize(torch.zeros(I, H), fmt)
    dead = _with(weights, zero, zero_gate=True, experts={1})
    all_dead = _with(weights, zero, zero_up=True)
    biased = _with(weights, zero, biases=True)
    hollow = _with(weights, zero, zero_gate=True, zero_up=True, biases=True)
    be = backend_factory()
    for act in ("silu", "swiglu_oai"):
        layer = ExpertLayerSpec(E, K, H, I, activation=act)
        blayer = ExpertLayerSpec(E, K, H, I, activation=act, has_bias=True)
        prep = be.prepare(layer, weights, range(E), fmt)
        prep_dead = be.prepare(layer, dead, range(E), fmt)
        prep_dead_dropped = be.prepare(layer, dead, [0, 2, 3], fmt)
        prep_all_dead = be.prepare(layer, all_dead, range(E), fmt)
        prep_biased = be.prepare(blayer, biased, range(E), fmt)
        prep_hollow = be.prepare(blayer, hollow, range(E), fmt)
        for path, T in PATHS.items():
            ids, w = routing(gen, T, E, K)
            hidden = torch.randn(T, H, generator=gen)
            hidden[::2] = 0  # zero rows among random ones: the zeros share blocks with real tokens
            where = f"{fmt} {path} {act}"
            for dtype in (torch.float32, torch.bfloat16):
                out = be.forward(prep, hidden.to(dtype), ids, w, out_dtype=dtype)
                assert _bits_zero(out[::2]), (
                    f"{where} {dtype}: zero rows gave |y| up to {out[::2].float().abs().max():.3g}")
                assert out[1::2].abs().max() > 0
            # An expert whose gate weights are zero contributes nothing (act(0) = 0 for both activations).
            with_dead = be.forward(prep_dead, hidden, ids, w)
            without = be.forward(prep_dead_dropped, hidden, ids, w)
            assert torch.equal(with_dead, without), (
                f"{where}: a zero-gate expert changed the output by up to {(with_dead - without).abs().max():.3g}")
            if act == "silu":  # SiLU(g) * 0 = 0; for swiglu_oai (clamp(u) + 1) * ... is not zero
                out = be.forward(prep_all_dead, torch.randn(T, H, generator=gen), ids, w)
                assert _bits_zero(out), f"{where}: zero up weights gave |y| up to {out.abs().max():.3g}"
            # Biased: a zero row computes gate = bias and up = bias exactly, as zero weights do.
            y = be.forward(prep_biased, hidden, ids, w)
            y_bias_only = be.forward(prep_hollow, torch.randn(T, H, generator=gen), ids, w)
            assert torch.equal(y[::2], y_bias_only[::2]), (
                f"{where} biased: zero rows differ from the bias-only answer by up to "
                f"{(y[::2] - y_bias_only[::2]).abs().max():.3g}")


@needs_native
@pytest.mark.parametrize("variant", RUNNABLE)
@pytest.mark.parametrize("fmt", FORMATS)
def test_zero_in_gives_zero_out(variant, fmt, monkeypatch):
    check_exact_zeros(lambda: make_backend(variant, monkeypatch), fmt, torch.seed())


@pytest.mark.skipif(not set(DOT_VARIANTS) & set(RUNNABLE), reason="no vdpbf16ps variant runs on this CPU")
def test_zero_in_gives_zero_out_fp8_without_vbmi(monkeypatch):
    """The VNNI build's fp8 path for CPUs without AVX512-VBMI (the other one runs in the test above)."""
    variant = [v for v in DOT_VARIANTS if v in RUNNABLE][0]
    check_exact_zeros(lambda: make_backend(variant, monkeypatch, fp8_vbmi=False), "fp8_e4m3", torch.seed())
