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

Decoder layers with multi-head latent attention (DeepSeek-V3/R1, Kimi-K2, GLM-4.7-Flash) get
`FusedMLADecode`: the same norms and projections on the kernels, the latents' norm and both rotary
embeddings there too (the interleaved rotary as rotate-half on de-interleaved dims, the same products and
roundings), the absorbed attention of moetier.integrations.transformers.mla, and the MLP block as its own
module (its router's group-limited selection in torch, the experts and shared experts on the kernels).
"""
from __future__ import annotations

import torch

from ...formats import quantize
from . import mla
from .attention import BACKEND_ATTR, attention_forward
from .dense import DECODE_TOKENS, MoetierLinear, dtype_format
from .experts import RUNTIME_ATTR

# Decoder layers whose decode `FusedDecode` reproduces (tests compare it with the layer's own forward, per
# transformers version): pre-norm residual blocks; attention over q/k/v/o projections with optional q/k
# norms (per head, or over all heads as MiniMax-M2's) and full or partial rotate-half rotary embeddings.
LAYERS = ("Qwen3MoeDecoderLayer", "Qwen2MoeDecoderLayer", "Glm4MoeDecoderLayer", "MiniMaxM2DecoderLayer")
# Their RMSNorm classes: transformers' Llama-family formula (moetier.norm).
NORMS = ("Qwen3MoeRMSNorm", "Qwen2MoeRMSNorm", "Glm4MoeRMSNorm", "MiniMaxM2RMSNorm")
# Routers computed here: logits in the model's dtype, softmax, top-k, optional renormalization. Other MoE
# blocks (GLM's and MiniMax's sigmoid routers with their correction bias, and the shared experts they add)
# run as transformers' own module, on the kernels through the experts and dense routing.
ROUTERS = ("Qwen3MoeTopKRouter", "Qwen2MoeTopKRouter")
# Decoder layers with multi-head latent attention that `FusedMLADecode` reproduces (cos / sin rotary of
# mla.ROPE_COS_SIN), and their norms (the Llama-family formula).
MLA_LAYERS = ("DeepseekV3DecoderLayer", "Glm4MoeLiteDecoderLayer")
MLA_NORMS = ("DeepseekV3RMSNorm", "Glm4MoeLiteRMSNorm")


def rms_params(module) -> tuple[torch.Tensor, float]:
    return module.weight.detach().contiguous(), float(module.variance_epsilon)


def _norm_of(attn, name: str):
    """A q/k norm module of the attention (None: none; GLM's exist only with use_qk_norm)."""
    if getattr(attn, "use_qk_norm", True) is False:
        return None
    return getattr(attn, name, None)


class FusedDecode:
    """One decoder layer's decode step on `backend` (what `fuse_decode_layers` attaches)."""

    def __init__(self, layer: torch.nn.Module, backend, dtype: torch.dtype):
        attn = layer.self_attn
        self.backend, self.dtype, self.attn = backend, dtype, attn
        self.layer_idx = attn.layer_idx
        self.o = attn.o_proj.packed
        self.qkv = (attn.q_proj.packed, attn.k_proj.packed, attn.v_proj.packed)
        self.head_dim = D = attn.head_dim
        # q/k norms: per head (weight [D], in the rotary call) or over the whole projection (weight [H * D])
        self.q_norm, self.k_norm, self.whole_q_norm, self.whole_k_norm = (None, 0.0), (None, 0.0), None, None
        for name in ("q_norm", "k_norm"):
            module = _norm_of(attn, name)
            if module is None:
                continue
            if module.weight.numel() == D:
                setattr(self, name, rms_params(module))
            else:
                setattr(self, f"whole_{name}", rms_params(module))
        self.sliding_window = getattr(attn, "sliding_window", None)
        self.input_norm = rms_params(layer.input_layernorm)
        self.post_norm = rms_params(layer.post_attention_layernorm)
        self.mlp = layer.mlp
        router = getattr(layer.mlp, "gate", None)
        self.experts = getattr(getattr(layer.mlp, "experts", None), RUNTIME_ATTR, None)
        self.router = None
        if self.experts is not None and type(router).__name__ in ROUTERS:
            # The router in the model's dtype, as transformers computes its logits (F.linear in that dtype).
            self.router = backend.pack_linear(quantize(router.weight.detach().to(dtype), dtype_format(dtype)))
            self.top_k, self.renormalize = int(router.top_k), bool(router.norm_topk_prob)
            # Qwen2-MoE's shared expert, weighted by sigmoid(its gate)
            self.shared = getattr(layer.mlp, "shared_expert", None)
            self.shared_gate = getattr(layer.mlp, "shared_expert_gate", None)

    def decode(self, hidden: torch.Tensor, attention_mask, cache, position_embeddings, kwargs) -> torch.Tensor:
        # The backend's compute_* entry points: every shape and dtype here is the layer's own, fixed at
        # construction (the public methods' checks cost more than the kernels at one token).
        b, dtype, D = self.backend, self.dtype, self.head_dim
        T = hidden.shape[1]
        x = hidden[0]
        h = b.compute_rms_norm(x, *self.input_norm)
        cos, sin = position_embeddings[0][0], position_embeddings[1][0]
        q, k, v = b.compute_dense_many(self.qkv, h, dtype)
        v = v.view(T, -1, D)
        if self.whole_q_norm is not None:
            q = b.compute_rms_norm(q, *self.whole_q_norm)
        if self.whole_k_norm is not None:
            k = b.compute_rms_norm(k, *self.whole_k_norm)
        q = b.compute_rotary(q.view(T, -1, D), cos, sin, *self.q_norm)
        k = b.compute_rotary(k.view(T, -1, D), cos, sin, *self.k_norm)
        keys, values = cache.update(k.transpose(0, 1)[None], v.transpose(0, 1)[None], self.layer_idx, kwargs=kwargs)
        out, _ = attention_forward(self.attn, q.transpose(0, 1)[None], keys, values, attention_mask,
                                   scaling=self.attn.scaling, sliding_window=self.sliding_window)
        x = x + b.compute_dense(self.o, out.reshape(T, -1), dtype)
        h = b.compute_rms_norm(x, *self.post_norm)
        if self.router is None:  # a dense MLP, or an MoE block computed by its own module
            return (x + self.mlp(h[None])[0])[None]
        logits = b.compute_dense(self.router, h, dtype)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights /= weights.sum(dim=-1, keepdim=True)
        out = self.experts(h, ids, weights.to(dtype), out_dtype=dtype)
        if self.shared is not None:
            out = out + torch.sigmoid(self.shared_gate(h)) * self.shared(h)
        return (x + out)[None]


class FusedMLADecode:
    """One multi-head-latent-attention decoder layer's decode step on `backend` (`fuse_decode_layers`)."""

    def __init__(self, layer: torch.nn.Module, backend, dtype: torch.dtype):
        attn = layer.self_attn
        self.backend, self.dtype, self.attn, self.mlp = backend, dtype, attn, layer.mlp
        self.layer_idx = attn.layer_idx
        self.nope, self.rope, self.rank = attn.qk_nope_head_dim, attn.qk_rope_head_dim, attn.kv_lora_rank
        self.kv_a, self.o = attn.kv_a_proj_with_mqa.packed, attn.o_proj.packed
        self.q_a, self.q_b, self.q_a_norm = attn.q_a_proj.packed, attn.q_b_proj.packed, rms_params(attn.q_a_layernorm)
        self.kv_a_norm = rms_params(attn.kv_a_layernorm)
        self.input_norm = rms_params(layer.input_layernorm)
        self.post_norm = rms_params(layer.post_attention_layernorm)
        self.interleave = bool(attn.config.rope_interleave)

    def _rope_dims(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H, rope] (a strided view) as the rotary kernel's rotate-half reads it: contiguous; the
        interleaved pairs (x0, x1), (x2, x3), ... de-interleaved to (x0, x2, ..., x1, x3, ...). transformers'
        interleaved rotary returns exactly that order, each half's products and sums as rotate-half's."""
        if self.interleave:
            return x.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)
        return x.contiguous()

    def decode(self, hidden: torch.Tensor, attention_mask, cache, position_embeddings, kwargs) -> torch.Tensor:
        b, dtype = self.backend, self.dtype
        nope, rope, rank = self.nope, self.rope, self.rank
        x = hidden[0]
        T = x.shape[0]
        h = b.compute_rms_norm(x, *self.input_norm)
        q_a, kv = b.compute_dense_many((self.q_a, self.kv_a), h, dtype)
        q = b.compute_dense(self.q_b, b.compute_rms_norm(q_a, *self.q_a_norm), dtype)
        q = q.view(T, -1, nope + rope)
        latent = b.compute_rms_norm(kv[:, :rank], *self.kv_a_norm)  # rows read in place (stride rank + rope)
        cos, sin = position_embeddings[0][0], position_embeddings[1][0]
        q_rot = b.compute_rotary(self._rope_dims(q[..., nope:]), cos, sin, None, 0.0)
        k_rot = b.compute_rotary(self._rope_dims(kv[:, None, rank:]), cos, sin, None, 0.0)
        latents, rot = cache.update(latent.view(1, 1, T, rank), k_rot.view(1, 1, T, rope), self.layer_idx,
                                    kwargs=kwargs)
        out = mla.attend(self.attn, q[None, ..., :nope], q_rot[None], latents[:, 0], rot[:, 0], attention_mask)
        x = x + b.compute_dense(self.o, out[0], dtype)
        h = b.compute_rms_norm(x, *self.post_norm)
        return (x + self.mlp(h[None])[0])[None]


def _supported_mla(layer: torch.nn.Module, backend, dtype: torch.dtype) -> bool:
    """Whether `layer` is an MLA decoder layer `FusedMLADecode` reproduces with its projections on `backend`."""
    if type(layer).__name__ not in MLA_LAYERS or dtype not in backend.norm_dtypes or dtype not in backend.rotary_dtypes:
        return False
    attn = layer.self_attn
    # The released models of these classes compress q (q_lora_rank); without it the layer's own forward runs.
    if type(attn).__name__ not in mla.ROPE_COS_SIN or attn.q_lora_rank is None:
        return False
    names = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "o_proj")
    if not all(isinstance(getattr(attn, n, None), MoetierLinear) and getattr(attn, n).backend is backend for n in names):
        return False
    norms = (layer.input_layernorm, layer.post_attention_layernorm, attn.kv_a_layernorm, attn.q_a_layernorm)
    return all(type(m).__name__ in MLA_NORMS and m.weight.dtype == dtype for m in norms)


def _supported(layer: torch.nn.Module, backend, dtype: torch.dtype) -> bool:
    """Whether `layer` is a class `FusedDecode` reproduces with every matrix on `backend`'s kernels."""
    if type(layer).__name__ not in LAYERS or dtype not in backend.norm_dtypes or dtype not in backend.rotary_dtypes \
            or dtype not in backend.attention_dtypes:
        return False
    attn = layer.self_attn
    if not all(isinstance(getattr(attn, n, None), MoetierLinear) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return False
    if getattr(attn, BACKEND_ATTR, None) is not backend:
        return False
    norms = [layer.input_layernorm, layer.post_attention_layernorm] + \
        [m for m in (_norm_of(attn, "q_norm"), _norm_of(attn, "k_norm")) if m is not None]
    return all(type(m).__name__ in NORMS and m.weight.dtype == dtype for m in norms)


def fuse_decode_layers(model: torch.nn.Module, backend, dtype: torch.dtype) -> list[str]:
    """Give every supported decoder layer of `model` the fused decode path on `backend`; returns their names."""
    names = []
    for name, layer in model.named_modules():
        if _supported(layer, backend, dtype):
            fused = FusedDecode(layer, backend, dtype)
        elif _supported_mla(layer, backend, dtype):
            fused = FusedMLADecode(layer, backend, dtype)
        else:
            continue
        layer.forward = _forward(layer.forward, fused)
        names.append(name)
    return names


def _forward(original, fused: FusedDecode):
    # Keyword arguments only on the fused path (the models call their layers so; the classes differ in
    # the order of their parameters).
    def forward(hidden_states, *args, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        embeddings = kwargs.get("position_embeddings")
        if args or cache is None or embeddings is None or hidden_states.ndim != 3 or hidden_states.shape[0] != 1 \
                or hidden_states.shape[1] > DECODE_TOKENS or hidden_states.dtype != fused.dtype \
                or hidden_states.device.type != "cpu" or kwargs.get("output_attentions") or torch.is_grad_enabled():
            return original(hidden_states, *args, **kwargs)
        rest = {k: v for k, v in kwargs.items() if k not in
                ("cache", "past_key_values", "position_embeddings", "position_ids", "use_cache", "attention_mask")}
        return fused.decode(hidden_states, kwargs.get("attention_mask"), cache, embeddings, rest)

    forward.fused = fused  # the whole-model decode (decode_model) calls it directly
    return forward
