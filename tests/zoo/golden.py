"""Golden comparison of moetier's MoE layer against transformers' own MoE block on a tiny checkpoint.

Two ways to get the transformers block:
- `hf_blocks_pretrained`: `from_pretrained` on the checkpoint directory (unquantized checkpoints), which
  also proves that transformers reads our on-disk names as the real checkpoints' names;
- `hf_blocks_dequantized`: the model built from the checkpoint's config, each MoE block filled from the
  raw safetensors through an independent dequantization written here (FP8 blocks, compressed-tensors
  INT4), for the quantized checkpoints transformers cannot load on a CPU.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

LAYER_MLP = re.compile(r"(?:^|.*\.)layers\.(\d+)\.mlp$")


def _hf_kwargs():
    return dict(dtype=torch.float32, experts_implementation="eager", attn_implementation="eager")


def mlp_modules(model) -> dict[int, torch.nn.Module]:
    out = {}
    for name, module in model.named_modules():
        m = LAYER_MLP.match(name)
        if m and not name.startswith("mtp") and ".visual." not in name:
            out[int(m.group(1))] = module
    return out


def hf_blocks_pretrained(ckpt_dir, hf_class: str, **extra):
    """(mlp modules by layer index, loading info) of transformers' model loaded from the checkpoint."""
    import transformers

    cls = getattr(transformers, hf_class)
    kwargs = {}
    raw = json.loads((Path(ckpt_dir) / "config.json").read_text())
    if "text_config" not in raw and raw.get("model_type") != cls.config_class.model_type:
        # Kimi-K2's `kimi_k2` is unknown to transformers 5.24: with it, the per-expert -> fused weight
        # conversion (keyed on model_type) does not run and the experts stay random. Load it as deepseek_v3.
        cfg = cls.config_class.from_pretrained(str(ckpt_dir))
        cfg.model_type = cls.config_class.model_type
        kwargs["config"] = cfg
    model, info = cls.from_pretrained(str(ckpt_dir), output_loading_info=True, **kwargs, **extra, **_hf_kwargs())
    model.eval()
    return mlp_modules(model), info


def hf_blocks_dequantized(ckpt_dir, hf_class: str, layout):
    """mlp modules of transformers' model built from the checkpoint's config, MoE blocks filled from the
    raw tensors with `independent_dequantize` (the rest of the model stays random: it is not compared)."""
    import transformers

    raw = json.loads((Path(ckpt_dir) / "config.json").read_text())
    if "text_config" in raw:
        cfg = transformers.AutoConfig.from_pretrained(str(ckpt_dir)).text_config
    else:
        cfg = getattr(transformers, hf_class).config_class.from_pretrained(str(ckpt_dir))
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model_cls = transformers.AutoModelForCausalLM._model_mapping[type(cfg)] if "text_config" in raw \
        else getattr(transformers, hf_class)
    model = model_cls._from_config(cfg, **_hf_kwargs()).eval()
    blocks = mlp_modules(model)
    raw_tensors = RawTensors(ckpt_dir)
    for layer in layout.moe_layers:
        fill_block(blocks[layer.index], layer, raw_tensors)
    return blocks


class RawTensors:
    """Reads tensors straight from the safetensors files (no moetier code)."""

    def __init__(self, ckpt_dir):
        ckpt_dir = Path(ckpt_dir)
        index = ckpt_dir / "model.safetensors.index.json"
        if index.exists():
            wm = json.loads(index.read_text())["weight_map"]
            self.where = {n: ckpt_dir / f for n, f in wm.items()}
        else:
            self.where = {}
            for f in ckpt_dir.glob("*.safetensors"):
                with safe_open(str(f), "pt") as h:
                    self.where.update({n: f for n in h.keys()})

    def __contains__(self, name):
        return name in self.where

    def get(self, name) -> torch.Tensor:
        with safe_open(str(self.where[name]), "pt") as h:
            return h.get_tensor(name)

    def matrix(self, base: str) -> torch.Tensor:
        return independent_dequantize(self, base)


def independent_dequantize(raw: RawTensors, base: str) -> torch.Tensor:
    """fp32 [out, in] from the checkpoint's own convention, written from the format definitions:
    FP8: w * scale_inv per 128x128 block (partial last blocks keep the 128 stride);
    compressed-tensors INT4: nibble c of a row at bits 4*(c % 8) of int32 word c // 8, value (nibble - 8) * scale."""
    if base + ".weight_packed" in raw:
        packed = raw.get(base + ".weight_packed").numpy().astype(np.int64) & 0xFFFFFFFF
        scale = raw.get(base + ".weight_scale").float().numpy().astype(np.float64)
        out_f, in_f = (int(x) for x in raw.get(base + ".weight_shape"))
        group = in_f // scale.shape[1] if in_f % scale.shape[1] == 0 else math.ceil(in_f / scale.shape[1])
        w = np.empty((out_f, in_f))
        for c in range(in_f):
            nib = (packed[:, c // 8] >> (4 * (c % 8))) & 0xF
            w[:, c] = (nib - 8) * scale[:, c // group]
        return torch.from_numpy(w).float()
    w = raw.get(base + ".weight")
    if base + ".weight_scale_inv" in raw:
        s = raw.get(base + ".weight_scale_inv").double()
        out = w.double().clone()
        for bi in range(s.shape[0]):
            for bj in range(s.shape[1]):
                out[bi * 128:(bi + 1) * 128, bj * 128:(bj + 1) * 128] *= s[bi, bj]
        return out.float()
    return w.float()


def fill_block(block, layer, raw: RawTensors) -> None:
    """Copy one MoE layer's tensors into transformers' in-memory block (fused experts [E, 2I, H] / [E, H, I])."""
    names, i = layer.names, layer.index
    prefix = names.block_prefix(i)

    def set_param(rel: str, value: torch.Tensor):
        obj = block
        *path, leaf = rel.split(".")
        for p in path:
            obj = getattr(obj, p)
        target = getattr(obj, leaf)
        assert tuple(target.shape) == tuple(value.shape), (rel, target.shape, value.shape)
        with torch.no_grad():
            target.copy_(value.to(target.dtype))

    set_param(names.router + ".weight", raw.get(names.router_module(i) + ".weight").float())
    if names.selection_bias:
        set_param(names.selection_bias, raw.get(names.selection_bias_name(i)).float())
    E = layer.experts.num_experts
    if names.fused:
        gu, dn = names.fused_names(i)
        set_param("experts.gate_up_proj", raw.get(gu).float())
        set_param("experts.down_proj", raw.get(dn).float())
    else:
        gate_up = torch.stack([torch.cat([raw.matrix(names.expert_module(i, e, "gate")),
                                          raw.matrix(names.expert_module(i, e, "up"))]) for e in range(E)])
        down = torch.stack([raw.matrix(names.expert_module(i, e, "down")) for e in range(E)])
        set_param("experts.gate_up_proj", gate_up)
        set_param("experts.down_proj", down)
    if layer.shared is not None:
        for which in ("gate", "up", "down"):
            full = names.shared_module(i, which)
            set_param(full[len(prefix):] + ".weight", raw.matrix(full))
        if layer.shared.gated:
            g = names.shared_gate_module(i)
            set_param(g[len(prefix):] + ".weight", raw.get(g + ".weight").float())


def hf_route(block, hidden: torch.Tensor):
    """(ids, weights) from transformers' router of `block` on hidden [T, H]."""
    gate = getattr(block, "gate", None) or getattr(block, "router")
    if hasattr(block, "e_score_correction_bias") and not hasattr(gate, "e_score_correction_bias"):
        out = gate(hidden, block.e_score_correction_bias)  # MiniMax-M2 keeps the bias on the block
    else:
        out = gate(hidden)
    _, weights, ids = out
    return ids, weights


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def aligned(ids: torch.Tensor, weights: torch.Tensor):
    """ids sorted per token and the weights in the same order (top-k order is not part of the contract)."""
    s, order = ids.sort(dim=-1)
    return s, weights.gather(1, order)


TOL = 1e-5
TOKENS = 48


def check_golden(registry, family: str, version: str, quant, ckpt_dir, layout) -> None:
    """The whole golden comparison of one tiny checkpoint (see tests/test_zoo_golden.py)."""
    from moetier.family import identify, load_layout

    fam = registry.family(family)
    config = json.loads((Path(ckpt_dir) / "config.json").read_text())
    claimed_by, claimed_version = identify(config, registry.families.values())
    assert claimed_by is fam
    assert claimed_version == version or (version == "Kimi-K2-Thinking" and quant is None)
    assert load_layout(str(ckpt_dir), registry) == layout
    hf_class = fam.extras["tiny_spec"](version).extra["hf_class"]

    if layout.quantization.scheme in ("none", "mxfp4"):
        extra = {}
        if layout.quantization.scheme == "mxfp4":  # gpt-oss as released: transformers' own MXFP4 dequantization
            import transformers
            extra["quantization_config"] = transformers.Mxfp4Config(dequantize=True)
        blocks, info = hf_blocks_pretrained(ckpt_dir, hf_class, **extra)
        missing = sorted(k for k in info["missing_keys"] if ".mlp." in k and "visual" not in k)
        assert not missing, f"transformers did not find these tensors where the layout puts them: {missing[:5]}"
        assert all(layout.is_skipped(k) for k in info["unexpected_keys"]), \
            f"tensors transformers does not know, outside the skipped layers: {sorted(info['unexpected_keys'])[:5]}"
    else:
        blocks = hf_blocks_dequantized(ckpt_dir, hf_class, layout)
    # Dense-first / mlp_only layers: the layout's MoE layers are exactly transformers' MoE blocks.
    assert {i for i, b in blocks.items() if hasattr(b, "experts")} == set(layout.moe_layer_indices)

    compare_blocks(ckpt_dir, layout, blocks, f"{version} ({quant})")


def compare_blocks(ckpt_dir, layout, blocks, label: str) -> None:
    """moetier's MoE layers read from ckpt_dir against transformers' blocks (by layer index)."""
    import random

    from moetier.backends.cpu_torch import TorchBackend
    from moetier.checkpoint import Checkpoint
    from moetier.checkpoint.experts import verify_checkpoint
    from moetier.runtime.moe_block import MoEBlock

    seed = random.SystemRandom().randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    backend = TorchBackend()
    with Checkpoint(str(ckpt_dir)) as ckpt:
        report = verify_checkpoint(ckpt, layout)
        assert report.matrices > 0 and not report.differs, report
        for s in layout.skipped:  # MTP weights are in the checkpoint, and no MoE layer reads them
            assert ckpt.names(prefix=s.prefix), f"expected tensors under {s.prefix}"
        for layer in layout.moe_layers:
            block = MoEBlock.from_checkpoint(ckpt, layout, layer.index, backend)
            assert block.prepared.fmt.name == layout.quantization.fmt
            hf_block = blocks[layer.index]
            x = torch.randn(TOKENS, layout.hidden_size, generator=gen)
            where = f"{label} layer {layer.index}, seed {seed}"
            with torch.no_grad():
                ids, weights = block.route(x)
                hf_ids, hf_weights = hf_route(hf_block, x)
                a_ids, a_w = aligned(ids, weights)
                h_ids, h_w = aligned(hf_ids, hf_weights.float())
                assert torch.equal(a_ids, h_ids), f"{where}: router ids differ"
                assert rel_err(a_w, h_w) <= TOL, f"{where}: router weights differ by {rel_err(a_w, h_w):.2e}"
                out = block(x)
                ref = hf_block(x[None])
                ref = (ref[0] if isinstance(ref, tuple) else ref)[0]  # gpt-oss returns (out, scores)
                assert rel_err(out, ref) <= TOL, f"{where}: block output differs by {rel_err(out, ref):.2e}"
                check_router_features_matter(layer, block, x, ids, where)


def check_router_features_matter(layer, block, x, ids, where) -> None:
    """Group limits and the selection bias must change some choices, or the test would not cover them."""
    import dataclasses

    from moetier.runtime.routing import route

    spec = layer.router
    if spec.n_group > 1:
        flat = dataclasses.replace(spec, n_group=1, topk_group=1)
        free_ids, _ = route(flat, x, block.router.weight, block.router.selection_bias)
        assert not torch.equal(free_ids.sort(-1).values, ids.sort(-1).values), f"{where}: groups changed nothing"
    if spec.selection_bias:
        plain = dataclasses.replace(spec, selection_bias=False)
        plain_ids, _ = route(plain, x, block.router.weight)
        assert not torch.equal(plain_ids.sort(-1).values, ids.sort(-1).values), f"{where}: bias changed nothing"
