"""The parts of a model other than its routed experts, sized from config.json (or from a checkpoint's
safetensors headers): attention (and its KV cache or recurrent state), dense MLPs, shared experts,
routers, embeddings and the LM head.

A placement needs these to know what the fast tier holds before any expert, and what the KV cache for a
given context costs. Everything is read from standard Hugging Face config keys, never from the family:

- MLA (DeepSeek-V2/V3, Kimi-K2, GLM-4.7-Flash, GLM-5; `kv_lora_rank` present): the cache holds the
  compressed latent and the rope key, kv_lora_rank + qk_rope_head_dim values per token per layer; a DSA
  indexer (`index_head_dim`, DeepSeek-V3.2 / GLM-5) adds index_head_dim values per token per layer.
- GQA / MHA (everything else): num_key_value_heads x head_dim x 2 (K and V) per token per layer; layers
  of type "sliding_attention" keep at most `sliding_window` tokens.
- Linear attention (layer_types "linear_attention", or MiniMax-Text-01's attn_type_list 0): a fixed
  state per sequence, whatever the context. Gated DeltaNet (Qwen3-Next / Qwen3.5, `linear_num_value_heads`):
  value heads x key dim x value dim in fp32 plus the short-convolution window; lightning attention
  (MiniMax): heads x head_dim x head_dim in fp32.

Assumptions (stated in every plan that uses them): cache values are bf16 (2 bytes); recurrent states
fp32; linear weights are stored as the checkpoint ships them (FP8 128x128 blocks when the whole model is
FP8, else the model dtype); routers are kept in fp32 (the runtime routes in fp32); vision towers and MTP
layers are not counted (they are not run).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ..errors import LayoutError
from ..hf_config import get_int, get_key, text_config
from ..layout import MoELayout

PARTS = ("embeddings", "lm_head", "attention", "dense_mlp", "shared_experts", "routers")
CACHE_BYTES = 2  # bf16 K/V and latent cache values
STATE_BYTES = 4  # fp32 recurrent state of linear attention
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "bf16": 2, "fp16": 2, "fp32": 4}
FP8_BYTES_PER_PARAM = 1 + 4 / (128 * 128)  # e4m3 value plus its share of one fp32 scale per 128x128 block


@dataclass(frozen=True)
class AttentionShape:
    """One decoder layer's attention: its kind, weights and cache.

    kind: "mla", "gqa", "sliding" or "linear". kv_bytes_per_token: cache bytes one token adds in this
    layer (0 for linear attention). state_bytes: fixed per-sequence state (linear attention). window: the
    most tokens a sliding layer keeps. params: weight parameters (projections and the layer's norms).
    pair_macs: multiply-adds per (query, key) pair (scores and values over all heads, MLA un-absorbed as
    in prefill); token_macs: multiply-adds per token of a linear layer's state update.
    """

    kind: str
    params: int
    kv_bytes_per_token: int = 0
    state_bytes: int = 0
    window: int | None = None
    pair_macs: int = 0
    token_macs: int = 0

    def cache_bytes(self, context: int, batch: int) -> int:
        tokens = context if self.window is None else min(context, self.window)
        return batch * (tokens * self.kv_bytes_per_token + self.state_bytes)


@dataclass(frozen=True)
class ModelParts:
    """What a model holds besides its routed experts, in bytes as it will be held.

    part_bytes: bytes per part (PARTS); attention: one AttentionShape per decoder layer; source: "config"
    (computed from config.json keys) or "checkpoint headers" (summed from the safetensors headers);
    assumptions: what the sizes rest on, in words.
    """

    layout: MoELayout
    vocab_size: int
    attention: tuple[AttentionShape, ...]
    part_bytes: Mapping[str, int]
    linear_bytes_per_param: float
    source: str = "config"
    assumptions: tuple[str, ...] = field(default=())

    def kv_cache_bytes(self, context: int, batch: int) -> int:
        """KV cache (and recurrent state) for `batch` sequences of `context` tokens, all layers."""
        return sum(a.cache_bytes(context, batch) for a in self.attention)

    def kv_bytes_per_token(self) -> int:
        return sum(a.kv_bytes_per_token for a in self.attention)

    @property
    def total_bytes(self) -> int:
        return sum(self.part_bytes.values())

    def layer_weight_bytes(self, layer_index: int) -> int:
        """Weight bytes a decode step reads in one decoder layer outside the routed experts: its attention,
        and its dense MLP or its shared expert and router."""
        a = self.attention[layer_index].params * self.linear_bytes_per_param
        lay = self.layout
        if layer_index in lay.dense_layers:
            return int(a + 3 * lay.hidden_size * (lay.dense_intermediate_size or 0) * self.linear_bytes_per_param)
        m = lay.layer(layer_index)
        shared = 0 if m.shared is None else 3 * lay.hidden_size * m.shared.intermediate_size * self.linear_bytes_per_param
        return int(a + shared + 4 * m.router.num_experts * lay.hidden_size)


def dtype_bytes(dtype: str) -> int:
    try:
        return _DTYPE_BYTES[str(dtype).replace("torch.", "")]
    except KeyError:
        raise LayoutError(f"model dtype {dtype!r} is not one of {', '.join(_DTYPE_BYTES)}") from None


def _linear_bytes(layout: MoELayout) -> float:
    q = layout.quantization
    if q.scheme == "fp8_block" and q.scope == "all":
        return FP8_BYTES_PER_PARAM
    return float(dtype_bytes(layout.dtype))


def _layer_kinds(tc: Mapping, n_layers: int) -> list[str]:
    """Per decoder layer: "full", "sliding" or "linear" (from layer_types, or attn_type_list)."""
    types = tc.get("layer_types")
    if isinstance(types, list) and len(types) == n_layers:
        out = []
        for t in types:
            if t in ("linear_attention",):
                out.append("linear")
            elif t in ("sliding_attention",):
                out.append("sliding")
            else:  # full_attention, indexed_attention, attention, ...
                out.append("full")
        return out
    attn = tc.get("attn_type_list")  # MiniMax-Text-01: 1 = softmax attention, 0 = lightning (linear)
    if isinstance(attn, list) and len(attn) == n_layers:
        return ["full" if a == 1 else "linear" for a in attn]
    interval = tc.get("full_attention_interval")  # older Qwen3-Next configs
    if isinstance(interval, int) and interval > 0 and "linear_num_value_heads" in tc:
        return ["full" if (i + 1) % interval == 0 else "linear" for i in range(n_layers)]
    return ["full"] * n_layers


def _mla(tc: Mapping, H: int) -> AttentionShape:
    n = get_int(tc, "num_attention_heads")
    rope, nope, v = get_int(tc, "qk_rope_head_dim"), get_int(tc, "qk_nope_head_dim"), get_int(tc, "v_head_dim")
    kv_lora = get_int(tc, "kv_lora_rank")
    q_lora = get_int(tc, "q_lora_rank", default=None)
    q = (H * q_lora + q_lora + q_lora * n * (nope + rope)) if q_lora else H * n * (nope + rope)
    params = q + H * (kv_lora + rope) + kv_lora + kv_lora * n * (nope + v) + n * v * H + 2 * H
    kv = (kv_lora + rope) * CACHE_BYTES
    index_dim = get_int(tc, "index_head_dim", default=None)
    if index_dim:  # DSA lightning indexer: its own query/key projections and a cached key per token
        ih = get_int(tc, "index_n_heads")
        params += (q_lora or H) * ih * index_dim + H * index_dim + 2 * index_dim + H * ih
        kv += index_dim * CACHE_BYTES
    return AttentionShape("mla", params, kv_bytes_per_token=kv, pair_macs=n * (nope + rope + v))


def _gqa(tc: Mapping, H: int, kind: str) -> AttentionShape:
    n = get_int(tc, "num_attention_heads")
    kvh = get_int(tc, "num_key_value_heads", default=n)
    hd = get_int(tc, "head_dim", default=H // n)
    gate = 2 if _output_gated(tc) else 1  # q_proj also yields a per-head output gate
    params = H * n * hd * gate + 2 * H * kvh * hd + n * hd * H + 2 * H
    if tc.get("attention_bias") or tc.get("qkv_bias"):
        params += n * hd * gate + 2 * kvh * hd
    if _qk_norm(tc):
        # per head (Qwen3, GLM-4.5); MiniMax-M2 normalizes all heads' q and k at once
        params += (n + kvh) * hd if tc.get("model_type") == "minimax_m2" else 2 * hd
    window = get_int(tc, "sliding_window", default=None) if kind == "sliding" else None
    return AttentionShape(kind if window else "gqa", params, kv_bytes_per_token=2 * kvh * hd * CACHE_BYTES,
                          window=window or None, pair_macs=2 * n * hd)


def _linear(tc: Mapping, H: int) -> AttentionShape:
    if "linear_num_value_heads" in tc:  # Gated DeltaNet
        nk, nv = get_int(tc, "linear_num_key_heads"), get_int(tc, "linear_num_value_heads")
        dk, dv = get_int(tc, "linear_key_head_dim"), get_int(tc, "linear_value_head_dim")
        kernel = get_int(tc, "linear_conv_kernel_dim", default=4)
        conv_dim = 2 * nk * dk + nv * dv
        params = (H * (2 * nk * dk + 2 * nv * dv) + H * 2 * nv + conv_dim * kernel + 2 * nv + dv
                  + nv * dv * H + 2 * H)
        state = nv * dk * dv * STATE_BYTES + conv_dim * (kernel - 1) * CACHE_BYTES
        return AttentionShape("linear", params, state_bytes=state, token_macs=2 * nv * dk * dv)
    # Lightning attention (MiniMax): qkv, output gate and output projections, a norm; state heads x d x d
    n = get_int(tc, "num_attention_heads")
    hd = get_int(tc, "head_dim", default=H // n)
    params = H * 3 * n * hd + 2 * n * hd * H + n * hd + 2 * H
    return AttentionShape("linear", params, state_bytes=n * hd * hd * STATE_BYTES, token_macs=2 * n * hd * hd)


def _output_gated(tc: Mapping) -> bool:
    if tc.get("attn_output_gate") is not None:
        return bool(tc["attn_output_gate"])
    # Qwen3-Next and Qwen3.5 gate every full-attention output; their configs do not always say so.
    return str(tc.get("model_type", "")).startswith(("qwen3_next", "qwen3_5"))


def _qk_norm(tc: Mapping) -> bool:
    if tc.get("use_qk_norm") is not None:
        return bool(tc["use_qk_norm"])
    # transformers normalizes q and k in every Qwen3 and MiniMax-M2 layer whatever the config says
    return str(tc.get("model_type", "")).startswith(("qwen3", "minimax_m2"))


def parts_from_config(config: Mapping, layout: MoELayout) -> ModelParts:
    """The non-expert parts of the model `config` describes (`layout` is its family's reading of it)."""
    tc = text_config(config)
    H, L = layout.hidden_size, layout.num_hidden_layers
    vocab = get_int(tc, "vocab_size")
    kinds = _layer_kinds(tc, L)
    mla = get_key(tc, "kv_lora_rank", default=None) is not None
    attention = []
    for kind in kinds:
        if kind == "linear":
            attention.append(_linear(tc, H))
        elif mla:
            attention.append(_mla(tc, H))
        else:
            attention.append(_gqa(tc, H, kind))
    lb = _linear_bytes(layout)
    dense_inter = layout.dense_intermediate_size or 0
    if layout.dense_layers and not dense_inter:
        raise LayoutError("config.json lacks 'intermediate_size' (the dense layers' MLP width)")
    tied = bool(tc.get("tie_word_embeddings", config.get("tie_word_embeddings", False)))
    eb = dtype_bytes(layout.dtype)
    shared = sum(3 * H * m.shared.intermediate_size + (H if m.shared.gated else 0)
                 for m in layout.moe_layers if m.shared is not None)
    routers = sum(4 * m.router.num_experts * (H + (1 if m.router.selection_bias or m.router.logit_bias else 0))
                  for m in layout.moe_layers)
    part_bytes = {
        "embeddings": vocab * H * eb + H * eb,  # the final norm rides with the embeddings
        "lm_head": 0 if tied else vocab * H * eb,
        "attention": int(sum(a.params for a in attention) * lb),
        "dense_mlp": int(len(layout.dense_layers) * 3 * H * dense_inter * lb),
        "shared_experts": int(shared * lb),
        "routers": routers,
    }
    notes = [f"linear weights {'FP8 128x128 blocks' if lb == FP8_BYTES_PER_PARAM else layout.dtype}, "
             f"embeddings and LM head {layout.dtype}, routers fp32",
             "KV cache values bf16" + (", recurrent state fp32" if any(a.kind == "linear" for a in attention) else "")]
    if mla:
        notes.append(f"MLA: {get_int(tc, 'kv_lora_rank')} + {get_int(tc, 'qk_rope_head_dim')} cached values per token "
                     "per layer" + (f", + {get_int(tc, 'index_head_dim')} for the DSA indexer"
                                    if get_key(tc, "index_head_dim", default=None) else ""))
    if layout.skipped:
        notes.append("MTP layers not counted (not run)")
    if "vision_config" in config:
        notes.append("vision tower not counted (text model only)")
    return ModelParts(layout, vocab, tuple(attention), part_bytes, lb, "config", tuple(notes))


def parts_from_checkpoint(ckpt, config: Mapping, layout: MoELayout) -> ModelParts:
    """Like `parts_from_config`, with each part's bytes summed from the checkpoint's safetensors headers
    (exact, as shipped) instead of computed; routers stay fp32 as the runtime holds them. Only headers
    are read. The attention shapes (the KV cache) still come from the config."""
    base = parts_from_config(config, layout)
    sums = dict.fromkeys(PARTS, 0)
    classify = _classifier(layout)
    for name in ckpt.names():
        if layout.is_skipped(name):
            continue
        part = classify(name)
        if part is None or part == "routers":
            continue
        sums[part] += ckpt.info(name).nbytes
    sums["routers"] = base.part_bytes["routers"]
    return ModelParts(layout, base.vocab_size, base.attention, sums, base.linear_bytes_per_param,
                      "checkpoint headers", base.assumptions[1:] + ("part sizes from the safetensors headers",))


def _classifier(layout: MoELayout):
    """name -> part (None for routed-expert tensors), from the layout's tensor-name templates."""
    names0 = layout.moe_layers[0].names if layout.moe_layers else None
    moe = {m.index: m.names for m in layout.moe_layers}

    def layer_of(name: str) -> int | None:
        for i in range(layout.num_hidden_layers):
            if f"layers.{i}." in name:
                return i
        return None

    expert_roots = {}
    for i, names in moe.items():
        block = names.block_prefix(i)
        roots = [block + names.expert.split("{")[0]]
        if names.fused:
            roots += list(names.fused_names(i))
            if names.fused_gate_up_bias:
                roots += list(names.fused_bias_names(i))
        shared = [block + names.shared.split("{")[0]] if names.shared else []
        if names.shared_gate:
            shared.append(names.shared_gate_module(i))
        router = [names.router_module(i) + "."] + [n for n in (names.selection_bias_name(i), names.router_bias_name(i)) if n]
        expert_roots[i] = (roots, shared, router)

    def classify(name: str) -> str | None:
        if "lm_head" in name:
            return "lm_head"
        if "embed" in name:
            return "embeddings"
        i = layer_of(name)
        if i is None:
            return "embeddings"  # final norm, and any tower outside the decoder
        if i in expert_roots:
            roots, shared, router = expert_roots[i]
            if any(name.startswith(r) for r in roots):
                return None
            if any(name.startswith(s) for s in shared):
                return "shared_experts"
            if any(name.startswith(r) or name == r for r in router):
                return "routers"
            return "attention"
        if names0 is not None and name.startswith(names0.block_prefix(i)):
            return "dense_mlp"
        return "attention"

    return classify


def total_params(parts: ModelParts) -> int:
    """Parameters of the text model (routed experts included), from the configured shapes: for checking
    the published dimensions against the published totals."""
    lay = parts.layout
    H = lay.hidden_size
    experts = sum(m.experts.num_experts * 3 * H * m.experts.intermediate_size for m in lay.moe_layers)
    shared = sum(3 * H * m.shared.intermediate_size for m in lay.moe_layers if m.shared is not None)
    routers = sum(m.router.num_experts * H for m in lay.moe_layers)
    dense = len(lay.dense_layers) * 3 * H * (lay.dense_intermediate_size or 0)
    emb = parts.vocab_size * H * (1 if parts.part_bytes["lm_head"] == 0 else 2)
    return experts + shared + routers + dense + emb + sum(a.params for a in parts.attention)


def active_params(parts: ModelParts) -> int:
    """Parameters one token uses (top-k routed experts, not all)."""
    lay = parts.layout
    H = lay.hidden_size
    routed_all = sum(m.experts.num_experts * 3 * H * m.experts.intermediate_size for m in lay.moe_layers)
    routed_k = sum(m.experts.top_k * 3 * H * m.experts.intermediate_size for m in lay.moe_layers)
    return total_params(parts) - routed_all + routed_k - (parts.vocab_size * H if parts.part_bytes["lm_head"] else 0)


def describe_params(n: int) -> str:
    return f"{n / 1e12:.2f}T" if n >= 1e12 else f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


__all__ = ["PARTS", "AttentionShape", "ModelParts", "parts_from_config", "parts_from_checkpoint", "total_params",
           "active_params", "dtype_bytes"]
