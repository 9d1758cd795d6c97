"""Layouts from real-sized configs (values of the released checkpoints), identification by
model_type / architectures / text_config, and refusals that name the config key."""
from __future__ import annotations

import copy

import pytest

from moetier.errors import LayoutError
from moetier.family import identify
from moetier.plugins import load_registry

DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": 7168,
    "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61, "n_routed_experts": 256,
    "n_shared_experts": 1, "num_experts_per_tok": 8, "first_k_dense_replace": 3, "moe_layer_freq": 1,
    "n_group": 8, "topk_group": 4, "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True,
    "routed_scaling_factor": 2.5, "num_nextn_predict_layers": 1, "hidden_act": "silu", "torch_dtype": "bfloat16",
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
}
DEEPSEEK_V2 = {
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "hidden_size": 5120,
    "intermediate_size": 12288, "moe_intermediate_size": 1536, "num_hidden_layers": 60, "n_routed_experts": 160,
    "n_shared_experts": 2, "num_experts_per_tok": 6, "first_k_dense_replace": 1, "moe_layer_freq": 1,
    "n_group": 8, "topk_group": 3, "topk_method": "group_limited_greedy", "scoring_func": "softmax",
    "norm_topk_prob": False, "routed_scaling_factor": 16.0, "hidden_act": "silu",
}
KIMI_K2 = dict(copy.deepcopy(DEEPSEEK_V3), model_type="kimi_k2", n_routed_experts=384, n_group=1, topk_group=1,
               first_k_dense_replace=1, routed_scaling_factor=2.827, num_nextn_predict_layers=0)
KIMI_K25 = {
    "architectures": ["KimiK25ForConditionalGeneration"], "model_type": "kimi_k25",
    "text_config": dict({k: v for k, v in KIMI_K2.items() if k != "quantization_config"}, quantization_config={
        "quant_method": "compressed-tensors", "format": "pack-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}}}}),
    "vision_config": {"hidden_size": 1152},
}
QWEN35 = {
    "architectures": ["Qwen3_5MoeForConditionalGeneration"], "model_type": "qwen3_5_moe",
    "text_config": {"model_type": "qwen3_5_moe_text", "hidden_size": 2048, "num_hidden_layers": 40,
                    "moe_intermediate_size": 512, "num_experts": 256, "num_experts_per_tok": 8,
                    "shared_expert_intermediate_size": 512, "mtp_num_hidden_layers": 1, "hidden_act": "silu"},
}
MINIMAX_M2 = {
    "architectures": ["MiniMaxM2ForCausalLM"], "model_type": "minimax_m2", "hidden_size": 3072,
    "intermediate_size": 1536, "num_hidden_layers": 62, "num_local_experts": 256, "num_experts_per_tok": 8,
    "scoring_func": "sigmoid", "use_routing_bias": True, "shared_intermediate_size": 0, "hidden_act": "silu",
    "quantization_config": {"quant_method": "fp8", "fmt": "float8_e4m3fn", "weight_block_size": [128, 128],
                            "modules_to_not_convert": ["gate", "e_score_correction_bias", "lm_head"]},
}


@pytest.fixture(scope="module")
def families():
    return load_registry().families


def test_deepseek_v3_layout(families):
    fam, version = identify(DEEPSEEK_V3, families.values())
    assert (fam.name, version) == ("deepseek", "DeepSeek-V3")
    lay = fam.layout(DEEPSEEK_V3, fam.match(DEEPSEEK_V3))
    assert lay.dense_layers == (0, 1, 2) and lay.moe_layer_indices == tuple(range(3, 61))
    assert [s.prefix for s in lay.skipped] == ["model.layers.61."]
    m = lay.layer(3)
    assert (m.experts.num_experts, m.experts.top_k, m.experts.intermediate_size) == (256, 8, 2048)
    r = m.router
    assert (r.scoring, r.selection_bias, r.n_group, r.topk_group, r.group_score) == ("sigmoid", True, 8, 4, "top2_sum")
    assert r.renormalize and r.scaling == 2.5
    assert m.shared.intermediate_size == 2048 and not m.shared.gated
    assert (lay.quantization.scheme, lay.quantization.fmt) == ("fp8_block", "fp8_e4m3")
    assert m.names.expert_module(3, 255, "down") == "model.layers.3.mlp.experts.255.down_proj"
    assert m.names.selection_bias_name(3) == "model.layers.3.mlp.gate.e_score_correction_bias"
    with pytest.raises(LayoutError, match="dense"):
        lay.layer(0)


def test_deepseek_v2_layout(families):
    fam, version = identify(DEEPSEEK_V2, families.values())
    assert version == "DeepSeek-V2"
    r = fam.layout(DEEPSEEK_V2, fam.match(DEEPSEEK_V2)).layer(1).router
    assert (r.scoring, r.group_score, r.n_group, r.topk_group, r.renormalize, r.scaling) == \
        ("softmax", "max", 8, 3, False, 16.0)
    assert fam.layout(DEEPSEEK_V2, fam.match(DEEPSEEK_V2)).layer(1).shared.intermediate_size == 2 * 1536


def test_kimi_is_claimed_by_kimi_not_deepseek(families):
    fam, version = identify(KIMI_K2, families.values())
    assert (fam.name, version) == ("kimi", "Kimi-K2")
    assert fam.layout(KIMI_K2, fam.match(KIMI_K2)).layer(1).router.scaling == 2.827
    fam, version = identify(KIMI_K25, families.values())
    assert (fam.name, version) == ("kimi", "Kimi-K2.5")
    lay = fam.layout(KIMI_K25, fam.match(KIMI_K25))
    assert (lay.quantization.scheme, lay.quantization.fmt, lay.quantization.scope) == ("int4_pack", "int4_g32", "experts")
    assert lay.layer(1).names.router_module(1) == "language_model.model.layers.1.mlp.gate"
    assert lay.layer(1).experts.num_experts == 384


def test_qwen35_text_config_prefix_fused_and_mtp(families):
    fam, version = identify(QWEN35, families.values())
    assert (fam.name, version) == ("qwen", "Qwen3.5-35B-A3B")
    lay = fam.layout(QWEN35, fam.match(QWEN35))
    m = lay.layer(0)
    assert m.names.fused_names(0) == ("model.language_model.layers.0.mlp.experts.gate_up_proj",
                                      "model.language_model.layers.0.mlp.experts.down_proj")
    assert m.router.renormalize and m.shared.gated and m.shared.intermediate_size == 512
    assert [s.prefix for s in lay.skipped] == ["mtp."] and len(lay.moe_layers) == 40


def test_qwen_sparse_step_and_mlp_only_layers(families):
    cfg = {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 64,
           "num_hidden_layers": 6, "moe_intermediate_size": 16, "intermediate_size": 32, "num_experts": 8,
           "num_experts_per_tok": 2, "decoder_sparse_step": 2, "mlp_only_layers": [3]}
    lay = families["qwen"].layout(cfg, families["qwen"].match(cfg))
    assert lay.moe_layer_indices == (1, 5) and lay.dense_layers == (0, 2, 3, 4)
    assert lay.layer(1).shared is None and not lay.layer(1).router.renormalize


def test_minimax_m2_layout(families):
    fam, version = identify(MINIMAX_M2, families.values())
    assert (fam.name, version) == ("minimax", "MiniMax-M2")
    m = fam.layout(MINIMAX_M2, fam.match(MINIMAX_M2)).layer(0)
    assert m.names.selection_bias_name(0) == "model.layers.0.block_sparse_moe.e_score_correction_bias"
    assert m.names.expert_module(0, 3, "up") == "model.layers.0.block_sparse_moe.experts.3.w3"
    assert m.router.renormalize and m.router.scaling == 1.0 and m.experts.intermediate_size == 1536


@pytest.mark.parametrize("base,change,key", [
    (DEEPSEEK_V3, {"scoring_func": "sqrtsoftplus"}, "scoring_func"),
    (DEEPSEEK_V3, {"topk_method": "hash"}, "topk_method"),
    (DEEPSEEK_V3, {"moe_layer_freq": 2}, "moe_layer_freq"),
    (DEEPSEEK_V3, {"hidden_act": "gelu"}, "hidden_act"),
    (DEEPSEEK_V3, {"quantization_config": {"quant_method": "gptq"}}, "quant_method"),
    (DEEPSEEK_V3, {"quantization_config": {"quant_method": "fp8", "weight_block_size": [64, 64]}}, "weight_block_size"),
    (DEEPSEEK_V2, {"topk_method": "noaux_tc"}, "topk_method"),
    (DEEPSEEK_V2, {"norm_topk_prob": True}, "norm_topk_prob"),
    (MINIMAX_M2, {"scoring_func": "softmax"}, "scoring_func"),
    (MINIMAX_M2, {"use_routing_bias": False}, "use_routing_bias"),
    (MINIMAX_M2, {"shared_intermediate_size": 128}, "shared_intermediate_size"),
    (DEEPSEEK_V3, {"n_routed_experts": None, "num_local_experts": None}, "n_routed_experts"),
])
def test_refusals_name_the_key(families, base, change, key):
    cfg = copy.deepcopy(base)
    cfg.update(change)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    fam, _ = identify(cfg, families.values())
    with pytest.raises(LayoutError, match=key):
        fam.layout(cfg, fam.match(cfg))


def test_unknown_config_is_refused_with_the_families(families):
    with pytest.raises(LayoutError, match="no model family claims.*llama.*deepseek"):
        identify({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, families.values())


@pytest.mark.parametrize("config", [DEEPSEEK_V3, KIMI_K25, QWEN35, MINIMAX_M2], ids=["v3", "k25", "q35", "m2"])
def test_layout_is_json_data(families, config):
    import json

    from moetier.layout import MoELayout

    fam, _ = identify(config, families.values())
    lay = fam.layout(config, fam.match(config))
    again = MoELayout.from_dict(json.loads(json.dumps(lay.to_dict())))
    assert again == lay
    with pytest.raises(LayoutError, match="not a serialized MoELayout"):
        MoELayout.from_dict({"family": "x"})
