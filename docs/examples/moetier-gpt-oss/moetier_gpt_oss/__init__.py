"""gpt-oss-20b / 120b as a moetier model family: the released MXFP4 checkpoints and the bf16 uploads.

transformers GptOssTopKRouter: logits = x . W^T + b; the top-k logits are chosen and softmaxed among
themselves. GptOssExperts: gate_up = x @ W_gu[e] + b_gu[e] with gate/up in the even/odd columns,
gate = min(gate, limit), up = clamp(up, -limit, limit), out = ((up + 1) * gate * sigmoid(alpha * gate))
@ W_d[e] + b_d[e]. Every layer is MoE; no shared expert.

The releases store the experts in MXFP4 (`quantization_config.quant_method: mxfp4`): `gate_up_proj_blocks`
[E, 2I, H/32, 16] and `gate_up_proj_scales` [E, 2I, H/32] (rows in [out, in] order, gate/up in the even/odd
rows), `down_proj_blocks` [E, H, I/32, 16] and `down_proj_scales`; moetier computes those bytes as its
`mxfp4` format (the native CPU kernels, cpu.numba, cpu.torch) without converting them.
"""
from __future__ import annotations

from collections.abc import Mapping

import moetier
from moetier import ExpertLayerSpec, LayoutError, ModelFamily
from moetier.hf_config import get_int, get_key, quantization_from_config
from moetier.layout import MoELayerLayout, MoELayout, RouterSpec, TensorNames

NAME = "gpt_oss"
VERSIONS = ("gpt-oss-20b", "gpt-oss-120b")


def match(config: Mapping) -> str | None:
    if config.get("model_type") != "gpt_oss" and "GptOssForCausalLM" not in (config.get("architectures") or ()):
        return None
    name = str(config.get("_name_or_path") or "").lower()
    if name.endswith("120b") or config.get("num_hidden_layers") == 36:
        return "gpt-oss-120b"
    return "gpt-oss-20b"


def layout(config: Mapping, version: str) -> MoELayout:
    L, H = get_int(config, "num_hidden_layers"), get_int(config, "hidden_size")
    E = get_int(config, "num_local_experts", "num_experts")
    k = get_int(config, "num_experts_per_tok", "experts_per_token")
    experts = ExpertLayerSpec(E, k, H, get_int(config, "intermediate_size"), activation="swiglu_oai",
                              swiglu_alpha=float(get_key(config, "swiglu_alpha", default=1.702)),
                              swiglu_limit=float(get_key(config, "swiglu_limit", default=7.0)), has_bias=True)
    router = RouterSpec(E, k, "softmax_topk", logit_bias=True)
    names = TensorNames(block="model.layers.{layer}.mlp", router="router", router_bias="router.bias",
                        fused_gate_up="experts.gate_up_proj", fused_down="experts.down_proj",
                        fused_style="interleaved_in_out", fused_gate_up_bias="experts.gate_up_proj_bias",
                        fused_down_bias="experts.down_proj_bias")
    return MoELayout(family=NAME, version=version, num_hidden_layers=L, hidden_size=H,
                     moe_layers=tuple(MoELayerLayout(i, experts, router, names) for i in range(L)),
                     quantization=quantization_from_config(config))


def tiny_spec(version: str):
    import transformers as tf
    from moetier.model_zoo.tiny import TinySpec

    if version not in VERSIONS:
        raise LayoutError(f"unknown gpt-oss version {version!r}; known: {', '.join(VERSIONS)}")
    # swiglu_limit 2.0 instead of 7.0 so that the tiny model's activations actually reach the clamp.
    cfg = tf.GptOssConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=16, vocab_size=128, intermediate_size=32,
                          num_local_experts=8, num_experts_per_tok=2, swiglu_limit=2.0, sliding_window=16,
                          tie_word_embeddings=False)
    config = cfg.to_dict()
    config.update(architectures=["GptOssForCausalLM"], torch_dtype="bfloat16", _name_or_path=f"tiny-random/{version}")
    config.pop("dtype", None)
    return TinySpec(version, config, lambda: tf.GptOssForCausalLM(cfg), extra={"hf_class": "GptOssForCausalLM"})


# The released config's quantization_config: routed experts only.
MXFP4_CONFIG = {"quant_method": "mxfp4", "modules_to_not_convert": [
    "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}


def tiny(version: str, out_dir: str, quant: str | None = "default", seed: int = 0):
    """A tiny checkpoint; quant "default" (or "mxfp4") writes the experts in MXFP4 as released, None in bf16."""
    from moetier.model_zoo.tiny import write_tiny

    if quant in ("default", "mxfp4"):
        write_tiny(tiny_spec(version), layout, out_dir, quant=None, seed=seed)
        return experts_to_mxfp4(out_dir, version)
    return write_tiny(tiny_spec(version), layout, out_dir, quant=quant, seed=seed)


def experts_to_mxfp4(ckpt_dir: str, version: str) -> MoELayout:
    """Rewrite a bf16 gpt-oss checkpoint's experts in the released MXFP4 layout (moetier's reference
    quantizer, OCP rules); returns the new layout."""
    import os

    import torch
    from moetier.checkpoint import Checkpoint, write_checkpoint
    from moetier.checkpoint.matrices import mxfp4_fused_tensors
    from moetier.formats import quantize

    with Checkpoint(ckpt_dir) as ckpt:
        config, files = ckpt.config, ckpt.files
        tensors = {n: ckpt.read(n) for n in ckpt.names()}
    for m in layout(config, version).moe_layers:
        gu, dn = m.names.fused_names(m.index)
        # on disk the bf16 upload is x @ W ([E, in, out]); the MXFP4 blocks are rows of [out, in]
        for name in (gu, dn):
            w = tensors.pop(name).to(torch.float32).transpose(1, 2)
            tensors.update(mxfp4_fused_tensors(name, [quantize(w[e], "mxfp4") for e in range(w.shape[0])]))
    for f in files:
        os.remove(f)
    config["quantization_config"] = MXFP4_CONFIG
    write_checkpoint(ckpt_dir, tensors, config=config, max_shard_bytes=sum(t.nbytes for t in tensors.values()) // 2 + 1)
    return layout(config, version)


@moetier.hookimpl
def moetier_register_families(register):
    register(ModelFamily(name=NAME, versions=VERSIONS, match=match, layout=layout, tiny=tiny,
                         description="gpt-oss-20b/120b, MXFP4 or bf16 (router bias, softmax over top-k, clamped "
                                     "SwiGLU) - example",
                         extras={"tiny_spec": tiny_spec}))
