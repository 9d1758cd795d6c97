"""Block formats on the native kernels. GGUF's q8_0, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k, q4_k, q5_k and q6_k are packed as
integer codes (iq4_nl / iq4_xs as the file's indices into IQ4's grid of integers) with the file's scale (and, for the types with mins, its min) per row and sub-block, which hold
the GGUF values exactly, so the kernels multiply the file's own weights. mxfp4 keeps its e2m1 codes as they
ship, in int4 panels that decode them through a table of twice the e2m1 values, with half the e8m0
power of two as the fp32 scale per 32: the same values exactly.

Bounds against the float64 oracle on the same dequantized GGUF weights (core/reference.py):
- fp32-math paths (any build with int8_activations=False): the fp32 bound
  of the conformance suite (tolerance("fp32") = 2e-5: only the fp32 summation order differs). A
  requantized weight (one more rounding of each value to 4-8 bits) would be off by >= 1e-3, so this
  bound is what shows the packed panels hold the GGUF values exactly. The mins add one cancellation
  (scale * sum x q - min * sum x): measured ~5e-7.
- int8-activation paths (every build by default: vpdpbusd on the VNNI builds, vpmaddubsw on the others): the conformance bound of the format
  (tolerance(fmt) = 4e-2, the per-token int8 activation budget; see core/conformance/tolerances.py);
  measured 1.7-2.1e-2 at these sizes.
Decode: 1-3 tokens (<= 4 per expert, the streaming decode kernels); mid: 5-16 per expert (whole-bundle
dot kernels); prefill: > 16 per expert (two panels x token blocks).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from moetier import ExpertLayerSpec
from moetier.conformance.tolerances import tolerance
from moetier.errors import FormatError
from moetier.experts import ExpertTensors, ExpertWeights
from moetier.formats import convert, dequantize, quantize
from test_native_common import (DOT_VARIANTS, RUNNABLE, make_backend, needs_native, random_layer, reference,
                                rel_err, routing)

GGUF = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_nl", "iq4_xs")
BLOCKS = (*GGUF, "mxfp4")
E, K, H, I = 4, 2, 256, 512
PATHS = {"decode": 3, "mid": 24, "prefill": 80}  # tokens; E = 4, k = 2: 1-2, 12, 40 per expert
# (variant, int8 activations): every runnable build as the backend runs it, and the VNNI builds' fp32 path.
RUNS = [(v, True) for v in RUNNABLE] + [(v, False) for v in RUNNABLE]


def fresh_seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()).item())


def test_reencoding_keeps_every_value():
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(40, 160, generator=g) * torch.rand(40, 1, generator=g) * 3
    w[3] = 0.0  # an all-zero block: d = 0
    q = quantize(w, "q4_0")
    c = convert(q, "int4_g32")
    assert c.fmt.name == "int4_g32" and c.shape == q.shape
    assert torch.equal(dequantize(c), dequantize(q)), f"seed {seed}"


@needs_native
@pytest.mark.parametrize("variant,int8_acts", RUNS)
@pytest.mark.parametrize("fmt", BLOCKS)
@pytest.mark.parametrize("path", PATHS)
def test_layer_matches_the_oracle(variant, int8_acts, fmt, path, monkeypatch):
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    T = PATHS[path]
    layer, w = random_layer(g, fmt, E, K, H, I)
    held = [0, 1, 3]
    hidden = torch.randn(T, H, generator=g)
    # Token t goes to experts perm[t % E] and perm[(t + 1) % E]: every expert gets 2T/E tokens (+-1).
    perm = torch.randperm(E, generator=g)
    ids = perm[(torch.arange(T).view(T, 1) + torch.arange(K).view(1, K)) % E]
    tw = torch.rand(T, K, generator=g)
    counts = torch.bincount(ids.flatten(), minlength=E)[held]
    if path == "decode":
        assert counts.max() <= 4
    elif path == "mid":
        assert counts.min() > 4 and counts.max() <= 16, counts
    else:
        assert counts.min() > 16, counts
    b = make_backend(variant, monkeypatch, int8_activations=int8_acts)
    out = b.forward(b.prepare(layer, w, held, fmt), hidden, ids, tw)
    ref = reference(layer, w, held, fmt, hidden, ids, tw)
    exact_weights = not int8_acts
    bound = tolerance("fp32") if exact_weights else tolerance(fmt)
    err = rel_err(out, ref)
    assert err <= bound, f"{variant} {fmt} {path} seed {seed}: {err:.3g} > {bound}"


@needs_native
@pytest.mark.parametrize("variant", RUNNABLE)
@pytest.mark.parametrize("T", [1, 48])  # decode and prefill
def test_q4_0_layer_is_the_int4_g32_kernel_on_the_same_values(variant, T, monkeypatch):
    """Q4_0 (symmetric int4 per 32, fp16 scale) packs into the int4_g32 layout: bitwise the int4 kernels on
    its exact int4_g32 re-encoding."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    layer, w = random_layer(g, "q4_0", 6, K, H, 96)
    as_int4 = ExpertWeights({e: ExpertTensors(*(convert(m, "int4_g32") for m in (t.gate, t.up, t.down)))
                             for e, t in w.experts.items()})
    held = [0, 1, 3, 4, 5]
    hidden = torch.randn(T, H, generator=g)
    ids, tw = routing(g, T, 6, K)
    b = make_backend(variant, monkeypatch)
    out = b.forward(b.prepare(layer, w, held, "q4_0"), hidden, ids, tw)
    same = b.forward(b.prepare(layer, as_int4, held, "int4_g32"), hidden, ids, tw)
    assert torch.equal(out, same), f"{variant} seed {seed}"


@needs_native
@pytest.mark.parametrize("fmt,hidden,intermediate", [("q4_k", 264, 256), ("q6_k", 256, 200), ("q8_0", 48, 64)])
def test_rows_of_partial_blocks_are_refused(fmt, hidden, intermediate, monkeypatch):
    """GGUF rows are whole blocks (256 values for the K-quants, 32 for q8_0/q4_0): a layer whose hidden or
    intermediate size is not a multiple is a FormatError naming the rule, before any expert is read."""
    g = torch.Generator().manual_seed(0)
    _, w = random_layer(g, fmt, 2, 1, 256, 256)  # never read: the sizes are refused first
    b = make_backend(RUNNABLE[-1], monkeypatch)
    with pytest.raises(FormatError, match=r"in_features % (256|32) == 0"):
        b.prepare(ExpertLayerSpec(2, 1, hidden, intermediate), w, [0, 1], fmt)




@needs_native
def test_the_nan_scale_of_mxfp4_is_refused(monkeypatch):
    """e8m0 255 is NaN in the OCP spec: packing it is a FormatError naming it, not weights of inf."""
    g = torch.Generator().manual_seed(0)
    layer, w = random_layer(g, "mxfp4", 2, 1, 64, 64)
    w.experts[1].down.scales[3, 1] = 255
    b = make_backend(RUNNABLE[-1], monkeypatch)
    with pytest.raises(FormatError, match="255, the NaN encoding of e8m0"):
        b.prepare(layer, w, [0, 1], "mxfp4")


@needs_native
@pytest.mark.parametrize("layout,scale", [("int8_g32_f16", 0.1), ("int4_g32_f16", 1e-9), ("mxfp4", 0.75),
                                          ("int5_g32_f16", 0.1), ("int4_g32_f16_mins", 0.1), ("int5_g32_f16_mins", 1e-9),
                                          ("iq4_g32_f16", 0.1)])
def test_panels_refuse_a_scale_their_storage_would_round(layout, scale, monkeypatch):
    """Panels that keep the file's scales (fp16 for q8_0 / q4_0 / q5_0, fp16 scales and mins for q4_1 / q5_1,
    e8m0 for mxfp4) take exactly those values: a scale or min the storage cannot hold (0.1 is no fp16, 1e-9
    below fp16's range, 0.75 no power of two) is a ValueError of the binding, never a rounded one."""
    ext = make_backend(RUNNABLE[-1], monkeypatch)._ext
    codes = np.zeros(16 * 32 if layout.startswith(("int4", "iq4")) or layout == "mxfp4" else 16 * 64, dtype=np.uint8)
    levels = 2 if layout.endswith("_mins") else 1
    for at in range(levels):  # the scales, then (with mins) the mins
        scales = np.full(levels * 16 * 2, 0.5, dtype=np.float32)
        scales[at * 32 + 5] = scale
        with pytest.raises(ValueError, match="scale"):
            ext.DenseLinear(16, 64, layout).pack(codes, scales)
    ext.DenseLinear(16, 64, layout).pack(codes, np.full(levels * 16 * 2, 0.5, dtype=np.float32))  # fp16, 2^-1
    if layout.startswith("int5"):  # 5-bit codes: a wider one is refused, not cut
        wide = codes.copy()
        wide[7] = 32 if levels == 2 else 16  # q5_1's codes are 0..31, q5_0's -16..15
        with pytest.raises(ValueError, match="5-bit code"):
            ext.DenseLinear(16, 64, layout).pack(wide, np.full(levels * 16 * 2, 0.5, dtype=np.float32))


@needs_native
@pytest.mark.parametrize("layout,levels,sub,sc_past,wide", [
    ("int4_g32_kscales", 2, 8, 64.0, None), ("int5_g32_kscales", 2, 8, 64.0, 32), ("int6_g16_kscales", 1, 16, 128.0, 40),
    ("iq4_g32_kscales", 1, 8, 128.0, None), ("int2_g16_kscales", 2, 16, 16.0, 4), ("int3_g16_kscales", 1, 16, 128.0, 4)])
def test_k_quant_panels_refuse_scales_they_would_round(layout, levels, sub, sc_past, wide, monkeypatch):
    """The K-quants' two levels are kept as stored: d (and dmin) must be fp16 values, sc (and m) integers in
    their range (0..63 with mins, q2_k's 0..15, int8 for q3_k / q6_k); anything else is a ValueError of the
    binding. Codes wider than the layout's bits (q2_k 2, q3_k 3, q5_k 5, q6_k 6) are refused, not cut."""
    ext = make_backend(RUNNABLE[-1], monkeypatch)._ext
    codes = np.zeros(16 * (128 if layout.startswith(("int4", "iq4")) else 256), dtype=np.uint8)

    def scales(d=0.5, sc=3.0):
        return np.concatenate([np.full(16 * levels, d), np.full(16 * sub * levels, sc)]).astype(np.float32)

    for bad, match in ((scales(d=0.1), "fp16"), (scales(sc=sc_past), "integer"), (scales(sc=2.5), "integer")):
        with pytest.raises(ValueError, match=match):
            ext.DenseLinear(16, 256, layout).pack(codes, bad)
    ext.DenseLinear(16, 256, layout).pack(codes, scales(sc=-5.0 if levels == 1 else 5.0))
    if wide is not None:
        too_wide = codes.copy()
        too_wide[7] = wide
        with pytest.raises(ValueError, match="-bit code"):
            ext.DenseLinear(16, 256, layout).pack(too_wide, scales(sc=5.0))


@needs_native
@pytest.mark.parametrize("fmt,ratio", [("q2_k", 1.0), ("q3_k", 114 / 110), ("q4_k", 148 / 144), ("q6_k", 1.0),
                                       ("q4_0", 1.0), ("iq4_xs", 138 / 136)])
def test_packed_experts_keep_the_files_bits_per_weight(fmt, ratio, monkeypatch):
    """The panels hold the codes in their own width (2-bit lines, nibbles, third / top bits), not a byte each:
    an expert packed from a GGUF type takes the file's bytes, up to the sub-scales kept a byte each (q3_k's
    6-bit scales: 114 bytes per 256 values for the file's 110) and the K-quants' d (dmin) lines per panel."""
    g = torch.Generator().manual_seed(fresh_seed())
    layer, w = random_layer(g, fmt, 2, 1, 512, 256)
    b = make_backend(RUNNABLE[0], monkeypatch)
    prepared = b.prepare(layer, w, [0, 1], fmt)
    file_bytes = layer.expert_bytes(fmt)
    assert prepared.payload.expert_bytes == pytest.approx(file_bytes * ratio, rel=1e-9), (
        f"{fmt}: {prepared.payload.expert_bytes} bytes per expert packed, the file's {file_bytes}")
