"""Golden tests: every family and version against transformers' own MoE block (fp32, eager experts).

For each tiny checkpoint (written in the family's real on-disk layout) moetier reads the layer through
its layout and the checkpoint reader, routes with its one fp32 router and computes the experts on the
cpu.torch backend plus the shared expert; transformers' block comes from `from_pretrained` (unquantized)
or from an independent dequantization of the raw tensors (FP8 / INT4). Ids must be identical and
weights and outputs agree to 1e-5 relative (fp32; the two sides differ only in summation order, ~1e-7).
"""
from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch

from moetier.backends.cpu_torch import TorchBackend
from moetier.checkpoint import Checkpoint
from moetier.family import identify, load_layout
from moetier.moe_block import MoEBlock, verify_checkpoint
from moetier.plugins import load_registry
from moetier.routing import route

from zoo.fixtures import tiny_checkpoint  # noqa: F401  (session fixture)
from zoo.golden import aligned, hf_blocks_dequantized, hf_blocks_pretrained, hf_route, rel_err

pytest.importorskip("transformers")

TOL = 1e-5
TOKENS = 48

VERSIONS = {
    "deepseek": ("DeepSeek-V2", "DeepSeek-V2-Lite", "DeepSeek-V3", "DeepSeek-R1", "DeepSeek-V3.1", "DeepSeek-V3.2"),
    "kimi": ("Kimi-K2", "Kimi-K2-Thinking", "Kimi-K2.5"),
    "glm": ("GLM-4.5", "GLM-4.6", "GLM-4.7", "GLM-4.5-Air", "GLM-4.7-Flash", "GLM-5"),
    "qwen": ("Qwen1.5-MoE-A2.7B", "Qwen2-57B-A14B", "Qwen3-30B-A3B", "Qwen3-235B-A22B", "Qwen3-Next-80B-A3B",
             "Qwen3.5-35B-A3B", "Qwen3.5-397B-A17B"),
    "minimax": ("MiniMax-M2", "MiniMax-M2.1", "MiniMax-M2.5", "MiniMax-Text-01"),
}
# Every version as shipped (Kimi-K2-Thinking/K2.5 INT4, MiniMax-M2.x FP8, the rest unquantized), plus
# the other variants real releases exist in.
CASES = [(f, v, "default") for f, vs in VERSIONS.items() for v in vs] + [
    ("deepseek", "DeepSeek-V3", "fp8"), ("kimi", "Kimi-K2", "fp8"), ("glm", "GLM-4.7", "fp8"),
    ("qwen", "Qwen3-30B-A3B", "fp8"), ("minimax", "MiniMax-M2", None), ("deepseek", "DeepSeek-V3", "int4"),
]


@pytest.fixture(scope="module")
def registry():
    return load_registry()


def test_every_claimed_version_is_tested(registry):
    for name, versions in VERSIONS.items():
        assert registry.family(name).versions == versions


@pytest.mark.parametrize("family,version,quant", CASES, ids=[f"{v}-{q}" for _, v, q in CASES])
def test_golden_against_transformers(registry, tiny_checkpoint, family, version, quant):
    fam = registry.family(family)
    ckpt_dir, layout = tiny_checkpoint(family, version, quant)
    config = json.loads((ckpt_dir / "config.json").read_text())
    claimed_by, claimed_version = identify(config, registry.families.values())
    assert claimed_by is fam
    assert claimed_version == version or (version == "Kimi-K2-Thinking" and quant is None)
    assert load_layout(str(ckpt_dir), registry) == layout
    hf_class = fam.extras["tiny_spec"](version).extra["hf_class"]

    if layout.quantization.scheme == "none":
        blocks, info = hf_blocks_pretrained(ckpt_dir, hf_class)
        missing = sorted(k for k in info["missing_keys"] if ".mlp." in k and "visual" not in k)
        assert not missing, f"transformers did not find these tensors where the layout puts them: {missing[:5]}"
        assert all(layout.is_skipped(k) for k in info["unexpected_keys"]), \
            f"tensors transformers does not know, outside the skipped layers: {sorted(info['unexpected_keys'])[:5]}"
    else:
        blocks = hf_blocks_dequantized(ckpt_dir, hf_class, layout)
    # Dense-first / mlp_only layers: the layout's MoE layers are exactly transformers' MoE blocks.
    assert {i for i, b in blocks.items() if hasattr(b, "experts")} == set(layout.moe_layer_indices)

    seed = random.SystemRandom().randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    backend = TorchBackend()
    with Checkpoint(str(ckpt_dir)) as ckpt:
        assert verify_checkpoint(ckpt, layout) > 0
        for s in layout.skipped:  # MTP weights are in the checkpoint, and no MoE layer reads them
            assert ckpt.names(prefix=s.prefix), f"expected tensors under {s.prefix}"
        for layer in layout.moe_layers:
            block = MoEBlock.from_checkpoint(ckpt, layout, layer.index, backend)
            assert block.prepared.fmt.name == layout.quantization.fmt
            hf_block = blocks[layer.index]
            x = torch.randn(TOKENS, layout.hidden_size, generator=gen)
            with torch.no_grad():
                ids, weights = block.route(x)
                hf_ids, hf_weights = hf_route(hf_block, x)
                a_ids, a_w = aligned(ids, weights)
                h_ids, h_w = aligned(hf_ids, hf_weights.float())
                where = f"{version} ({quant}) layer {layer.index}, seed {seed}"
                assert torch.equal(a_ids, h_ids), f"{where}: router ids differ"
                assert rel_err(a_w, h_w) <= TOL, f"{where}: router weights differ by {rel_err(a_w, h_w):.2e}"
                out = block(x)
                ref = hf_block(x[None])[0]
                assert rel_err(out, ref) <= TOL, f"{where}: block output differs by {rel_err(out, ref):.2e}"
                _check_router_features_matter(layer, block, x, ids, where)


def _check_router_features_matter(layer, block, x, ids, where):
    """Group limits and the selection bias must change some choices, or the test would not cover them."""
    spec = layer.router
    if spec.n_group > 1:
        flat = dataclasses.replace(spec, n_group=1, topk_group=1)
        free_ids, _ = route(flat, x, block.router_weight, block.selection_bias)
        assert not torch.equal(free_ids.sort(-1).values, ids.sort(-1).values), f"{where}: groups changed nothing"
    if spec.selection_bias:
        plain = dataclasses.replace(spec, selection_bias=False)
        plain_ids, _ = route(plain, x, block.router_weight)
        assert not torch.equal(plain_ids.sort(-1).values, ids.sort(-1).values), f"{where}: bias changed nothing"
