"""Writing tiny random checkpoints in a family's real on-disk layout (for tests, demos and benchmarks).

A family describes one version with a `TinySpec`: the config.json to write and how to build the
transformers model whose non-MoE tensors (attention, norms, embeddings) give the checkpoint its real
names and shapes. Every MoE block is then written from the family's own `MoELayout` (per expert or
fused, router, selection bias, shared expert, FP8 or INT4), with fresh random values scaled so that
routing is decisive and outputs are well conditioned. MTP layers are added where the real model has
them, and the tensors are split over shards of about half the bytes each (two or three files) with a
`model.safetensors.index.json`.

Public API for out-of-tree families: `TinySpec`, `write_tiny`, `fp8_quantization_config`,
`int4_quantization_config`.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from moetier.errors import LayoutError
from moetier.checkpoint import matrix_tensors, write_checkpoint
from moetier.formats import QuantizedTensor, get_format, pack_int4, quantize
from moetier.layout import MoELayerLayout, MoELayout, TensorNames

QUANTS = (None, "fp8", "int4")


def fp8_quantization_config(**extra) -> dict:
    """The quantization_config of DeepSeek-V3 / Kimi-K2 / MiniMax-M2 FP8 releases."""
    return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
            "weight_block_size": [128, 128], **extra}


def int4_quantization_config(group_size: int = 32) -> dict:
    """compressed-tensors pack-quantized W4A16 for routed experts (Kimi-K2-Thinking / K2.5)."""
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None,
                                          "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                                                      "strategy": "group", "group_size": group_size,
                                                      "dynamic": False, "observer": "minmax"}}},
            "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"]}


@dataclass(frozen=True)
class TinySpec:
    """One tiny version of a family.

    config: the config.json to write (quantization_config is added by write_tiny). build_model(): the
    transformers model with the text tower, random; its state dict names its tensors. layers_prefix:
    where that model keeps its decoder layers ("model.layers"). rename: (in-memory prefix, on-disk
    prefix) pairs applied to non-MoE tensor names. default_quant: the quantization the version ships
    with when the caller asks for the default. mtp: extra MTP blocks, as (TensorNames, layer number
    for the template, prefix of the non-MoE part to copy the last decoder layer to, extra 1-D/2-D tensors).
    """

    version: str
    config: dict
    build_model: Callable[[], torch.nn.Module]
    layers_prefix: str = "model.layers"
    rename: tuple[tuple[str, str], ...] = ()
    mtp: tuple[tuple[TensorNames, int, str, dict], ...] = ()
    float_dtype: torch.dtype = torch.bfloat16
    quant_targets: tuple[str, ...] = ("_proj.weight", ".w1.weight", ".w2.weight", ".w3.weight")
    default_quant: str | None = None
    notes: str = ""  # what the tiny checkpoint leaves out (e.g. a vision tower)
    extra: dict = field(default_factory=dict)


def write_tiny(spec: TinySpec, layout_fn: Callable[[dict, str], MoELayout], out_dir: str, *, quant: str | None = "default",
               seed: int = 0, shards: int = 2) -> MoELayout:
    """Write spec's checkpoint to out_dir (config.json + safetensors shards + index); return its layout.
    quant: "fp8", "int4", None (unquantized) or "default" (what the version ships: spec.default_quant)."""
    if quant == "default":
        quant = spec.default_quant
    if quant not in QUANTS:
        raise LayoutError(f"--quant must be fp8 or int4, got {quant!r}")
    config = copy.deepcopy(spec.config)
    target = config["text_config"] if "text_config" in config and quant == "int4" else config
    if quant == "fp8":
        config["quantization_config"] = fp8_quantization_config()
    elif quant == "int4":
        target["quantization_config"] = int4_quantization_config(32)
    layout = layout_fn(config, spec.version)
    gen = torch.Generator().manual_seed(seed)

    torch.manual_seed(seed)
    model = spec.build_model()
    moe_prefixes = tuple(f"{spec.layers_prefix}.{m.index}.mlp." for m in layout.moe_layers)
    tensors: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if name.startswith(moe_prefixes):
            continue  # MoE blocks are written from the layout below
        disk = _rename(name, spec.rename)
        _put(tensors, disk, t, spec, quant)
    for m in layout.moe_layers:
        _write_moe_block(tensors, m.names, m.index, m, layout, quant, spec.float_dtype, gen)
    for names, number, copy_prefix, extras in spec.mtp:
        last = layout.num_hidden_layers - 1
        src = _rename(f"{spec.layers_prefix}.{last}.", spec.rename)
        for name in list(tensors):
            if name.startswith(src) and ".mlp." not in name[len(src) - 1:]:
                tensors[copy_prefix + name[len(src):]] = tensors[name].clone()
        _write_moe_block(tensors, names, number, layout.moe_layers[-1], layout, quant, spec.float_dtype, gen)
        for name, shape in extras.items():
            tensors[name] = (torch.randn(shape, generator=gen) * 0.02).to(spec.float_dtype)

    total = sum(t.numel() * t.element_size() for t in tensors.values())
    write_checkpoint(out_dir, tensors, config=config, max_shard_bytes=None if shards <= 1 else -(-total // shards))
    return layout



def tiny_writer(tiny_spec: Callable[[str], TinySpec], layout_fn: Callable[[dict, str], MoELayout]) -> Callable[..., MoELayout]:
    """A family's `ModelFamily.tiny`: write_tiny over the family's per-version TinySpec and layout."""
    def tiny(version: str, out_dir: str, quant: str | None = "default", seed: int = 0) -> MoELayout:
        return write_tiny(tiny_spec(version), layout_fn, out_dir, quant=quant, seed=seed)
    return tiny


def _rename(name: str, rename) -> str:
    for src, dst in rename:
        if name.startswith(src):
            return dst + name[len(src):]
    return name


def _put(tensors, name, t, spec, quant) -> None:
    t = t.detach().clone().contiguous()
    if t.is_floating_point():
        t = t.to(spec.float_dtype)
    if quant == "fp8" and t.ndim == 2 and name.endswith(spec.quant_targets) and "embed" not in name:
        _put_fp8(tensors, name[: -len(".weight")], t.float())
        return
    tensors[name] = t


def _put_fp8(tensors, module: str, w: torch.Tensor) -> None:
    tensors.update(matrix_tensors(module, quantize(w.float(), "fp8_e4m3")))


def _put_int4(tensors, module: str, w: torch.Tensor, fmt: str) -> None:
    """compressed-tensors pack-quantized with bf16 scales, as Kimi ships them."""
    q = quantize(w.float(), fmt)
    # Round the scales to bf16 first and requantize with them, so that codes and stored scales agree.
    scale = q.scales.to(torch.bfloat16).float()
    g = get_format(fmt).group_size
    codes = torch.clamp(torch.round(w.float() / scale.repeat_interleave(g, dim=1)[:, :q.shape[1]]), -8, 7)
    q = QuantizedTensor(q.fmt, q.shape, pack_int4(codes.to(torch.int8)), scale)
    tensors.update(matrix_tensors(module, q, scale_dtype=torch.bfloat16))


def _randn(shape, std, gen) -> torch.Tensor:
    return torch.randn(shape, generator=gen) * std


def _write_moe_block(tensors, names: TensorNames, layer: int, m: MoELayerLayout, layout: MoELayout, quant,
                     float_dtype, gen) -> None:
    E, H, I = m.experts.num_experts, m.experts.hidden_size, m.experts.intermediate_size
    q = layout.quantization
    # Router logits of O(1) spread make selections decisive (no near-ties between experts).
    tensors[names.router_module(layer) + ".weight"] = _randn((E, H), 2.0 / math.sqrt(H), gen).to(float_dtype)
    if m.router.selection_bias:
        tensors[names.selection_bias_name(layer)] = _randn((E,), 0.1, gen).float()
    if m.router.logit_bias:
        tensors[names.router_bias_name(layer)] = _randn((E,), 0.5, gen).to(float_dtype)

    def linear(module, w, routed):
        if q.scheme == "fp8_block" and (routed or q.scope == "all"):
            _put_fp8(tensors, module, w)
        elif q.scheme == "int4_pack" and routed:
            _put_int4(tensors, module, w, q.fmt)
        else:
            tensors[module + ".weight"] = w.to(float_dtype)

    gates = _randn((E, I, H), 1 / math.sqrt(H), gen)
    ups = _randn((E, I, H), 1 / math.sqrt(H), gen)
    downs = _randn((E, H, I), 1 / math.sqrt(I), gen)
    if names.fused:
        if q.scheme != "none":
            raise LayoutError("tiny checkpoints write fused experts only unquantized")
        gu, dn = names.fused_names(layer)
        if names.fused_style == "interleaved_in_out":  # gpt-oss: x @ W, gate/up in even/odd columns
            gate_up = torch.empty(E, H, 2 * I)
            gate_up[:, :, 0::2], gate_up[:, :, 1::2] = gates.transpose(1, 2), ups.transpose(1, 2)
            tensors[gu] = gate_up.to(float_dtype)
            tensors[dn] = downs.transpose(1, 2).contiguous().to(float_dtype)
        else:
            tensors[gu] = torch.cat([gates, ups], dim=1).to(float_dtype)
            tensors[dn] = downs.to(float_dtype)
        if m.experts.has_bias:
            gub, dnb = names.fused_bias_names(layer)
            tensors[gub] = _randn((E, 2 * I), 0.5, gen).to(float_dtype)
            tensors[dnb] = _randn((E, H), 0.5, gen).to(float_dtype)
    else:
        for e in range(E):
            linear(names.expert_module(layer, e, "gate"), gates[e], True)
            linear(names.expert_module(layer, e, "up"), ups[e], True)
            linear(names.expert_module(layer, e, "down"), downs[e], True)
    if m.shared is not None:
        S = m.shared.intermediate_size
        linear(names.shared_module(layer, "gate"), _randn((S, H), 1 / math.sqrt(H), gen), False)
        linear(names.shared_module(layer, "up"), _randn((S, H), 1 / math.sqrt(H), gen), False)
        linear(names.shared_module(layer, "down"), _randn((H, S), 1 / math.sqrt(S), gen), False)
        if m.shared.gated:
            tensors[names.shared_gate_module(layer) + ".weight"] = _randn((1, H), 1 / math.sqrt(H), gen).to(float_dtype)
