"""Decode steps of whole decoder layers on a moetier CPU backend's kernels, in one short Python function.

Once the dense matrices, attention and experts run on the kernels (~7 ms of a Qwen3-30B-A3B-dimension
int4 step on 2 cores), transformers' module tree around them costs as much again: ~60 module calls and
~150 torch operators per layer (norms, q/k norms, rotary embedding, the router's bf16 matrix-vector
product at ~7 GB/s, views and casts), measured 4.3 ms of an 11.5 ms step. `fuse_decode_layers` gives each
decoder layer of a supported class a forward that, for decode forwards (at most DECODE_TOKENS new tokens,
one sequence, on the CPU), makes the layer's calls itself:

    rms_norm -> q/k/v linear -> rotary (with q/k norms) -> cache.update -> attention -> o linear -> + residual
    rms_norm -> router linear -> softmax / top-k as the family's router -> experts -> + residual

with the operations and roundings of transformers' own modules (moetier.norm, moetier.rotary; the router
in the model's dtype, never quantized). Prefill, batches and anything else go to the layer's own forward.
The cache update and the attention function are the ones the layer would have called.
"""
from __future__ import annotations

import torch

from .attention import attention_forward
from .dense import DECODE_TOKENS, MoetierLinear
from .experts import RUNTIME_ATTR

# Decoder layers whose decode `_decode` reproduces (tests compare it with the layer's own forward, per
# transformers version): attention with optional per-head q/k norms and full or partial rotary, a softmax
# top-k router (optionally renormalized) over routed experts, or a dense MLP.
LAYERS = ("Qwen3MoeDecoderLayer",)
ROUTERS = ("Qwen3MoeTopKRouter",)
FUSED_ATTR = "moetier_fused_decode"


def _rms(module) -> tuple[torch.Tensor, float]:
    return module.weight.detach().contiguous(), float(module.variance_epsilon)


class FusedDecode:
    """One decoder layer's decode step on `backend` (what `fuse_decode_layers` attaches)."""

    def __init__(self, layer: torch.nn.Module, backend, dtype: torch.dtype):
        attn = layer.self_attn
        self.backend, self.dtype, self.attn = backend, dtype, attn
        self.layer_idx = attn.layer_idx
        self.q, self.k, self.v, self.o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.head_dim = attn.head_dim
        self.q_norm = _rms(attn.q_norm) if getattr(attn, "q_norm", None) is not None else (None, 0.0)
        self.k_norm = _rms(attn.k_norm) if getattr(attn, "k_norm", None) is not None else (None, 0.0)
        self.sliding_window = getattr(attn, "sliding_window", None)
        self.input_norm = _rms(layer.input_layernorm)
        self.post_norm = _rms(layer.post_attention_layernorm)
        self.mlp = layer.mlp
        router = getattr(layer.mlp, "gate", None)
        self.experts = getattr(getattr(layer.mlp, "experts", None), RUNTIME_ATTR, None)
        self.router = None
        if self.experts is not None:
            # The router in the model's dtype, as transformers computes its logits (F.linear in that dtype).
            from ...formats import quantize

            self.router = backend.pack_linear(quantize(router.weight.detach().to(dtype), "bf16" if dtype == torch.bfloat16 else "fp32"))
            self.top_k, self.renormalize = int(router.top_k), bool(router.norm_topk_prob)

    def decode(self, hidden: torch.Tensor, attention_mask, cache, position_embeddings, kwargs) -> torch.Tensor:
        # The backend's compute_* entry points: every shape and dtype here is the layer's own, fixed at
        # construction (the public methods' checks cost more than the kernels at one token).
        b, dtype, D = self.backend, self.dtype, self.head_dim
        T = hidden.shape[1]
        x = hidden[0]
        h = b.compute_rms_norm(x, *self.input_norm)
        cos, sin = position_embeddings[0][0], position_embeddings[1][0]
        q = b.compute_dense(self.q.packed, h, dtype).view(T, -1, D)
        k = b.compute_dense(self.k.packed, h, dtype).view(T, -1, D)
        v = b.compute_dense(self.v.packed, h, dtype).view(T, -1, D)
        q = b.compute_rotary(q, cos, sin, *self.q_norm)
        k = b.compute_rotary(k, cos, sin, *self.k_norm)
        keys, values = cache.update(k.transpose(0, 1)[None], v.transpose(0, 1)[None], self.layer_idx, kwargs=kwargs)
        out, _ = attention_forward(self.attn, q.transpose(0, 1)[None], keys, values, attention_mask,
                                   scaling=self.attn.scaling, sliding_window=self.sliding_window)
        x = x + b.compute_dense(self.o.packed, out.reshape(T, -1), dtype)
        h = b.compute_rms_norm(x, *self.post_norm)
        if self.experts is None:
            return (x + self.mlp(h[None])[0])[None]
        logits = b.compute_dense(self.router, h, dtype)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights /= weights.sum(dim=-1, keepdim=True)
        routed = self.experts(h, ids, weights.to(dtype), out_dtype=dtype)
        return (x + routed)[None]


def _supported(layer: torch.nn.Module, backend, dtype: torch.dtype) -> bool:
    """Whether `layer` is a class `_decode` reproduces with every matrix on `backend`'s kernels."""
    if type(layer).__name__ not in LAYERS or dtype not in backend.norm_dtypes or dtype not in backend.rotary_dtypes \
            or dtype not in backend.attention_dtypes:
        return False
    attn = layer.self_attn
    if not all(isinstance(getattr(attn, n, None), MoetierLinear) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return False
    if getattr(attn, "_moetier_attention_backend", None) is not backend:
        return False
    experts = getattr(layer.mlp, "experts", None)
    if experts is not None:
        return getattr(experts, RUNTIME_ATTR, None) is not None and type(getattr(layer.mlp, "gate", None)).__name__ in ROUTERS
    return True


def fuse_decode_layers(model: torch.nn.Module, backend, dtype: torch.dtype) -> list[str]:
    """Give every supported decoder layer of `model` the fused decode path on `backend`; returns their names."""
    names = []
    for name, layer in model.named_modules():
        if not _supported(layer, backend, dtype):
            continue
        fused = FusedDecode(layer, backend, dtype)
        setattr(layer, FUSED_ATTR, fused)
        layer.forward = _forward(layer.forward, fused, dtype)
        names.append(name)
    return names


def _forward(original, fused: FusedDecode, dtype: torch.dtype):
    def forward(hidden_states, attention_mask=None, *args, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        embeddings = kwargs.get("position_embeddings")
        if args or cache is None or embeddings is None or hidden_states.ndim != 3 or hidden_states.shape[0] != 1 \
                or hidden_states.shape[1] > DECODE_TOKENS or hidden_states.dtype != dtype \
                or hidden_states.device.type != "cpu" or kwargs.get("output_attentions") or torch.is_grad_enabled():
            return original(hidden_states, attention_mask, *args, **kwargs)
        rest = {k: v for k, v in kwargs.items()
                if k not in ("cache", "past_key_values", "position_embeddings", "position_ids", "use_cache")}
        return fused.decode(hidden_states, attention_mask, cache, embeddings, rest)

    return forward
