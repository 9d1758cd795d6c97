"""The published dimensions of every zoo version, and the non-expert parts sized from a config against the
same parts summed from a real checkpoint's safetensors headers."""
from __future__ import annotations

import pytest

from moetier.checkpoint import Checkpoint
from moetier.family import identify, read_config
from moetier.placement.model_parts import parts_from_checkpoint, parts_from_config, total_params
from moetier.placement.models import published_configs, resolve_model
from moetier.plugins import load_registry

from zoo.fixtures import tiny_checkpoint  # noqa: F401  (session fixture)

# Published totals in billions (model cards; MTP layers and vision towers excluded where the card says so).
# GLM-4.5/4.6/4.7's 355B and Kimi-K2's 1.04T include layers moetier does not run (the MTP layer; Kimi:
# rounding on the card), hence the 2% margin.
TOTALS = {
    "DeepSeek-V2": 236, "DeepSeek-V2-Lite": 15.7, "DeepSeek-V3": 671, "DeepSeek-R1": 671, "DeepSeek-V3.1": 671,
    "DeepSeek-V3.2": 671, "Kimi-K2": 1040, "Kimi-K2-Thinking": 1040, "Kimi-K2.5": 1040, "GLM-4.5": 355,
    "GLM-4.6": 355, "GLM-4.7": 355, "GLM-4.5-Air": 106, "GLM-4.7-Flash": 30, "GLM-5": 744,
    "Qwen1.5-MoE-A2.7B": 14.3, "Qwen2-57B-A14B": 57, "Qwen3-30B-A3B": 30.5, "Qwen3-235B-A22B": 235,
    "Qwen3-Next-80B-A3B": 80, "Qwen3.5-35B-A3B": 35, "Qwen3.5-397B-A17B": 397, "MiniMax-M2": 230,
    "MiniMax-M2.1": 230, "MiniMax-M2.5": 230, "MiniMax-Text-01": 456,
}


@pytest.fixture(scope="module")
def registry():
    return load_registry()


def test_every_zoo_version_has_published_dimensions_that_match_its_totals(registry):
    known = published_configs(registry)
    builtin = {v for f in ("deepseek", "kimi", "glm", "qwen", "minimax") for v in registry.family(f).versions}
    assert builtin <= set(known) and set(TOTALS) == builtin
    for version, config in known.items():
        family, claimed = identify(config, registry.families.values())
        assert claimed == version  # the family claims its own published config as that version
        info = resolve_model(version, registry)
        total = total_params(info.parts) / 1e9
        assert total == pytest.approx(TOTALS[version], rel=0.02), version


def test_version_names_are_matched_case_insensitively_and_unknown_ones_listed(registry):
    assert resolve_model("deepseek-v3", registry).layout.version == "DeepSeek-V3"
    with pytest.raises(Exception, match="not a checkpoint folder, a config.json or a known model version; "
                                        "versions with published dimensions: DeepSeek-R1"):
        resolve_model("DeepSeek-V9", registry)


# Unquantized (or experts-only quantized) tiny checkpoints: the config formula must give the bytes the
# headers hold, part by part. Quantized attention is left out: the tiny writer keeps matrices smaller
# than one 128x128 block in bf16, which real checkpoints never have.
CASES = [("deepseek", "DeepSeek-V2-Lite", "default"), ("deepseek", "DeepSeek-V3", None), ("glm", "GLM-4.5", "default"),
         ("glm", "GLM-5", "default"), ("qwen", "Qwen1.5-MoE-A2.7B", "default"), ("qwen", "Qwen3-30B-A3B", "default"),
         ("qwen", "Qwen3-Next-80B-A3B", "default"), ("qwen", "Qwen3.5-35B-A3B", "default"),
         ("kimi", "Kimi-K2.5", "default"), ("minimax", "MiniMax-M2", None)]


@pytest.mark.parametrize("family,version,quant", CASES, ids=[c[1] for c in CASES])
def test_parts_from_config_equal_the_checkpoint_headers(tiny_checkpoint, family, version, quant):  # noqa: F811
    pytest.importorskip("transformers")
    path, layout = tiny_checkpoint(family, version, quant)
    config = read_config(path)
    computed = parts_from_config(config, layout)
    with Checkpoint(path) as ckpt:
        read = parts_from_checkpoint(ckpt, config, layout)
    assert read.source == "checkpoint headers"
    assert dict(computed.part_bytes) == dict(read.part_bytes)
    assert all(read.part_bytes[p] > 0 for p in ("embeddings", "attention", "routers"))
