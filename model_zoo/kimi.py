"""Kimi-K2 / K2-Thinking (`kimi_k2` + DeepseekV3ForCausalLM) and Kimi-K2.5 (multimodal wrapper: the text
model under `text_config`, weights under `language_model.model.`, routed experts in compressed-tensors INT4).

The MoE is DeepSeek-V3's (sigmoid + e_score_correction_bias, renormalized) with one expert group and
routed_scaling_factor 2.827; `kimi_k2` is not a transformers model type, so checkpoints are recognised by
model_type together with architectures and text_config.
"""
from __future__ import annotations

from collections.abc import Mapping

import moetier
from moetier.errors import LayoutError
from moetier.family import ModelFamily

from ._deepseek_like import TINY_COMMON, TINY_MLA, config_dict, deepseek_like_layout, standard_tiny_spec
from .tiny import TinySpec, tiny_writer

NAME = "kimi"
VERSIONS = ("Kimi-K2", "Kimi-K2-Thinking", "Kimi-K2.5")
K25_PREFIX = "language_model.model."
WRAPPER_ARCHS = ("KimiK25ForConditionalGeneration", "Kimi_K25ForConditionalGeneration")


def match(config: Mapping) -> str | None:
    archs = set(config.get("architectures") or ())
    mt = config.get("model_type")
    tc = config.get("text_config") if isinstance(config.get("text_config"), Mapping) else None
    if mt == "kimi_k25" or archs & set(WRAPPER_ARCHS) or (tc is not None and tc.get("model_type") == "kimi_k2"):
        return "Kimi-K2.5"
    if mt == "kimi_k2" and (not archs or "DeepseekV3ForCausalLM" in archs):
        qc = config.get("quantization_config") or {}
        return "Kimi-K2-Thinking" if qc.get("quant_method") == "compressed-tensors" else "Kimi-K2"
    return None


def layout(config: Mapping, version: str):
    prefix = K25_PREFIX if version == "Kimi-K2.5" else "model."
    return deepseek_like_layout(config, family=NAME, version=version, router="v3", prefix=prefix)


def _text_config():
    import transformers as tf

    # Kimi-K2: 384 experts, top 8, one group, x2.827, one dense layer first, one shared expert.
    return tf.DeepseekV3Config(**TINY_COMMON, **TINY_MLA, n_routed_experts=16, num_experts_per_tok=4,
                               n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
                               routed_scaling_factor=2.827, norm_topk_prob=True)


def tiny_spec(version: str) -> TinySpec:
    import transformers as tf

    if version not in VERSIONS:
        raise LayoutError(f"unknown Kimi version {version!r}; known: {', '.join(VERSIONS)}")
    cfg = _text_config()
    auto_map = {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}
    if version != "Kimi-K2.5":
        return standard_tiny_spec(version, cfg, tf.DeepseekV3ForCausalLM, "DeepseekV3ForCausalLM", layout,
                                  model_type="kimi_k2", auto_map=auto_map, scoring_func="sigmoid",
                                  topk_method="noaux_tc", default_quant="int4" if version == "Kimi-K2-Thinking" else "fp8")
    text = config_dict(cfg, version=version, model_type="kimi_k2", architectures=["DeepseekV3ForCausalLM"],
                       scoring_func="sigmoid", topk_method="noaux_tc", num_nextn_predict_layers=0)
    vision = tf.Kimi_K25VisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64).to_dict()
    config = {"model_type": "kimi_k25", "architectures": ["KimiK25ForConditionalGeneration"],
              "_name_or_path": f"tiny-random/{version}", "text_config": text, "vision_config": vision,
              "projection_hidden_size": 32, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    return TinySpec(version, config, lambda: tf.DeepseekV3ForCausalLM(cfg),
                    rename=(("model.", K25_PREFIX), ("lm_head.", "language_model.lm_head.")),
                    default_quant="int4", notes="text tower only: the vision tower's tensors are not written",
                    extra={"hf_class": "DeepseekV3ForCausalLM", "text_only": True})


tiny = tiny_writer(tiny_spec, layout)


# ---- published dimensions (the released config.json keys moetier reads; 1.04T total) -------------------

_K2 = dict(architectures=["DeepseekV3ForCausalLM"], model_type="kimi_k2", vocab_size=163840, hidden_size=7168,
           intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61, num_nextn_predict_layers=0,
           num_attention_heads=64, num_key_value_heads=64, n_shared_experts=1, n_routed_experts=384,
           routed_scaling_factor=2.827, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128,
           qk_nope_head_dim=128, topk_method="noaux_tc", n_group=1, topk_group=1, num_experts_per_tok=8,
           moe_layer_freq=1, first_k_dense_replace=1, norm_topk_prob=True, scoring_func="sigmoid", hidden_act="silu",
           max_position_embeddings=131072, tie_word_embeddings=False, torch_dtype="bfloat16",
           quantization_config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                "weight_block_size": [128, 128]})
# K2-Thinking and K2.5 ship the routed experts as compressed-tensors INT4 (W4A16); group size 32 is from
# the model cards, not verified in a config file here.
_INT4 = {"quant_method": "compressed-tensors", "format": "pack-quantized",
         "config_groups": {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                                                                          "strategy": "group", "group_size": 32}}}}
PUBLISHED = {
    "Kimi-K2": dict(_K2, _name_or_path="moonshotai/Kimi-K2-Instruct"),
    "Kimi-K2-Thinking": dict(_K2, _name_or_path="moonshotai/Kimi-K2-Thinking", max_position_embeddings=262144,
                             quantization_config=_INT4),
    # The multimodal wrapper: the text model under text_config (its vision tower is not counted).
    "Kimi-K2.5": {"architectures": ["KimiK25ForConditionalGeneration"], "model_type": "kimi_k25",
                  "_name_or_path": "moonshotai/Kimi-K2.5", "torch_dtype": "bfloat16", "tie_word_embeddings": False,
                  "text_config": dict(_K2, max_position_embeddings=262144, quantization_config=_INT4),
                  "vision_config": {"model_type": "kimi_k25_vision"}},
}


FAMILY = ModelFamily(name=NAME, versions=VERSIONS, match=match, layout=layout, tiny=tiny,
                     description="Kimi-K2 (FP8), K2-Thinking and K2.5 (INT4 experts, language_model.model. prefix)",
                     extras={"tiny_spec": tiny_spec, "published": PUBLISHED})


@moetier.hookimpl
def moetier_register_families(register):
    register(FAMILY)
