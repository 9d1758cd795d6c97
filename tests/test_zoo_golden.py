"""Golden tests: every family and version against transformers' own MoE block (fp32, eager experts).

For each tiny checkpoint (written in the family's real on-disk layout) moetier reads the layer through
its layout and the checkpoint reader, routes with its one fp32 router and computes the experts on the
cpu.torch backend plus the shared expert; transformers' block comes from `from_pretrained` (unquantized)
or from an independent dequantization of the raw tensors (FP8 / INT4). Ids must be identical and
weights and outputs agree to 1e-5 relative (fp32; the two sides differ only in summation order, ~1e-7).
"""
from __future__ import annotations

import pytest

from moetier.plugins import load_registry

from zoo.fixtures import tiny_checkpoint  # noqa: F401  (session fixture)
from zoo.golden import check_golden

pytest.importorskip("transformers")

VERSIONS = {
    "deepseek": ("DeepSeek-V2", "DeepSeek-V2-Lite", "DeepSeek-V3", "DeepSeek-R1", "DeepSeek-V3.1", "DeepSeek-V3.2"),
    "kimi": ("Kimi-K2", "Kimi-K2-Thinking", "Kimi-K2.5"),
    "glm": ("GLM-4.5", "GLM-4.6", "GLM-4.7", "GLM-4.5-Air", "GLM-4.7-Flash", "GLM-5"),
    "qwen": ("Qwen1.5-MoE-A2.7B", "Qwen2-57B-A14B", "Qwen3-30B-A3B", "Qwen3-235B-A22B", "Qwen3-Next-80B-A3B",
             "Qwen3.5-35B-A3B", "Qwen3.5-397B-A17B"),
    "minimax": ("MiniMax-M2", "MiniMax-M2.1", "MiniMax-M2.5", "MiniMax-Text-01"),
}
# Every version as shipped (DeepSeek-V3 family, Kimi-K2 and MiniMax-M2.x FP8; Kimi-K2-Thinking/K2.5 INT4;
# the rest unquantized), plus the other forms real releases exist in. Unquantized checkpoints are also
# loaded by transformers' from_pretrained, which checks the on-disk names against transformers' own.
CASES = [(f, v, "default") for f, vs in VERSIONS.items() for v in vs] + [
    ("deepseek", "DeepSeek-V3", None), ("deepseek", "DeepSeek-V3.2", None), ("kimi", "Kimi-K2", None),
    ("minimax", "MiniMax-M2", None), ("glm", "GLM-4.7", "fp8"), ("qwen", "Qwen3-30B-A3B", "fp8"),
    ("deepseek", "DeepSeek-V3", "int4"),
]


@pytest.fixture(scope="module")
def registry():
    return load_registry()


def test_every_claimed_version_is_tested(registry):
    for name, versions in VERSIONS.items():
        assert registry.family(name).versions == versions


@pytest.mark.parametrize("family,version,quant", CASES, ids=[f"{v}-{q}" for _, v, q in CASES])
def test_golden_against_transformers(registry, tiny_checkpoint, family, version, quant):
    ckpt_dir, layout = tiny_checkpoint(family, version, quant)
    check_golden(registry, family, version, quant, ckpt_dir, layout)


def test_fp8_partial_last_blocks(registry, tmp_path):
    """Expert width 160 = one full 128-block plus a partial one (the case transformers' CPU FP8 path
    gets wrong): moetier reading the FP8 checkpoint natively still matches the independent dequantization."""
    import dataclasses

    from moetier.model_zoo.tiny import write_tiny

    fam = registry.family("deepseek")
    spec = fam.extras["tiny_spec"]("DeepSeek-V3")
    spec = dataclasses.replace(spec, config=dict(spec.config, moe_intermediate_size=160))
    layout = write_tiny(spec, fam.layout, str(tmp_path), quant="fp8", seed=7)
    assert layout.moe_layers[0].experts.intermediate_size == 160
    check_golden(registry, "deepseek", "DeepSeek-V3", "fp8", tmp_path, layout)
