"""Decode through DeepSeek-style multi-head latent attention without expanding the cache.

transformers' MLA modules (DeepSeek-V2/V3/R1, Kimi-K2, GLM-4.7-Flash) cache the compressed latent of each
token (kv_lora_rank values plus the shared rotary key) and, at every forward, expand the whole cache back
to per-head keys and values through kv_b_proj: a decode step then costs a kv_b product over every cached
token, 18 GFLOP per layer at DeepSeek-V3's dimensions and a 545-token context, and measured 250 ms of a
443 ms step on its 3-layer slice. Absorbed attention (what DeepSeek's and llama.cpp's inference do) folds
kv_b into the query and the output instead: per head,

    score_t = scaling * ((W_kb^T q_nope) . c_t + q_rope . k_rope_t),   out = W_vb (sum_t p_t c_t)

with W_kb / W_vb the key / value rows of kv_b_proj, so a step reads the latents once and does
O(heads x context x rank) work. `absorb_mla` gives each matching attention module a forward that takes
this path for decode forwards (at most DECODE_TOKENS new tokens, with a cache) and transformers' own
forward for prefill; the projections, norms, rotary embedding and cache update are the module's own.
kv_b_proj stays transformers' linear (prefill reads it). Where the dense layers run on a moetier backend
(`route_absorbed`), W_kb and W_vb are packed there as block-diagonal matrices of one block per head
(moetier.dense.PackedLinear.groups) in the dense layers' format: torch's batched bf16 products over them
read the 34 MB per layer at ~10 GB/s (measured 3.2 ms of a 14 ms DeepSeek-V3-dimension layer step).
"""
from __future__ import annotations

import sys
import types

import torch

from ...errors import FormatError, ShapeError
from ...formats import quantize
from .dense import DECODE_TOKENS, DenseRouting, dtype_format

# Attention classes whose forward is the one `_absorbed` reproduces up to the cache update (checked per
# transformers version by the tests: absorbed and expanded decode agree on every family using them).
ROPE_COS_SIN = ("DeepseekV3Attention", "Glm4MoeLiteAttention")  # (cos, sin), optionally interleaved
ROPE_COMPLEX = ("DeepseekV2Attention",)  # freqs_cis through apply_rotary_emb
# Where `route_absorbed` keeps a module's packed (backend, W_kb, W_vb).
PACKED_ATTR = "_moetier_absorbed_packed"


def mla_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """name -> attention module for every module of a class absorbed decoding supports."""
    return {name: m for name, m in model.named_modules() if type(m).__name__ in ROPE_COS_SIN + ROPE_COMPLEX}


def absorb_mla(model: torch.nn.Module) -> list[str]:
    """Give every supported MLA module of `model` the absorbed decode path; returns their names."""
    modules = mla_modules(model)
    for module in modules.values():
        module._moetier_expanded_forward = module.forward
        module.forward = types.MethodType(_forward, module)
    return sorted(modules)


def route_absorbed(model: torch.nn.Module, names, backend, fmt: str, routing: DenseRouting,
                   stored=None) -> DenseRouting:
    """Pack each named MLA module's W_kb^T and W_vb on `backend` as block-diagonal matrices (one block per
    head) in `fmt`, or in the model's dtype where `fmt` cannot hold rows of their width (a K-quant's
    256-value blocks against 128 nope dims); modules whose blocks the backend cannot pack keep torch's
    products. stored: a function of a module's name giving its (W_kb^T, W_vb) blocks as a checkpoint
    stores them (a GGUF file's k_b / v_b), each or None; one in a format the backend computes is packed as
    it is. Returns `routing` with these matrices added (they replace kv_b's bytes in a decode step)."""
    if not backend.grouped_dense:
        return routing
    matrices, nbytes, replaced = routing.matrices, routing.nbytes, routing.replaced_nbytes
    for name in names:
        module = model.get_submodule(name)
        w = module.kv_b_proj.weight.detach()
        heads = w.shape[0] // (module.qk_nope_head_dim + module.v_head_dim)
        kv_b = w.view(heads, module.qk_nope_head_dim + module.v_head_dim, module.kv_lora_rank)
        k_blocks = kv_b[:, : module.qk_nope_head_dim].transpose(1, 2).reshape(-1, module.qk_nope_head_dim)
        v_blocks = kv_b[:, module.qk_nope_head_dim:].reshape(-1, module.kv_lora_rank)
        as_stored = stored(name) if stored is not None else (None, None)
        halves = [q if q is not None and q.fmt.name in backend.dense_formats and tuple(q.shape) == tuple(b.shape)
                  else _quantized(b, fmt) for q, b in zip(as_stored, (k_blocks, v_blocks))]
        try:
            packed = tuple(backend.pack_linear(q, groups=heads) for q in halves)
        except ShapeError:
            continue  # blocks the kernels do not take (not whole 16-row panels): torch's products
        setattr(module, PACKED_ATTR, (backend,) + packed)
        matrices += 2
        nbytes += sum(p.nbytes for p in packed)
        replaced += w.numel() * w.element_size()
    return DenseRouting(routing.backend or backend.name, routing.fmt or fmt, matrices, nbytes, replaced)


def _quantized(w: torch.Tensor, fmt: str):
    try:
        return quantize(w, fmt)
    except (FormatError, ShapeError):
        return quantize(w, dtype_format(w.dtype))


def _forward(self, hidden_states: torch.Tensor, *args, **kwargs):
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    tokens = hidden_states.shape[1]
    # Several new tokens without a mask rely on the attention kernel's causal flag: leave those to transformers.
    if cache is None or args or tokens > DECODE_TOKENS or (tokens > 1 and kwargs.get("attention_mask") is None):
        return self._moetier_expanded_forward(hidden_states, *args, **kwargs)
    return _absorbed(self, hidden_states, **kwargs)


def _absorbed(self, hidden_states: torch.Tensor, *, position_embeddings, attention_mask=None, cache=None,
              past_key_values=None, **kwargs):
    cache = cache if cache is not None else past_key_values
    rope = sys.modules[type(self).__module__]  # the modeling file's own rotary functions
    batch, tokens = hidden_states.shape[:-1]
    nope, rope_dim, rank, v_dim = self.qk_nope_head_dim, self.qk_rope_head_dim, self.kv_lora_rank, self.v_head_dim
    if self.q_lora_rank is None:
        q = self.q_proj(hidden_states)
    else:
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
    q = q.view(batch, tokens, -1, nope + rope_dim).transpose(1, 2)
    q_nope, q_rot = torch.split(q, [nope, rope_dim], dim=-1)
    compressed = self.kv_a_proj_with_mqa(hidden_states)
    kv_nope, k_rot = torch.split(compressed, [rank, rope_dim], dim=-1)
    kv_nope = self.kv_a_layernorm(kv_nope).view(batch, 1, tokens, rank)
    k_rot = k_rot.view(batch, 1, tokens, rope_dim)
    if type(self).__name__ in ROPE_COMPLEX:
        q_rot, k_rot = rope.apply_rotary_emb(q_rot, k_rot, position_embeddings.to(q_rot.device))
    else:
        cos, sin = position_embeddings
        apply = rope.apply_rotary_pos_emb_interleave if self.config.rope_interleave else rope.apply_rotary_pos_emb
        q_rot, k_rot = apply(q_rot, k_rot, cos, sin)
    kv_nope, k_rot = cache.update(kv_nope, k_rot, self.layer_idx, kwargs=kwargs)  # [B, 1, S, rank] / [.., rope]

    out = attend(self, q_nope.transpose(1, 2), q_rot.transpose(1, 2), kv_nope[:, 0], k_rot[:, 0], attention_mask)
    return self.o_proj(out), None


def attend(self, q_nope: torch.Tensor, q_rot: torch.Tensor, latents: torch.Tensor, rot: torch.Tensor,
           attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Absorbed attention of the MLA module `self` for queries q_nope [B, T, H, nope] / q_rot [B, T, H, rope]
    (rotary applied) over the cached latents [B, S, rank] and rotary keys [B, S, rope]: [B, T, H v]."""
    batch, tokens, heads, nope = q_nope.shape
    rank, rope_dim, v_dim = self.kv_lora_rank, self.qk_rope_head_dim, self.v_head_dim
    packed = getattr(self, PACKED_ATTR, None)
    if packed is not None:  # per-head products on the backend's kernels: rows [B T, H nope] -> [B T, H rank]
        backend, w_k, w_v = packed
        q_latent = backend.linear(w_k, q_nope.reshape(batch * tokens, heads * nope)).view(batch, tokens, heads, rank)
    else:
        w_kb, w_vb_t = _absorbed_weights(self, heads)
        q_latent = torch.matmul(q_nope.transpose(1, 2), w_kb).transpose(1, 2)  # [B, T, H, rank]
    # Every head attends over the same latents: tokens x heads are the columns of one product per sequence,
    # the latents its left operand as they lie in the cache (as the right one, transposed, torch copied the
    # whole cache at every step; broadcast over the heads, it copied them once per head).
    rows = tokens * heads
    scores = (torch.matmul(latents, q_latent.reshape(batch, rows, rank).transpose(-1, -2)) +
              torch.matmul(rot, q_rot.reshape(batch, rows, rope_dim).transpose(-1, -2)))  # [B, S, T H]
    scores = scores.transpose(-1, -2).view(batch, tokens, heads, -1).transpose(1, 2) * self.scaling  # [B, H, T, S]
    if attention_mask is not None:
        mask = attention_mask[..., : scores.shape[-1]]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(latents.dtype)
    out_latent = torch.matmul(probs.transpose(1, 2).reshape(batch, rows, -1), latents)  # [B, T H, rank]
    if packed is not None:
        return backend.linear(w_v, out_latent.view(batch * tokens, heads * rank)).view(batch, tokens, heads * v_dim)
    out = torch.matmul(out_latent.view(batch, tokens, heads, rank).transpose(1, 2), w_vb_t)  # [B, H, T, v]
    return out.transpose(1, 2).reshape(batch, tokens, heads * v_dim)


def _absorbed_weights(self, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W_kb [H, nope, rank] and W_vb^T [H, rank, v] of kv_b_proj, contiguous (a batched product over strided
    per-head slices copied them at every step: 74 of 116 ms of three DeepSeek-V3-size decode steps). Made
    on the first decode step and kept beside kv_b_proj, whose weight prefill still uses: one more copy of
    kv_b (33.5 MB per layer at DeepSeek-V3's dimensions, about 1% of the layer)."""
    w = self.kv_b_proj.weight
    cached = getattr(self, "_moetier_absorbed", None)
    if cached is None or cached[0] is not w:
        kv_b = w.detach().view(heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        cached = (w, kv_b[:, : self.qk_nope_head_dim].contiguous(),
                  kv_b[:, self.qk_nope_head_dim:].transpose(-1, -2).contiguous())
        self._moetier_absorbed = cached
    return cached[1], cached[2]
