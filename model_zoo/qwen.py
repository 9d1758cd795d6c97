"""Qwen MoE: Qwen1.5-MoE and Qwen2-57B (`qwen2_moe`), Qwen3-MoE (`qwen3_moe`), Qwen3-Next (`qwen3_next`) and
Qwen3.5-MoE (`qwen3_5_moe`: multimodal wrapper, text under `text_config`, weights under
`model.language_model.`, experts fused on disk, MTP under `mtp.`).

Router (transformers 5.24 Qwen*TopKRouter): softmax over all experts in fp32, top-k, renormalized iff
norm_topk_prob (Qwen3.5: always). Shared expert (qwen2_moe, Qwen3-Next, Qwen3.5): one MLP of
shared_expert_intermediate_size scaled by sigmoid(x . shared_expert_gate). MoE layers: every layer not in
mlp_only_layers with (i + 1) % decoder_sparse_step == 0 (Qwen3.5: every layer).
"""
from __future__ import annotations

from collections.abc import Mapping

import moetier
from moetier.errors import LayoutError
from moetier.experts import ExpertLayerSpec
from moetier.family import ModelFamily
from moetier.hf_config import get_int, get_key, quantization_from_config, require_choice, text_config
from moetier.layout import MoELayerLayout, MoELayout, RouterSpec, SharedExpertSpec, SkippedLayer, TensorNames

from ._deepseek_like import config_dict, version_from_name
from .tiny import TinySpec, tiny_writer

NAME = "qwen"
QWEN2 = ("Qwen1.5-MoE-A2.7B", "Qwen2-57B-A14B")
QWEN3 = ("Qwen3-30B-A3B", "Qwen3-235B-A22B")
NEXT = ("Qwen3-Next-80B-A3B",)
QWEN35 = ("Qwen3.5-35B-A3B", "Qwen3.5-397B-A17B")
VERSIONS = QWEN2 + QWEN3 + NEXT + QWEN35
_ARCH = {"qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "qwen3_next": "Qwen3NextForCausalLM"}
_QWEN35_ARCHS = ("Qwen3_5MoeForConditionalGeneration", "Qwen3_5MoeForCausalLM")


def _kind(config: Mapping) -> str | None:
    archs = set(config.get("architectures") or ())
    mt = config.get("model_type")
    tc = config.get("text_config") if isinstance(config.get("text_config"), Mapping) else {}
    if mt in ("qwen3_5_moe", "qwen3_5_moe_text") or archs & set(_QWEN35_ARCHS) or tc.get("model_type") == "qwen3_5_moe_text":
        return "qwen3_5_moe"
    for kind, arch in _ARCH.items():
        if mt == kind or arch in archs:
            return kind
    return None


def match(config: Mapping) -> str | None:
    kind = _kind(config)
    if kind is None:
        return None
    group = {"qwen2_moe": QWEN2, "qwen3_moe": QWEN3, "qwen3_next": NEXT, "qwen3_5_moe": QWEN35}[kind]
    return version_from_name(config, group, group[0])


def layout(config: Mapping, version: str) -> MoELayout:
    kind = _kind(config)
    if kind is None:
        raise LayoutError(f"not a Qwen MoE config (model_type {config.get('model_type')!r}, "
                          f"architectures {config.get('architectures')!r})")
    tc = text_config(config)
    if get_key(tc, "hidden_act", default="silu") != "silu":
        raise LayoutError(f"config key 'hidden_act' = {tc['hidden_act']!r} is not implemented; only 'silu'")
    require_choice(tc, "scoring_func", ("softmax",), default="softmax")
    L, H = get_int(tc, "num_hidden_layers"), get_int(tc, "hidden_size")
    E, k = get_int(tc, "num_experts", "num_local_experts"), get_int(tc, "num_experts_per_tok")
    inter = get_int(tc, "moe_intermediate_size")
    shared_size = 0 if kind == "qwen3_moe" else get_int(tc, "shared_expert_intermediate_size", default=0)
    if kind == "qwen3_5_moe":
        renorm = True  # hardcoded in Qwen3_5MoeTopKRouter
        flags = [True] * L
        prefix = "model.language_model." if "text_config" in config else "model."
        experts_names = dict(fused_gate_up="experts.gate_up_proj", fused_down="experts.down_proj")
    else:
        renorm = bool(get_key(tc, "norm_topk_prob", default=kind == "qwen3_next"))
        step = get_int(tc, "decoder_sparse_step", default=1)
        only = set(get_key(tc, "mlp_only_layers", default=[]))
        flags = [i not in only and E > 0 and (i + 1) % step == 0 for i in range(L)]
        prefix = "model."
        experts_names = {}
    names = TensorNames(block=prefix + "layers.{layer}.mlp", router="gate",
                        shared="shared_expert.{proj}" if shared_size else None,
                        shared_gate="shared_expert_gate" if shared_size else None, **experts_names)
    spec = ExpertLayerSpec(E, k, H, inter)
    router = RouterSpec(E, k, "softmax", renormalize=renorm)
    shared = SharedExpertSpec(shared_size, gated=True) if shared_size else None
    moe = tuple(MoELayerLayout(i, spec, router, names, shared) for i in range(L) if flags[i])
    n_mtp = get_int(tc, "mtp_num_hidden_layers", default=0)
    return MoELayout(family=NAME, version=version, num_hidden_layers=L, hidden_size=H, moe_layers=moe,
                     dense_layers=tuple(i for i in range(L) if not flags[i]),
                     dense_intermediate_size=get_int(tc, "intermediate_size", default=None),
                     skipped=(SkippedLayer("mtp.", "MTP"),) if n_mtp else (),
                     quantization=quantization_from_config(config),
                     dtype=str(tc.get("torch_dtype") or tc.get("dtype") or "bfloat16"))


# ---- tiny versions ------------------------------------------------------------------------------------

_COMMON = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
               intermediate_size=96, moe_intermediate_size=32, max_position_embeddings=64, tie_word_embeddings=False)
_LINEAR = dict(head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
               linear_value_head_dim=16, layer_types=["linear_attention", "linear_attention", "full_attention"])


def _mtp(lay: MoELayout, vocab: int):
    H, m = lay.hidden_size, lay.moe_layers[-1]
    names = TensorNames(block="mtp.layers.{layer}.mlp", router="gate", shared=m.names.shared,
                        shared_gate=m.names.shared_gate)  # MTP experts are per expert even in Qwen3.5
    extras = {"mtp.fc.weight": (H, 2 * H), "mtp.pre_fc_norm_embedding.weight": (H,),
              "mtp.pre_fc_norm_hidden.weight": (H,), "mtp.norm.weight": (H,)}
    return ((names, 0, "mtp.layers.0.", extras),)


def tiny_spec(version: str) -> TinySpec:
    import transformers as tf

    if version not in VERSIONS:
        raise LayoutError(f"unknown Qwen version {version!r}; known: {', '.join(VERSIONS)}")
    if version in QWEN2:
        # Qwen1.5-MoE: 60 experts top 4 (tiny: 12, top 4); Qwen2-57B: 64 top 8 (tiny: 8, top 2). No renorm.
        E, k = (12, 4) if version == QWEN2[0] else (8, 2)
        cfg = tf.Qwen2MoeConfig(**_COMMON, num_experts=E, num_experts_per_tok=k, shared_expert_intermediate_size=48,
                                norm_topk_prob=False)
        cls, kind = tf.Qwen2MoeForCausalLM, "qwen2_moe"
    elif version in QWEN3:
        # Layer 0 in mlp_only_layers covers the dense-layer rule (the releases have none).
        cfg = tf.Qwen3MoeConfig(**_COMMON, head_dim=16, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                                mlp_only_layers=[0], decoder_sparse_step=1)
        cls, kind = tf.Qwen3MoeForCausalLM, "qwen3_moe"
    elif version in NEXT:
        cfg = tf.Qwen3NextConfig(**_COMMON, **_LINEAR, num_experts=8, num_experts_per_tok=2,
                                 shared_expert_intermediate_size=32, norm_topk_prob=True)
        cls, kind = tf.Qwen3NextForCausalLM, "qwen3_next"
    else:
        text = tf.Qwen3_5MoeTextConfig(**_COMMON, **_LINEAR, num_experts=8, num_experts_per_tok=2,
                                       shared_expert_intermediate_size=32)
        tdict = config_dict(text, version=version, mtp_num_hidden_layers=1)
        tdict.pop("_name_or_path")
        vision = tf.Qwen3_5MoeVisionConfig(depth=1, hidden_size=32, num_heads=2, intermediate_size=64,
                                           out_hidden_size=64).to_dict()
        config = {"model_type": "qwen3_5_moe", "architectures": ["Qwen3_5MoeForConditionalGeneration"],
                  "_name_or_path": f"tiny-random/{version}", "text_config": tdict, "vision_config": vision,
                  "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
        return TinySpec(version, config, lambda: tf.Qwen3_5MoeForCausalLM(text),
                        rename=(("model.", "model.language_model."),), mtp=_mtp(layout(config, version), 128),
                        notes="text tower only: the vision tower's tensors are not written",
                        extra={"hf_class": "Qwen3_5MoeForConditionalGeneration"})
    extra = {"mtp_num_hidden_layers": 1} if kind == "qwen3_next" else {}
    config = config_dict(cfg, version=version, architectures=[_ARCH[kind]], **extra)
    mtp = _mtp(layout(config, version), 128) if extra else ()
    return TinySpec(version, config, lambda: cls(cfg), mtp=mtp, extra={"hf_class": cls.__name__})


tiny = tiny_writer(tiny_spec, layout)


# ---- published dimensions (the released config.json keys moetier reads) --------------------------------
# Qwen3.5-397B-A17B: these dimensions are not verified against its config file (the model card gives
# only 512 experts, top-10, one gated shared expert, Gated DeltaNet with full attention every 4th layer);
# they reproduce its published 397B total.

def _hybrid_types(n: int) -> list[str]:
    return ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(n)]


_Q = dict(hidden_act="silu", tie_word_embeddings=False, torch_dtype="bfloat16", vocab_size=151936,
          decoder_sparse_step=1, mlp_only_layers=[])
_GDN = dict(linear_num_key_heads=16, linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4)


def _qwen35(name: str, **text) -> dict:
    return {"architectures": ["Qwen3_5MoeForConditionalGeneration"], "model_type": "qwen3_5_moe",
            "_name_or_path": name, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
            "text_config": dict(model_type="qwen3_5_moe_text", hidden_act="silu", tie_word_embeddings=False,
                                torch_dtype="bfloat16", vocab_size=248320, num_key_value_heads=2, head_dim=256,
                                **_GDN, **text),
            "vision_config": {"model_type": "qwen3_5_moe_vision"}}


PUBLISHED = {
    "Qwen1.5-MoE-A2.7B": dict(_Q, architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe",
                              _name_or_path="Qwen/Qwen1.5-MoE-A2.7B", hidden_size=2048, num_hidden_layers=24,
                              num_attention_heads=16, num_key_value_heads=16, intermediate_size=5632,
                              moe_intermediate_size=1408, shared_expert_intermediate_size=5632, num_experts=60,
                              num_experts_per_tok=4, norm_topk_prob=False),
    "Qwen2-57B-A14B": dict(_Q, architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe",
                           _name_or_path="Qwen/Qwen2-57B-A14B", hidden_size=3584, num_hidden_layers=28,
                           num_attention_heads=28, num_key_value_heads=4, intermediate_size=18944,
                           moe_intermediate_size=2560, shared_expert_intermediate_size=20480, num_experts=64,
                           num_experts_per_tok=8, norm_topk_prob=False),
    "Qwen3-30B-A3B": dict(_Q, architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe",
                          _name_or_path="Qwen/Qwen3-30B-A3B", hidden_size=2048, num_hidden_layers=48,
                          num_attention_heads=32, num_key_value_heads=4, head_dim=128, intermediate_size=6144,
                          moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True),
    "Qwen3-235B-A22B": dict(_Q, architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe",
                            _name_or_path="Qwen/Qwen3-235B-A22B", hidden_size=4096, num_hidden_layers=94,
                            num_attention_heads=64, num_key_value_heads=4, head_dim=128, intermediate_size=12288,
                            moe_intermediate_size=1536, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True),
    "Qwen3-Next-80B-A3B": dict(_Q, **_GDN, architectures=["Qwen3NextForCausalLM"], model_type="qwen3_next",
                               _name_or_path="Qwen/Qwen3-Next-80B-A3B-Instruct", hidden_size=2048,
                               num_hidden_layers=48, num_attention_heads=16, num_key_value_heads=2, head_dim=256,
                               intermediate_size=5120, moe_intermediate_size=512, shared_expert_intermediate_size=512,
                               num_experts=512, num_experts_per_tok=10, norm_topk_prob=True,
                               linear_num_value_heads=32, layer_types=_hybrid_types(48), mtp_num_hidden_layers=1),
    "Qwen3.5-35B-A3B": _qwen35("Qwen/Qwen3.5-35B-A3B", hidden_size=2048, num_hidden_layers=40,
                               num_attention_heads=16, moe_intermediate_size=512, shared_expert_intermediate_size=512,
                               num_experts=256, num_experts_per_tok=8, linear_num_value_heads=32,
                               layer_types=_hybrid_types(40), mtp_num_hidden_layers=1),
    "Qwen3.5-397B-A17B": _qwen35("Qwen/Qwen3.5-397B-A17B", hidden_size=4096, num_hidden_layers=60,
                                 num_attention_heads=32, moe_intermediate_size=1024,
                                 shared_expert_intermediate_size=1024, num_experts=512, num_experts_per_tok=10,
                                 linear_num_value_heads=64, layer_types=_hybrid_types(60), mtp_num_hidden_layers=1),
}


FAMILY = ModelFamily(name=NAME, versions=VERSIONS, match=match, layout=layout, tiny=tiny,
                     description="Qwen1.5/Qwen2 MoE, Qwen3-MoE, Qwen3-Next, Qwen3.5-MoE (fused experts, text_config)",
                     extras={"tiny_spec": tiny_spec, "published": PUBLISHED})


@moetier.hookimpl
def moetier_register_families(register):
    register(FAMILY)
