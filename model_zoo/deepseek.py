"""DeepSeek-V2 / V2-Lite (softmax routers) and DeepSeek-V3 / R1 / V3.1 / V3.2 (sigmoid + bias, 8 groups)."""
from __future__ import annotations

from collections.abc import Mapping

import moetier
from moetier.errors import LayoutError
from moetier.family import ModelFamily

from ._deepseek_like import (TINY_COMMON, TINY_INDEXER, TINY_MLA, deepseek_like_layout, standard_tiny_spec,
                             version_from_name)
from .tiny import TinySpec, tiny_writer

NAME = "deepseek"
V3_NAMES = ("DeepSeek-V3", "DeepSeek-R1", "DeepSeek-V3.1")
VERSIONS = ("DeepSeek-V2", "DeepSeek-V2-Lite") + V3_NAMES + ("DeepSeek-V3.2",)


def match(config: Mapping) -> str | None:
    archs = set(config.get("architectures") or ())
    mt = config.get("model_type")
    if mt in ("kimi_k2", "kimi_k25") or "text_config" in config:
        return None  # Kimi ships DeepseekV3ForCausalLM under its own model_type
    if mt == "deepseek_v2" or "DeepseekV2ForCausalLM" in archs:
        return "DeepSeek-V2" if config.get("topk_method") == "group_limited_greedy" else "DeepSeek-V2-Lite"
    if mt == "deepseek_v32" or "DeepseekV32ForCausalLM" in archs:
        return "DeepSeek-V3.2"
    if mt == "deepseek_v3" or "DeepseekV3ForCausalLM" in archs:
        return version_from_name(config, V3_NAMES, "DeepSeek-V3")
    return None


def layout(config: Mapping, version: str):
    router = "v2" if version.startswith("DeepSeek-V2") else "v3"
    return deepseek_like_layout(config, family=NAME, version=version, router=router)


def tiny_spec(version: str) -> TinySpec:
    import transformers as tf

    if version not in VERSIONS:
        raise LayoutError(f"unknown DeepSeek version {version!r}; known: {', '.join(VERSIONS)}")
    if version == "DeepSeek-V2":
        # group_limited_greedy over 8 groups of 4, keep 3 (the real V2 keeps 3 of 8), x16, two shared experts.
        cfg = tf.DeepseekV2Config(**TINY_COMMON, **TINY_MLA, n_routed_experts=32, num_experts_per_tok=4,
                                  n_shared_experts=2, first_k_dense_replace=1, topk_method="group_limited_greedy",
                                  n_group=8, topk_group=3, routed_scaling_factor=16.0, norm_topk_prob=False)
        cls, arch, extra, mtp = tf.DeepseekV2ForCausalLM, "DeepseekV2ForCausalLM", {}, False
    elif version == "DeepSeek-V2-Lite":
        mla = dict(TINY_MLA, q_lora_rank=None)
        cfg = tf.DeepseekV2Config(**TINY_COMMON, **mla, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=2,
                                  first_k_dense_replace=1, topk_method="greedy", n_group=1, topk_group=1,
                                  routed_scaling_factor=1.0, norm_topk_prob=False)
        cls, arch, extra, mtp = tf.DeepseekV2ForCausalLM, "DeepseekV2ForCausalLM", {}, False
    else:
        kw = dict(**TINY_COMMON, **TINY_MLA, n_routed_experts=32, num_experts_per_tok=4, n_shared_experts=1,
                  first_k_dense_replace=1, n_group=8, topk_group=4, routed_scaling_factor=2.5, norm_topk_prob=True)
        if version == "DeepSeek-V3.2":
            cfg = tf.DeepseekV32Config(**kw, **TINY_INDEXER)
            cls, arch = tf.DeepseekV32ForCausalLM, "DeepseekV32ForCausalLM"
        else:
            cfg = tf.DeepseekV3Config(**kw)
            cls, arch = tf.DeepseekV3ForCausalLM, "DeepseekV3ForCausalLM"
        extra, mtp = {"scoring_func": "sigmoid", "topk_method": "noaux_tc"}, True
    # V3 / R1 / V3.1 / V3.2 ship FP8 128x128 blocks; V2 ships bf16.
    return standard_tiny_spec(version, cfg, cls, arch, layout, mtp_layers=1 if mtp else 0,
                              default_quant="fp8" if mtp else None, **extra)


tiny = tiny_writer(tiny_spec, layout)


# ---- published dimensions -----------------------------------------------------------------------------
# The released checkpoints' config.json (the keys moetier reads), so `moetier plan DeepSeek-V3` answers
# for the real model without its files. Checked against the published totals (671B / 236B / 15.7B) in
# tests/test_placement_models.py.

FP8_BLOCKS = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
_V3 = dict(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", vocab_size=129280, hidden_size=7168,
           intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61, num_nextn_predict_layers=1,
           num_attention_heads=128, num_key_value_heads=128, n_shared_experts=1, n_routed_experts=256,
           routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128,
           qk_nope_head_dim=128, topk_method="noaux_tc", n_group=8, topk_group=4, num_experts_per_tok=8,
           moe_layer_freq=1, first_k_dense_replace=3, norm_topk_prob=True, scoring_func="sigmoid", hidden_act="silu",
           max_position_embeddings=163840, tie_word_embeddings=False, torch_dtype="bfloat16",
           quantization_config=FP8_BLOCKS)
_V2 = dict(architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2", vocab_size=102400, hidden_size=5120,
           intermediate_size=12288, moe_intermediate_size=1536, num_hidden_layers=60, num_attention_heads=128,
           num_key_value_heads=128, n_shared_experts=2, n_routed_experts=160, routed_scaling_factor=16.0,
           kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128,
           topk_method="group_limited_greedy", n_group=8, topk_group=3, num_experts_per_tok=6, moe_layer_freq=1,
           first_k_dense_replace=1, norm_topk_prob=False, scoring_func="softmax", hidden_act="silu",
           max_position_embeddings=163840, tie_word_embeddings=False, torch_dtype="bfloat16")
PUBLISHED = {
    "DeepSeek-V2": dict(_V2, _name_or_path="deepseek-ai/DeepSeek-V2"),
    "DeepSeek-V2-Lite": dict(_V2, _name_or_path="deepseek-ai/DeepSeek-V2-Lite", hidden_size=2048,
                             intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27,
                             num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64,
                             routed_scaling_factor=1.0, q_lora_rank=None, topk_method="greedy", n_group=1,
                             topk_group=1),
    "DeepSeek-V3": dict(_V3, _name_or_path="deepseek-ai/DeepSeek-V3"),
    "DeepSeek-R1": dict(_V3, _name_or_path="deepseek-ai/DeepSeek-R1"),
    "DeepSeek-V3.1": dict(_V3, _name_or_path="deepseek-ai/DeepSeek-V3.1"),
    "DeepSeek-V3.2": dict(_V3, _name_or_path="deepseek-ai/DeepSeek-V3.2", architectures=["DeepseekV32ForCausalLM"],
                          model_type="deepseek_v32", index_n_heads=64, index_head_dim=128, index_topk=2048,
                          quantization_config=dict(FP8_BLOCKS, scale_fmt="ue8m0")),
}


FAMILY = ModelFamily(name=NAME, versions=VERSIONS, match=match, layout=layout, tiny=tiny,
                     description="DeepSeek-V2/V2-Lite (softmax, group max) and V3/R1/V3.1/V3.2 (sigmoid+bias, 8 groups)",
                     extras={"tiny_spec": tiny_spec, "published": PUBLISHED})


@moetier.hookimpl
def moetier_register_families(register):
    register(FAMILY)
