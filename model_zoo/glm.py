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


FAMILY = ModelFamily(name=NAME, versions=VERSIONS, match=match, layout=layout, tiny=tiny,
                     description="GLM-4.5/4.6/4.7/4.5-Air (glm4_moe), GLM-4.7-Flash (glm4_moe_lite), GLM-5 (glm_moe_dsa)",
                     extras={"tiny_spec": tiny_spec})


@moetier.hookimpl
def moetier_register_families(register):
    register(FAMILY)
