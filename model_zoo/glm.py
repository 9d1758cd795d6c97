"""GLM-4.5 / 4.6 / 4.7 and GLM-4.5-Air (`glm4_moe`), GLM-4.7-Flash (`glm4_moe_lite`, MLA) and GLM-5
(`glm_moe_dsa`, MLA + DSA indexer). The MoE is DeepSeek-V3's router (sigmoid + e_score_correction_bias,
renormalized, n_group 1 in the releases) with one shared expert, dense-first layers and an MTP layer at
index num_hidden_layers."""
from __future__ import annotations

from collections.abc import Mapping

import moetier
from moetier.errors import LayoutError
from moetier.family import ModelFamily

from ._deepseek_like import (TINY_COMMON, TINY_INDEXER, TINY_MLA, deepseek_like_layout, standard_tiny_spec,
                             version_from_name)
from .tiny import TinySpec, tiny_writer

NAME = "glm"
GLM4_MOE = ("GLM-4.5", "GLM-4.6", "GLM-4.7", "GLM-4.5-Air")
VERSIONS = GLM4_MOE + ("GLM-4.7-Flash", "GLM-5")


def match(config: Mapping) -> str | None:
    archs = set(config.get("architectures") or ())
    mt = config.get("model_type")
    if mt == "glm4_moe" or "Glm4MoeForCausalLM" in archs:
        return version_from_name(config, GLM4_MOE, "GLM-4.5")
    if mt == "glm4_moe_lite" or "Glm4MoeLiteForCausalLM" in archs:
        return "GLM-4.7-Flash"
    if mt == "glm_moe_dsa" or "GlmMoeDsaForCausalLM" in archs:
        return "GLM-5"
    return None


def layout(config: Mapping, version: str):
    return deepseek_like_layout(config, family=NAME, version=version, router="v3")


def tiny_spec(version: str) -> TinySpec:
    import transformers as tf

    if version not in VERSIONS:
        raise LayoutError(f"unknown GLM version {version!r}; known: {', '.join(VERSIONS)}")
    moe = dict(n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1,
               norm_topk_prob=True)
    if version in GLM4_MOE:
        # GLM-4.5/4.6/4.7: x2.5 and 3 dense layers first; Air: x1.0 and 1 dense layer (tiny: 1 for both).
        scale = 1.0 if version == "GLM-4.5-Air" else 2.5
        cfg = tf.Glm4MoeConfig(**TINY_COMMON, head_dim=16, **moe, first_k_dense_replace=1, routed_scaling_factor=scale)
        cls, arch = tf.Glm4MoeForCausalLM, "Glm4MoeForCausalLM"
    elif version == "GLM-4.7-Flash":
        cfg = tf.Glm4MoeLiteConfig(**TINY_COMMON, **TINY_MLA, **moe, routed_scaling_factor=1.8)
        cls, arch = tf.Glm4MoeLiteForCausalLM, "Glm4MoeLiteForCausalLM"
    else:
        cfg = tf.GlmMoeDsaConfig(**TINY_COMMON, **TINY_MLA, **TINY_INDEXER, **moe, first_k_dense_replace=1,
                                 routed_scaling_factor=2.5)
        cls, arch = tf.GlmMoeDsaForCausalLM, "GlmMoeDsaForCausalLM"
    return standard_tiny_spec(version, cfg, cls, arch, layout, mtp_layers=1)


tiny = tiny_writer(tiny_spec, layout)


# ---- published dimensions (the released config.json keys moetier reads) --------------------------------
# GLM-4.5/4.6/4.7 355B, 4.5-Air 106B, GLM-5 744B. GLM-4.7-Flash's values are transformers 5.24's
# Glm4MoeLiteConfig defaults (said to mirror the release; not checked against its config file here).

_GLM45 = dict(architectures=["Glm4MoeForCausalLM"], model_type="glm4_moe", vocab_size=151552, hidden_size=5120,
              intermediate_size=12288, moe_intermediate_size=1536, num_hidden_layers=92, num_nextn_predict_layers=1,
              num_attention_heads=96, num_key_value_heads=8, head_dim=128, partial_rotary_factor=0.5,
              attention_bias=True, use_qk_norm=True, n_shared_experts=1, n_routed_experts=160,
              routed_scaling_factor=2.5, n_group=1, topk_group=1, num_experts_per_tok=8, first_k_dense_replace=3,
              norm_topk_prob=True, hidden_act="silu", max_position_embeddings=131072, tie_word_embeddings=False,
              torch_dtype="bfloat16")
_MLA_LITE = dict(kv_lora_rank=512, qk_rope_head_dim=64, topk_method="noaux_tc", scoring_func="sigmoid",
                 hidden_act="silu", norm_topk_prob=True, n_group=1, topk_group=1, tie_word_embeddings=False,
                 torch_dtype="bfloat16")
PUBLISHED = {
    "GLM-4.5": dict(_GLM45, _name_or_path="zai-org/GLM-4.5"),
    "GLM-4.6": dict(_GLM45, _name_or_path="zai-org/GLM-4.6", max_position_embeddings=202752),
    "GLM-4.7": dict(_GLM45, _name_or_path="zai-org/GLM-4.7", max_position_embeddings=202752),
    "GLM-4.5-Air": dict(_GLM45, _name_or_path="zai-org/GLM-4.5-Air", hidden_size=4096, intermediate_size=10944,
                        moe_intermediate_size=1408, num_hidden_layers=46, n_routed_experts=128,
                        routed_scaling_factor=1.0, first_k_dense_replace=1, use_qk_norm=False),
    "GLM-4.7-Flash": dict(_MLA_LITE, architectures=["Glm4MoeLiteForCausalLM"], model_type="glm4_moe_lite",
                          _name_or_path="zai-org/GLM-4.7-Flash", vocab_size=154880, hidden_size=2048,
                          intermediate_size=10240, moe_intermediate_size=1536, num_hidden_layers=47,
                          num_attention_heads=20, num_key_value_heads=20, q_lora_rank=768, qk_nope_head_dim=192,
                          v_head_dim=256, n_shared_experts=1, n_routed_experts=64, num_experts_per_tok=4,
                          routed_scaling_factor=1.8, first_k_dense_replace=1, num_nextn_predict_layers=1),
    "GLM-5": dict(_MLA_LITE, architectures=["GlmMoeDsaForCausalLM"], model_type="glm_moe_dsa",
                  _name_or_path="zai-org/GLM-5", vocab_size=154880, hidden_size=6144, intermediate_size=12288,
                  moe_intermediate_size=2048, num_hidden_layers=78, num_attention_heads=64, num_key_value_heads=64,
                  q_lora_rank=2048, qk_nope_head_dim=192, v_head_dim=256, n_shared_experts=1, n_routed_experts=256,
                  num_experts_per_tok=8, routed_scaling_factor=2.5, first_k_dense_replace=3,
                  num_nextn_predict_layers=1, index_n_heads=32, index_head_dim=128, index_topk=2048),
}


FAMILY = ModelFamily(name=NAME, versions=VERSIONS, match=match, layout=layout, tiny=tiny,
                     description="GLM-4.5/4.6/4.7/4.5-Air (glm4_moe), GLM-4.7-Flash (glm4_moe_lite), GLM-5 (glm_moe_dsa)",
                     extras={"tiny_spec": tiny_spec, "published": PUBLISHED})


@moetier.hookimpl
def moetier_register_families(register):
    register(FAMILY)
