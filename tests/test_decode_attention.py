"""Decode attention over a KV cache (moetier.attention; kernels/decode_attention.h) against float64.

Bounds, relative Frobenius error against moetier.attention.reference_attention in float64 on the same
inputs (bf16 inputs are exact in fp32 and float64, so the kernels see the reference's values):
- fp32: scores, softmax and the weighted sum accumulate in fp32 (~sqrt(S) * 2^-24 each, plus vexp's
  ~2 ulp): measured 2-6e-7; bound FP32_BOUND 1e-5.
- bf16: the same fp32 arithmetic, then one rounding of each output to bf16 (at most 2^-9 relative per
  element): measured 1.5-1.7e-3; bound BF16_BOUND 2^-8 = 3.9e-3. A wrong key, head, mask position or
  chunk merge moves the error above 1e-1.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from moetier.attention import reference_attention
from moetier.errors import DTypeError, ShapeError
from moetier.reference import oracle
from test_native_common import RUNNABLE, make_backend, needs_native

FP32_BOUND = 1e-5
BF16_BOUND = 2.0 ** -8
BOUND = {torch.float32: FP32_BOUND, torch.bfloat16: BF16_BOUND}


def fresh_gen() -> torch.Generator:
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


def inputs(gen, B, Hq, Hkv, T, S, D, Dv, dtype, *, strided: bool = False):
    """q as transformers hands it ([B, T, Hq, D] transposed); k / v optionally a view into a longer
    buffer, as a static cache's are."""
    q = torch.randn(B, T, Hq, D, generator=gen).to(dtype).transpose(1, 2)
    room = S + 7 if strided else S
    k = torch.randn(B, Hkv, room, D, generator=gen).to(dtype)[:, :, :S]
    v = torch.randn(B, Hkv, room, Dv, generator=gen).to(dtype)[:, :, :S]
    return q, k, v


def random_mask(gen, kind: str, B, Hq, T, S, dtype):
    if kind == "none":
        return None
    keep = torch.rand(B, 1, T, S + 5, generator=gen) > 0.3  # longer than the keys: cut to S
    if kind == "bool":
        return keep
    if kind == "bool-per-head":
        return torch.rand(B, Hq, T, S, generator=gen) > 0.3
    bias = torch.randn(1, Hq, T, S, generator=gen)  # broadcast over the batch
    return torch.where(keep[:1, :, :, :S], bias, float("-inf")).to(dtype)


def test_the_reference_is_torch_sdpa_in_float64():
    """The oracle itself against torch's own attention on the cases SDPA expresses."""
    gen = fresh_gen()
    q, k, v = inputs(gen, 2, 8, 2, 3, 40, 16, 16, torch.float64)
    mask = torch.rand(2, 1, 3, 40, generator=gen) > 0.3
    mask[..., 0] = True
    for m in (None, mask):
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=0.3, enable_gqa=True).transpose(1, 2)
        assert rel(reference_attention(q, k, v, scale=0.3, mask=m), want) < 1e-12
    # causal with as many new tokens as keys: SDPA's is_causal, the same alignment
    q, k, v = inputs(gen, 1, 4, 4, 5, 5, 8, 8, torch.float64)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.5).transpose(1, 2)
    assert rel(reference_attention(q, k, v, scale=0.5, causal=True), want) < 1e-12


@needs_native
@pytest.mark.parametrize("variant", RUNNABLE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("threads", [1, 2])
def test_decode_attention_against_float64(variant, dtype, threads, monkeypatch):
    backend = make_backend(variant, monkeypatch, threads=threads)
    gen = fresh_gen()
    cases = [  # (B, Hq, Hkv, T, S, D, Dv, mask, causal, strided)
        (1, 32, 4, 1, 576, 128, 128, "none", False, True),  # Qwen3-30B-A3B's heads at a 576-token context
        (2, 8, 2, 3, 300, 24, 40, "bool", False, False),  # head sizes off the vector width, chunks merged
        (1, 6, 1, 4, 37, 16, 16, "none", True, True),  # multi-query, causal new tokens
        (2, 4, 4, 2, 1100, 64, 64, "float", False, False),  # more than one chunk of keys per task
        (1, 4, 2, 2, 19, 32, 32, "bool-per-head", True, False),
        (1, 2, 2, 1, 1, 8, 8, "none", False, False),  # the first decode step of a one-token prompt
    ]
    for B, Hq, Hkv, T, S, D, Dv, kind, causal, strided in cases:
        q, k, v = inputs(gen, B, Hq, Hkv, T, S, D, Dv, dtype, strided=strided)
        mask = random_mask(gen, kind, B, Hq, T, S, dtype)
        got = backend.decode_attention(q, k, v, scale=D ** -0.5, mask=mask, causal=causal)
        want = reference_attention(q, k, v, scale=D ** -0.5, mask=mask, causal=causal)
        assert got.shape == (B, T, Hq, Dv) and got.dtype == dtype
        err = rel(got, want)
        assert err <= BOUND[dtype], f"{variant} {dtype} {(B, Hq, Hkv, T, S, D, Dv, kind, causal)}: {err:.2e}"


@needs_native
@pytest.mark.parametrize("variant", RUNNABLE)
def test_keys_nobody_sees_are_never_read_and_rows_that_see_none_are_zero(variant, monkeypatch):
    """NaN in every masked or future key and value leaves the result finite and equal to zeros there (the
    kernel must skip them, not multiply them by 0); a row with no visible key is 0, not NaN."""
    backend = make_backend(variant, monkeypatch, threads=2)
    gen = fresh_gen()
    q, k, v = inputs(gen, 1, 8, 2, 2, 200, 32, 32, torch.float32)
    keep = torch.zeros(1, 1, 2, 200, dtype=torch.bool)
    keep[..., :150] = True  # a static cache's empty tail
    keep[0, 0, 1, :] = False  # token 1 sees nothing
    clean = backend.decode_attention(q, k, v, scale=0.2, mask=keep)
    poisoned_k, poisoned_v = k.clone(), v.clone()
    poisoned_k[:, :, 150:] = float("nan")
    poisoned_v[:, :, 150:] = float("nan")
    got = backend.decode_attention(q, poisoned_k, poisoned_v, scale=0.2, mask=keep)
    assert torch.equal(got, clean)
    assert torch.equal(got[0, 1], torch.zeros_like(got[0, 1]))
    assert rel(got[:, :1], reference_attention(q, k, v, scale=0.2, mask=keep)[:, :1]) < FP32_BOUND
    # causal: the keys after each new token
    q, k, v = inputs(gen, 1, 4, 4, 3, 10, 16, 16, torch.float32)
    clean = backend.decode_attention(q, k, v, scale=0.25, causal=True)
    k[:, :, -1], v[:, :, -1] = float("nan"), float("nan")  # only the last new token sees the last key
    got = backend.decode_attention(q, k, v, scale=0.25, causal=True)
    assert torch.equal(got[:, :2], clean[:, :2]) and torch.isnan(got[:, 2]).all()


@pytest.mark.parametrize("name", ["reference", "native"])
def test_bad_inputs_are_typed_errors(name, monkeypatch):
    if name == "native" and not RUNNABLE:
        pytest.skip("no native kernel variant is built for this CPU")
    backend = oracle() if name == "reference" else make_backend(RUNNABLE[-1], monkeypatch)
    q, k, v = inputs(torch.Generator().manual_seed(0), 1, 4, 2, 1, 9, 16, 16, torch.float32)
    cases = [
        (ShapeError, "4 dimensions", dict(q=q[0])),
        (ShapeError, "multiple of the key/value heads", dict(q=torch.randn(1, 3, 1, 16))),
        (ShapeError, "same head size", dict(k=torch.randn(1, 2, 9, 8))),
        (ShapeError, "like k", dict(v=torch.randn(1, 2, 8, 16))),
        (ShapeError, "same batch", dict(k=torch.randn(2, 2, 9, 16), v=torch.randn(2, 2, 9, 16))),
        (ShapeError, "at most 64 new tokens", dict(q=torch.randn(1, 4, 65, 16))),
        (DTypeError, "one dtype", dict(k=k.bfloat16())),
        (DTypeError, "one dtype", dict(q=q.half(), k=k.half(), v=v.half())),
        (DTypeError, "finite number", dict(scale=float("nan"))),
        (ShapeError, "mask must be", dict(mask=torch.ones(1, 1, 1, 8, dtype=torch.bool))),
        (ShapeError, "mask must be", dict(mask=torch.ones(1, 3, 1, 9, dtype=torch.bool))),
        (DTypeError, "bool .* or floating point", dict(mask=torch.ones(1, 1, 1, 9, dtype=torch.int64))),
    ]
    for error, message, change in cases:
        args = dict(q=q, k=k, v=v, scale=0.25, mask=None) | change
        with pytest.raises(error, match=message):
            backend.decode_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def test_a_backend_without_attention_says_so():
    from moetier.backends.cpu_torch import TorchBackend

    q = torch.randn(1, 2, 1, 8)
    with pytest.raises(DTypeError, match="computes attention on q, k, v of one dtype of: none"):
        TorchBackend().decode_attention(q, q, q, scale=1.0)
