"""Relative-error bounds per weight format: ||out - ref||_F / ||ref||_F against the float64 oracle run
on the SAME dequantized weights. Weight quantization error is therefore not part of the budget; only
what a backend does on top of the weights (activation rounding, accumulation order) is.

Inputs are N(0, 1), weights scaled so every intermediate is O(1). A genuine bug (a wrong scale, a
dropped group, a missing expert, a transposed block) moves the error to >= 1e-1, far above every bound.
"""

TOLERANCES: dict[str, float] = {
    # fp32 weights and fp32 activations: only the summation order differs from float64; the relative error
    # of a length-K fp32 dot product is ~sqrt(K) * 2^-24 ~ 3e-6 for K ~ 2000. 2e-5 leaves headroom.
    "fp32": 2e-5,
    # 16-bit weights: a backend may round activations to bf16 before vdpbf16ps (8 significant bits: unit
    # roundoff 2^-8 ~ 3.9e-3, rms error of a rounding ~ 2^-8/sqrt(12) ~ 1.1e-3 relative) at the input
    # and at the intermediate act(g) * u, and once more for a bf16 output. Independent rounding errors
    # add in quadrature to ~2e-3 (measured: 1.7e-3 for the output rounding alone); 1e-2 is a 5x margin.
    "bf16": 1e-2,
    "fp16": 1e-2,
    # fp8 e4m3 values (4 significant bits) are exact in bf16, so the budget is the bf16 one.
    "fp8_e4m3": 1e-2,
    # int8/int4 weights: a backend may quantize activations per token to int8 for vpdpbusd. Step
    # amax/127 with amax ~ 3-6 sigma gives a uniform error of ~1% of the rms per quantized operand (x and
    # the heavier-tailed intermediate); combined ~1.5-2%. 4e-2 is a 2x margin.
    "int8": 4e-2,
    "int4_g32": 4e-2,
    "int4_g64": 4e-2,
    "int4_g128": 4e-2,
    # GGUF blocks: llama.cpp computes them with activations quantized to int8 per block of 32 (q8_0) or
    # 256 (q8_K) and integer dot products (vpdpbusd), and a native kernel may do the same. Per-block int8
    # steps are no coarser than the per-token int8 budget above (a block's amax <= the token's), and the
    # blocks' own d/min/sub-scale decoding is exact in fp32 up to one rounding of d*q - m: the int8 budget.
    "q8_0": 4e-2,
    "q4_0": 4e-2,
    "q4_1": 4e-2,
    "q5_0": 4e-2,
    "q5_1": 4e-2,
    "q2_k": 4e-2,
    "q3_k": 4e-2,
    "q4_k": 4e-2,
    "q5_k": 4e-2,
    "q6_k": 4e-2,
    "iq4_nl": 4e-2,
    "iq4_xs": 4e-2,
    # mxfp4: e2m1 x 2^k values are exact in bf16, so a bf16-activation kernel has the bf16 budget; llama.cpp's
    # mxfp4 x q8_0 dot quantizes activations to int8 per 32, which is the int8 budget. The larger one holds.
    "mxfp4": 4e-2,
}


def tolerance(fmt) -> float:
    """The bound of format `fmt` (a name or a WeightFormat). A mixed format (gate/up in one format, down in
    another) gets the larger of its parts' bounds: every budget above already counts the rounding of both
    the layer's activations (x into gate/up and the intermediate into down), so the looser part's budget
    covers a layer whose projections each round no more than their own format allows."""
    from ..formats import get_format

    return max(TOLERANCES[p.name] for p in get_format(fmt).parts)
