"""Attention of a few new tokens over a KV cache (a decode step) on an expert backend's kernels.

A decode step's attention reads the cached keys and values once and does little arithmetic, yet torch's
CPU scaled_dot_product_attention, built for long query blocks, measured 1.5-2.9 ms per layer for one bf16
query token at a 576-token context (2 and 1 threads): more than that layer's weights take to stream. A
backend that declares `attention_dtypes` computes it with its own kernels; `ExpertBackend.decode_attention`
is the contract, `check_attention_inputs` what it accepts and `reference_attention` the float64 math.

Shapes follow transformers' attention functions: q [B, Hq, T, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv]
(grouped-query: Hq a multiple of Hkv, query head h reads key/value head h // (Hq / Hkv)); the output is
[B, T, Hq, Dv], the layout the output projection reads. mask: bool (True: attend) or float (added to the
scores), broadcastable as [B or 1, Hq or 1, T, S]; causal: new token t sees the keys up to S - T + t (the
new tokens are the cache's last T). A row that sees no key gets zeros.
"""
from __future__ import annotations

import math

import torch

from .errors import DeviceError, DTypeError, ShapeError

ATTENTION_DTYPES = (torch.float32, torch.bfloat16)
# New tokens per call: beyond this a forward is a prefill, which has its own kernels.
MAX_ATTENTION_TOKENS = 64


def check_attention_inputs(backend: str, dtypes, q, k, v, mask, scale) -> torch.Tensor | None:
    """Raise a typed error naming what is wrong with a decode_attention call; return the mask cut to the
    keys (a static cache's mask may cover more positions than are given) or None."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise DTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type != "cpu":
            raise DeviceError(f"{name} is on {t.device}, but backend {backend} computes attention on the CPU")
        if t.ndim != 4:
            raise ShapeError(f"{name} must have 4 dimensions ([B, heads, tokens, head size]), got {list(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in dtypes:
        have = ", ".join(str(d).removeprefix("torch.") for d in dtypes) or "none"
        raise DTypeError(f"backend {backend} computes attention on q, k, v of one dtype of: {have}; got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    B, Hq, T, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ShapeError(f"q, k and v must have the same batch, got {list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    Hkv, S = k.shape[1], k.shape[2]
    if Hkv < 1 or Hq % Hkv:
        raise ShapeError(f"the query heads ({Hq}) must be a multiple of the key/value heads ({Hkv})")
    if k.shape[3] != D:
        raise ShapeError(f"q and k must have the same head size, got {D} and {k.shape[3]}")
    if v.shape[1] != Hkv or v.shape[2] != S:
        raise ShapeError(f"v must be [B, {Hkv}, {S}, Dv] like k, got {list(v.shape)}")
    if T > MAX_ATTENTION_TOKENS:
        raise ShapeError(f"decode attention takes at most {MAX_ATTENTION_TOKENS} new tokens, got {T}: a prefill "
                         f"goes through the model's own attention")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise DTypeError(f"scale must be a finite number, got {scale!r}")
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise DTypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        raise DTypeError(f"mask must be bool (True: attend) or floating point (added to the scores), got {mask.dtype}")
    if mask.ndim != 4 or mask.shape[0] not in (1, B) or mask.shape[1] not in (1, Hq) or mask.shape[2] != T \
            or mask.shape[3] < S:
        raise ShapeError(f"mask must be [{B} or 1, {Hq} or 1, {T}, {S}], got {list(mask.shape)}")
    return mask[..., :S]


def reference_attention(q, k, v, *, scale: float, mask=None, causal: bool = False) -> torch.Tensor:
    """The float64 math of decode_attention: [B, T, Hq, Dv]."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    group = Hq // Hkv
    kk = k.double().repeat_interleave(group, dim=1)
    vv = v.double().repeat_interleave(group, dim=1)
    scores = (q.double() @ kk.transpose(-1, -2)) * scale  # [B, Hq, T, S]
    visible = torch.ones(T, S, dtype=torch.bool, device=q.device)
    if causal:
        visible = torch.arange(S)[None, :] <= (S - T + torch.arange(T))[:, None]
    visible = visible.expand(B, Hq, T, S)
    if mask is not None:
        mask = mask[..., :S]
        if mask.dtype == torch.bool:
            visible = visible & mask
        else:
            scores = scores + mask.double()
            visible = visible & (mask != float("-inf"))
    scores = scores.masked_fill(~visible, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row that sees nothing: zeros
    return (weights @ vv).transpose(1, 2)
