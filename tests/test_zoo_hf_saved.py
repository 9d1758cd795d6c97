"""Checkpoints written by transformers itself (`save_pretrained`, its default original per-expert format)
are read through the families' layouts and match the model that wrote them. This checks the tensor
names against transformers' own writer, independently of moetier's tiny-checkpoint writer, including a
Qwen3.5 layout (fused on disk in the releases) reading the per-expert form transformers saves."""
from __future__ import annotations

import math
import random

import pytest
import torch

from moetier.family import load_layout
from moetier.plugins import load_registry

from zoo.golden import compare_blocks, mlp_modules

pytest.importorskip("transformers")

CASES = [("deepseek", "DeepSeek-V2"), ("deepseek", "DeepSeek-V3.2"), ("glm", "GLM-4.7-Flash"),
         ("qwen", "Qwen2-57B-A14B"), ("qwen", "Qwen3.5-35B-A3B"), ("minimax", "MiniMax-M2"),
         ("minimax", "MiniMax-Text-01")]


def randomize_moe(block, gen) -> None:
    """transformers initializes routers and selection biases to constants; make every MoE tensor random."""
    with torch.no_grad():
        for name, p in block.named_parameters():
            fan_in = p.shape[-1] if p.ndim > 1 else 1
            p.copy_(torch.randn(p.shape, generator=gen) * (2.0 if name.startswith("gate.") else 1.0) / math.sqrt(fan_in))
        for name, b in block.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=gen) * 0.1)


@pytest.mark.parametrize("family,version", CASES, ids=[v for _, v in CASES])
def test_reads_what_transformers_saves(tmp_path, family, version):
    registry = load_registry()
    spec = registry.family(family).extras["tiny_spec"](version)
    gen = torch.Generator().manual_seed(random.SystemRandom().randrange(2**31))
    model = spec.build_model().eval()
    model.config._experts_implementation = "eager"
    blocks = mlp_modules(model)
    moe = {i: b for i, b in blocks.items() if hasattr(b, "experts")}
    for b in moe.values():
        randomize_moe(b, gen)
    model.save_pretrained(str(tmp_path))
    layout = load_layout(str(tmp_path), registry)
    assert set(layout.moe_layer_indices) == set(moe)
    compare_blocks(tmp_path, layout, moe, f"{version} saved by transformers")
