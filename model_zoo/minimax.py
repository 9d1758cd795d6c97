"""MiniMax-M2 / M2.1 / M2.5 (`minimax_m2`) and MiniMax-Text-01 (`minimax`, original `minimax_text_01`).

Both keep the MoE at `model.layers.{i}.block_sparse_moe` with Mixtral names (w1 gate, w3 up, w2 down)
and the per-expert width in `intermediate_size`. M2 (transformers 5.24 MiniMaxM2TopKRouter): sigmoid,
`block_sparse_moe.e_score_correction_bias` for selection only, always renormalized, no scaling, shipped
in FP8 128x128 blocks. Text-01 (MiniMaxTopKRouter): softmax, top-k, always renormalized. No shared experts.
"""
from __future__ import annotations

from collections.abc import Mapping

import moetier
from moetier.errors import LayoutError
from moetier.experts import ExpertLayerSpec
from moetier.family import ModelFamily
from moetier.hf_config import get_int, get_key, quantization_from_config, require_choice
from moetier.layout import MoELayerLayout, MoELayout, RouterSpec, TensorNames

from ._deepseek_like import config_dict, version_from_name
from .tiny import TinySpec, tiny_writer

NAME = "minimax"
M2 = ("MiniMax-M2", "MiniMax-M2.1", "MiniMax-M2.5")
VERSIONS = M2 + ("MiniMax-Text-01",)


def match(config: Mapping) -> str | None:
    archs = set(config.get("architectures") or ())
    mt = config.get("model_type")
    if mt == "minimax_m2" or "MiniMaxM2ForCausalLM" in archs:
        return version_from_name(config, M2, "MiniMax-M2")
    if mt in ("minimax", "minimax_text_01") or archs & {"MiniMaxForCausalLM", "MiniMaxText01ForCausalLM"}:
        return "MiniMax-Text-01"
    return None


def layout(config: Mapping, version: str) -> MoELayout:
    if get_key(config, "hidden_act", default="silu") != "silu":
        raise LayoutError(f"config key 'hidden_act' = {config['hidden_act']!r} is not implemented; only 'silu'")
    if get_int(config, "shared_intermediate_size", default=0):
        raise LayoutError("config key 'shared_intermediate_size' > 0 (a shared expert) is not implemented for MiniMax")
    L, H = get_int(config, "num_hidden_layers"), get_int(config, "hidden_size")
    E, k = get_int(config, "num_local_experts", "num_experts"), get_int(config, "num_experts_per_tok")
    inter = get_int(config, "intermediate_size")
    if version in M2:
        require_choice(config, "scoring_func", ("sigmoid",), default="sigmoid")
        require_choice(config, "use_routing_bias", (True,), default=True)
        if float(get_key(config, "routed_scaling_factor", default=1.0)) != 1.0:
            raise LayoutError("config key 'routed_scaling_factor' != 1 is not implemented for MiniMax-M2 (none is applied)")
        router = RouterSpec(E, k, "sigmoid", selection_bias=True, renormalize=True)
        bias = "e_score_correction_bias"
    else:
        require_choice(config, "scoring_func", ("softmax",), default="softmax")
        router = RouterSpec(E, k, "softmax", renormalize=True)
        bias = None
    names = TensorNames(block="model.layers.{layer}.block_sparse_moe", router="gate", selection_bias=bias,
                        projections=("w1", "w3", "w2"))
    spec = ExpertLayerSpec(E, k, H, inter)
    return MoELayout(family=NAME, version=version, num_hidden_layers=L, hidden_size=H,
                     moe_layers=tuple(MoELayerLayout(i, spec, router, names) for i in range(L)),
                     quantization=quantization_from_config(config),
                     dtype=str(config.get("torch_dtype") or config.get("dtype") or "bfloat16"))


_COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
               vocab_size=128, intermediate_size=32, max_position_embeddings=64, num_local_experts=8,
               num_experts_per_tok=2, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def tiny_spec(version: str) -> TinySpec:
    import transformers as tf

    if version not in VERSIONS:
        raise LayoutError(f"unknown MiniMax version {version!r}; known: {', '.join(VERSIONS)}")
    if version in M2:
        cfg = tf.MiniMaxM2Config(**_COMMON)
        config = config_dict(cfg, version=version, architectures=["MiniMaxM2ForCausalLM"], scoring_func="sigmoid",
                             use_routing_bias=True, shared_intermediate_size=0)
        return TinySpec(version, config, lambda: tf.MiniMaxM2ForCausalLM(cfg), default_quant="fp8",
                        extra={"hf_class": "MiniMaxM2ForCausalLM"})
    cfg = tf.MiniMaxConfig(**_COMMON, layer_types=["linear_attention", "full_attention"], block_size=16)
    config = config_dict(cfg, version=version, architectures=["MiniMaxForCausalLM"])
    return TinySpec(version, config, lambda: tf.MiniMaxForCausalLM(cfg), extra={"hf_class": "MiniMaxForCausalLM"})


tiny = tiny_writer(tiny_spec, layout)


# ---- published dimensions (the released config.json keys moetier reads; M2 230B, Text-01 456B) ---------

_M2 = dict(architectures=["MiniMaxM2ForCausalLM"], model_type="minimax_m2", vocab_size=200064, hidden_size=3072,
           intermediate_size=1536, num_hidden_layers=62, num_attention_heads=48, num_key_value_heads=8, head_dim=128,
           rotary_dim=64, use_qk_norm=True, num_local_experts=256, num_experts_per_tok=8, scoring_func="sigmoid",
           use_routing_bias=True, shared_intermediate_size=0, hidden_act="silu", tie_word_embeddings=False,
           torch_dtype="bfloat16",
           quantization_config={"quant_method": "fp8", "fmt": "float8_e4m3fn", "activation_scheme": "dynamic",
                                "weight_block_size": [128, 128],
                                "modules_to_not_convert": ["gate", "e_score_correction_bias", "lm_head"]})
PUBLISHED = {
    "MiniMax-M2": dict(_M2, _name_or_path="MiniMaxAI/MiniMax-M2"),
    "MiniMax-M2.1": dict(_M2, _name_or_path="MiniMaxAI/MiniMax-M2.1"),
    "MiniMax-M2.5": dict(_M2, _name_or_path="MiniMaxAI/MiniMax-M2.5"),
    # Lightning (linear) attention in 7 of every 8 layers, softmax attention in the 8th.
    "MiniMax-Text-01": dict(architectures=["MiniMaxText01ForCausalLM"], model_type="minimax_text_01",
                            _name_or_path="MiniMaxAI/MiniMax-Text-01", vocab_size=200064, hidden_size=6144,
                            intermediate_size=9216, num_hidden_layers=80, num_attention_heads=64,
                            num_key_value_heads=8, head_dim=128, num_local_experts=32, num_experts_per_tok=2,
                            attn_type_list=[1 if (i + 1) % 8 == 0 else 0 for i in range(80)],
                            shared_intermediate_size=0, hidden_act="silu", tie_word_embeddings=False,
                            torch_dtype="bfloat16"),
}


FAMILY = ModelFamily(name=NAME, versions=VERSIONS, match=match, layout=layout, tiny=tiny,
                     description="MiniMax-M2/M2.1/M2.5 (sigmoid+bias, FP8) and MiniMax-Text-01 (softmax)",
                     extras={"tiny_spec": tiny_spec, "published": PUBLISHED})


@moetier.hookimpl
def moetier_register_families(register):
    register(FAMILY)
