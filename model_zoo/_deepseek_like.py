"""The DeepSeek-style MoE layout shared by DeepSeek-V2/V3/V3.2, Kimi-K2/K2.5 and GLM-4.5/4.7-Flash/5.

Config keys: n_routed_experts (alias num_local_experts / num_experts), num_experts_per_tok,
moe_intermediate_size, n_shared_experts (one MLP of n_shared * moe_intermediate_size), dense-first
layers from mlp_layer_types or first_k_dense_replace, MTP layers at num_hidden_layers.. from
num_nextn_predict_layers. Routers (transformers 5.24 DeepseekV2TopkRouter / DeepseekV3TopkRouter):

- "v2": softmax; topk_method greedy, or group_limited_greedy with group score = max; never
  renormalized; x routed_scaling_factor.
- "v3": sigmoid + e_score_correction_bias for selection only; groups scored by the sum of their top 2;
  renormalized (sum + 1e-20) when norm_topk_prob; x routed_scaling_factor.
"""
from __future__ import annotations

from collections.abc import Mapping

from moetier.errors import LayoutError
from moetier.experts import ExpertLayerSpec
from moetier.hf_config import get_int, get_key, quantization_from_config, require_choice, text_config
from moetier.layout import MoELayerLayout, MoELayout, RouterSpec, SharedExpertSpec, SkippedLayer, TensorNames


def moe_layer_flags(tc: Mapping, num_layers: int) -> list[bool]:
    """Which decoder layers are MoE: `mlp_layer_types` ("dense"/"sparse") if given, else first_k_dense_replace."""
    types = tc.get("mlp_layer_types")
    if types is not None:
        if len(types) != num_layers or any(t not in ("dense", "sparse") for t in types):
            raise LayoutError(f"config key 'mlp_layer_types' must list 'dense'/'sparse' for each of {num_layers} layers, "
                              f"got {types!r}")
        return [t == "sparse" for t in types]
    first_dense = get_int(tc, "first_k_dense_replace")
    freq = get_int(tc, "moe_layer_freq", default=1)
    if freq != 1:
        raise LayoutError(f"config key 'moe_layer_freq' = {freq} is not implemented (transformers ignores it); only 1")
    return [i >= first_dense for i in range(num_layers)]


def deepseek_like_layout(config: Mapping, *, family: str, version: str, router: str, prefix: str = "model.") -> MoELayout:
    """router: "v2" or "v3" (see the module docstring). prefix: where the decoder sits ("model.",
    "language_model.model.")."""
    tc = text_config(config)
    if get_key(tc, "hidden_act", default="silu") != "silu":
        raise LayoutError(f"config key 'hidden_act' = {tc['hidden_act']!r} is not implemented; only 'silu'")
    L = get_int(tc, "num_hidden_layers")
    H = get_int(tc, "hidden_size")
    E = get_int(tc, "n_routed_experts", "num_local_experts", "num_experts")
    k = get_int(tc, "num_experts_per_tok")
    inter = get_int(tc, "moe_intermediate_size")
    scaling = float(get_key(tc, "routed_scaling_factor", default=1.0))
    n_shared = get_int(tc, "n_shared_experts", default=0)

    if router == "v2":
        require_choice(tc, "scoring_func", ("softmax",), default="softmax")
        method = require_choice(tc, "topk_method", ("greedy", "group_limited_greedy"), default="greedy")
        if tc.get("norm_topk_prob"):
            # transformers' DeepseekV2TopkRouter never renormalizes; refuse rather than silently differ.
            raise LayoutError("config key 'norm_topk_prob' = true is not implemented for DeepSeek-V2 routing")
        grouped = method == "group_limited_greedy"
        spec = RouterSpec(E, k, "softmax", n_group=get_int(tc, "n_group") if grouped else 1,
                          topk_group=get_int(tc, "topk_group") if grouped else 1, group_score="max",
                          renormalize=False, scaling=scaling)
        bias_name = None
    elif router == "v3":
        require_choice(tc, "scoring_func", ("sigmoid",), default="sigmoid")
        require_choice(tc, "topk_method", ("noaux_tc",), default="noaux_tc")
        spec = RouterSpec(E, k, "sigmoid", selection_bias=True, n_group=get_int(tc, "n_group", default=1),
                          topk_group=get_int(tc, "topk_group", default=1), group_score="top2_sum",
                          renormalize=bool(get_key(tc, "norm_topk_prob", default=True)), renorm_eps=1e-20,
                          scaling=scaling)
        bias_name = "gate.e_score_correction_bias"
    else:
        raise ValueError(f"router must be 'v2' or 'v3', got {router!r}")

    names = TensorNames(block=prefix + "layers.{layer}.mlp", router="gate", selection_bias=bias_name,
                        shared="shared_experts.{proj}" if n_shared else None)
    experts = ExpertLayerSpec(E, k, H, inter)
    shared = SharedExpertSpec(n_shared * inter) if n_shared else None
    flags = moe_layer_flags(tc, L)
    moe = tuple(MoELayerLayout(i, experts, spec, names, shared) for i in range(L) if flags[i])
    n_mtp = get_int(tc, "num_nextn_predict_layers", default=0)
    skipped = tuple(SkippedLayer(f"{prefix}layers.{L + j}.", "MTP") for j in range(n_mtp))
    return MoELayout(family=family, version=version, num_hidden_layers=L, hidden_size=H, moe_layers=moe,
                     dense_layers=tuple(i for i in range(L) if not flags[i]),
                     dense_intermediate_size=get_int(tc, "intermediate_size", default=None),
                     skipped=skipped, quantization=quantization_from_config(config),
                     dtype=str(tc.get("torch_dtype") or tc.get("dtype") or "bfloat16"))


# ---- tiny versions ------------------------------------------------------------------------------------

TINY_COMMON = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                   vocab_size=128, intermediate_size=96, moe_intermediate_size=32, max_position_embeddings=64,
                   tie_word_embeddings=False)
TINY_MLA = dict(q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16)
TINY_INDEXER = dict(index_n_heads=2, index_head_dim=16, index_topk=8)


def config_dict(hf_config, *, version: str, **overrides) -> dict:
    """A transformers config as the config.json a release would carry."""
    d = hf_config.to_dict()
    d["_name_or_path"] = f"tiny-random/{version}"
    d["torch_dtype"] = "bfloat16"
    d.pop("dtype", None)
    d.update(overrides)
    return d


def mtp_spec(names: TensorNames, num_layers: int, prefix: str, hidden: int, vocab: int):
    """DeepSeek-V3-style MTP layer at index num_layers: a full decoder layer plus its projection and norms."""
    p = f"{prefix}layers.{num_layers}."
    extras = {p + "enorm.weight": (hidden,), p + "hnorm.weight": (hidden,), p + "eh_proj.weight": (hidden, 2 * hidden),
              p + "shared_head.norm.weight": (hidden,), p + "shared_head.head.weight": (vocab, hidden),
              p + "embed_tokens.weight": (vocab, hidden)}
    return ((names, num_layers, p, extras),)


def version_from_name(config: Mapping, candidates: tuple[str, ...], default: str) -> str:
    """Pick a version by `_name_or_path` when it names one of candidates (same architecture), else default."""
    name = str(config.get("_name_or_path") or text_config(config).get("_name_or_path") or "").lower()
    for v in sorted(candidates, key=len, reverse=True):
        if name.endswith(v.lower()):
            return v
    return default


def standard_tiny_spec(version: str, hf_config, model_cls, arch: str, layout_fn, *, mtp_layers: int = 0,
                       default_quant: str | None = None, **config_overrides):
    """TinySpec of a text-only DeepSeek-style model kept under `model.` (DeepSeek, Kimi-K2, GLM)."""
    from .tiny import TinySpec

    config = config_dict(hf_config, version=version, architectures=[arch], num_nextn_predict_layers=mtp_layers,
                         **config_overrides)
    mtp = ()
    if mtp_layers:
        lay = layout_fn(config, version)
        mtp = mtp_spec(lay.moe_layers[-1].names, lay.num_hidden_layers, "model.", lay.hidden_size,
                       hf_config.vocab_size)
    return TinySpec(version, config, lambda: model_cls(hf_config), mtp=mtp, default_quant=default_quant,
                    extra={"hf_class": model_cls.__name__})
