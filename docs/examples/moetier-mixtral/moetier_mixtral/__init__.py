"""Mixtral-8x7B / 8x22B as a moetier model family.

Router (transformers MixtralTopKRouter): softmax over all experts in fp32, top-2, always renormalized.
Experts: `model.layers.{i}.block_sparse_moe.experts.{j}.w1` (gate), `.w3` (up), `.w2` (down), the
per-expert width in `intermediate_size`; every layer is MoE; no shared expert.
"""
from __future__ import annotations

from collections.abc import Mapping

import moetier
from moetier import ExpertLayerSpec, LayoutError, ModelFamily
from moetier.hf_config import get_int, get_key, quantization_from_config, require_choice
from moetier.layout import MoELayerLayout, MoELayout, RouterSpec, TensorNames

NAME = "mixtral"
VERSIONS = ("Mixtral-8x7B", "Mixtral-8x22B")


def match(config: Mapping) -> str | None:
    """Claim configs by model_type or architectures; tell the sizes apart by name, else by hidden size."""
    if config.get("model_type") != "mixtral" and "MixtralForCausalLM" not in (config.get("architectures") or ()):
        return None
    name = str(config.get("_name_or_path") or "").lower()
    if name.endswith("8x22b") or config.get("hidden_size") == 6144:
        return "Mixtral-8x22B"
    return "Mixtral-8x7B"


def layout(config: Mapping, version: str) -> MoELayout:
    if get_key(config, "hidden_act", default="silu") != "silu":
        raise LayoutError(f"config key 'hidden_act' = {config['hidden_act']!r} is not implemented; only 'silu'")
    require_choice(config, "scoring_func", ("softmax",), default="softmax")
    L, H = get_int(config, "num_hidden_layers"), get_int(config, "hidden_size")
    E, k = get_int(config, "num_local_experts", "num_experts"), get_int(config, "num_experts_per_tok")
    experts = ExpertLayerSpec(E, k, H, get_int(config, "intermediate_size"))
    router = RouterSpec(E, k, "softmax", renormalize=True)
    names = TensorNames(block="model.layers.{layer}.block_sparse_moe", router="gate", projections=("w1", "w3", "w2"))
    return MoELayout(family=NAME, version=version, num_hidden_layers=L, hidden_size=H,
                     moe_layers=tuple(MoELayerLayout(i, experts, router, names) for i in range(L)),
                     quantization=quantization_from_config(config))


def tiny_spec(version: str):
    import transformers as tf
    from moetier.model_zoo.tiny import TinySpec

    if version not in VERSIONS:
        raise LayoutError(f"unknown Mixtral version {version!r}; known: {', '.join(VERSIONS)}")
    cfg = tf.MixtralConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=16, vocab_size=128, intermediate_size=32, max_position_embeddings=64,
                           num_local_experts=8, num_experts_per_tok=2, tie_word_embeddings=False)
    config = cfg.to_dict()
    config.update(architectures=["MixtralForCausalLM"], torch_dtype="bfloat16", _name_or_path=f"tiny-random/{version}")
    config.pop("dtype", None)
    return TinySpec(version, config, lambda: tf.MixtralForCausalLM(cfg), extra={"hf_class": "MixtralForCausalLM"})


def tiny(version: str, out_dir: str, quant: str | None = "default", seed: int = 0):
    from moetier.model_zoo.tiny import write_tiny

    return write_tiny(tiny_spec(version), layout, out_dir, quant=quant, seed=seed)


@moetier.hookimpl
def moetier_register_families(register):
    register(ModelFamily(name=NAME, versions=VERSIONS, match=match, layout=layout, tiny=tiny,
                         description="Mixtral-8x7B/8x22B (softmax top-2, renormalized) - example plugin",
                         extras={"tiny_spec": tiny_spec}))
