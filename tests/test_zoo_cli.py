"""`moetier zoo list` and `moetier zoo tiny`: every family writes its real on-disk layout."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from moetier.cli import main

pytest.importorskip("transformers")


def tensors_of(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({n: h.get_tensor(n) for n in h.keys()})
    return out


def test_zoo_list_shows_families_and_versions(capsys):
    assert main(["zoo", "list"]) == 0
    text = capsys.readouterr().out
    for word in ("deepseek", "DeepSeek-V3.2", "kimi", "Kimi-K2.5", "glm", "GLM-4.7-Flash", "qwen", "Qwen3.5-35B-A3B",
                 "minimax", "MiniMax-Text-01"):
        assert word in text


@pytest.mark.parametrize("family,version,quant,expect", [
    ("deepseek", "DeepSeek-V3", "fp8", {
        "model.layers.1.mlp.experts.0.gate_proj.weight": ((32, 64), torch.float8_e4m3fn),
        "model.layers.1.mlp.experts.0.gate_proj.weight_scale_inv": ((1, 1), torch.float32),
        "model.layers.1.mlp.gate.e_score_correction_bias": ((32,), torch.float32),
        "model.layers.3.mlp.experts.31.down_proj.weight": ((64, 32), torch.float8_e4m3fn),  # MTP layer
        "model.layers.0.mlp.gate_proj.weight": ((96, 64), torch.float8_e4m3fn),  # dense-first layer
    }),
    ("kimi", "Kimi-K2.5", "default", {
        "language_model.model.layers.1.mlp.experts.15.up_proj.weight_packed": ((32, 8), torch.int32),
        "language_model.model.layers.1.mlp.experts.15.up_proj.weight_scale": ((32, 2), torch.bfloat16),
        "language_model.model.layers.1.mlp.experts.15.up_proj.weight_shape": ((2,), torch.int32),
        "language_model.model.layers.1.mlp.shared_experts.up_proj.weight": ((32, 64), torch.bfloat16),
        "language_model.lm_head.weight": ((128, 64), torch.bfloat16),
    }),
    ("qwen", "Qwen3.5-35B-A3B", "default", {
        "model.language_model.layers.0.mlp.experts.gate_up_proj": ((8, 64, 64), torch.bfloat16),
        "model.language_model.layers.0.mlp.experts.down_proj": ((8, 64, 32), torch.bfloat16),
        "model.language_model.layers.0.mlp.shared_expert_gate.weight": ((1, 64), torch.bfloat16),
        "mtp.layers.0.mlp.experts.7.gate_proj.weight": ((32, 64), torch.bfloat16),
    }),
    ("minimax", "MiniMax-M2", "default", {
        "model.layers.0.block_sparse_moe.experts.0.w1.weight": ((32, 64), torch.float8_e4m3fn),
        "model.layers.0.block_sparse_moe.experts.0.w2.weight_scale_inv": ((1, 1), torch.float32),
        "model.layers.0.block_sparse_moe.e_score_correction_bias": ((8,), torch.float32),
    }),
    ("glm", "GLM-4.5-Air", "none", {
        "model.layers.1.mlp.experts.7.down_proj.weight": ((64, 32), torch.bfloat16),
        "model.layers.3.eh_proj.weight": ((64, 128), torch.bfloat16),
    }),
])
def test_zoo_tiny_writes_the_real_names(tmp_path, capsys, family, version, quant, expect):
    out = tmp_path / "ckpt"
    assert main(["zoo", "tiny", family, str(out), "--version", version, "--quant", quant, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["version"] == version
    assert (out / "config.json").is_file() and (out / "model.safetensors.index.json").is_file()
    tensors = tensors_of(out)
    for name, (shape, dtype) in expect.items():
        assert name in tensors, f"{name} not written; e.g. {sorted(tensors)[:3]}"
        assert tuple(tensors[name].shape) == shape and tensors[name].dtype == dtype, name
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors) and len(set(index["weight_map"].values())) >= 2
    assert main(["zoo", "show", str(out), "--verify", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == version
