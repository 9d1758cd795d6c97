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


FAMILY = ModelFamily(name=NAME, versions=VERSIONS, match=match, layout=layout, tiny=tiny,
                     description="DeepSeek-V2/V2-Lite (softmax, group max) and V3/R1/V3.1/V3.2 (sigmoid+bias, 8 groups)",
                     extras={"tiny_spec": tiny_spec})


@moetier.hookimpl
def moetier_register_families(register):
    register(FAMILY)
