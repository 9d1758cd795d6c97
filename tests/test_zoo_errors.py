"""Bad checkpoints give typed errors that name the tensor: missing tensors, shapes that disagree with the
config, and the same through `moetier zoo show --verify`; bad `moetier zoo` arguments are refused."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from moetier.backends.cpu_torch import TorchBackend
from moetier.checkpoint import Checkpoint, write_checkpoint
from moetier.cli import main
from moetier.errors import CheckpointError
from moetier.family import load_layout
from moetier.checkpoint.experts import verify_checkpoint
from moetier.runtime.moe_block import MoEBlock

from zoo.fixtures import tiny_checkpoint  # noqa: F401  (session fixture)

pytest.importorskip("transformers")


def rewrite(src, dst, *, drop=(), config_change=None, text_config_change=None):
    """A copy of checkpoint `src` without the tensors in `drop` and with config keys changed."""
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            tensors.update({n: h.get_tensor(n) for n in h.keys() if n not in drop})
    config = json.loads((src / "config.json").read_text())
    config.update(config_change or {})
    if text_config_change:
        config["text_config"].update(text_config_change)
    write_checkpoint(dst, tensors, config=config)
    return dst


def load_layer(path, layer):
    layout = load_layout(str(path))
    with Checkpoint(str(path)) as ckpt:
        return MoEBlock.from_checkpoint(ckpt, layout, layer, TorchBackend())


def verify(path):
    layout = load_layout(str(path))
    with Checkpoint(str(path)) as ckpt:
        return verify_checkpoint(ckpt, layout)


@pytest.fixture(scope="module")
def v3(tiny_checkpoint):
    return tiny_checkpoint("deepseek", "DeepSeek-V3", "default")[0]


def test_missing_expert_tensor_is_named(v3, tmp_path):
    bad = rewrite(v3, tmp_path / "bad", drop={"model.layers.1.mlp.experts.5.up_proj.weight"})
    for fn in (verify, lambda p: load_layer(p, 1)):
        with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.experts\.5\.up_proj"):
            fn(bad)
    load_layer(bad, 2)  # the other layer is intact and still loads


def test_missing_selection_bias_is_named(v3, tmp_path):
    bad = rewrite(v3, tmp_path / "bad", drop={"model.layers.2.mlp.gate.e_score_correction_bias"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.mlp\.gate\.e_score_correction_bias"):
        load_layer(bad, 2)


def test_config_weights_mismatch_names_the_tensor(v3, tmp_path):
    wider = rewrite(v3, tmp_path / "wider", config_change={"moe_intermediate_size": 48})
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.experts\.0\.gate_proj.*\[32, 64\].*\[48, 64\]"):
        verify(wider)
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.(experts\.0\.gate_proj|shared_experts)"):
        load_layer(wider, 1)
    fewer = rewrite(v3, tmp_path / "fewer", config_change={"n_routed_experts": 16})
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.gate\.weight.*\[32, 64\]"):
        load_layer(fewer, 1)


def test_fused_experts_mismatch_names_the_tensor(tiny_checkpoint, tmp_path):
    q35 = tiny_checkpoint("qwen", "Qwen3.5-35B-A3B", "default")[0]
    bad = rewrite(q35, tmp_path / "bad", text_config_change={"moe_intermediate_size": 16})
    with pytest.raises(CheckpointError, match=r"model\.language_model\.layers\.0\.mlp\.experts\.gate_up_proj"):
        load_layer(bad, 0)


def test_zoo_show_verify_reports_the_tensor(v3, tmp_path, capsys):
    assert main(["zoo", "show", str(v3), "--verify", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["family"] == "deepseek" and out["verified_matrices"] > 0
    bad = rewrite(v3, tmp_path / "bad", drop={"model.layers.2.mlp.experts.31.down_proj.weight"})
    assert main(["zoo", "show", str(bad), "--verify"]) == 2
    assert "model.layers.2.mlp.experts.31.down_proj" in capsys.readouterr().err


def test_zoo_tiny_refuses_bad_arguments(tmp_path, capsys):
    assert main(["zoo", "tiny", "nosuchfamily", str(tmp_path / "x")]) == 2
    assert "no model family named 'nosuchfamily'" in capsys.readouterr().err
    assert main(["zoo", "tiny", "qwen", str(tmp_path / "x"), "--version", "Qwen9"]) == 2
    assert "Qwen3-30B-A3B" in capsys.readouterr().err
    assert main(["zoo", "tiny", "qwen", str(tmp_path / "x"), "--version", "Qwen3.5-35B-A3B", "--quant", "fp8"]) == 2
    assert "fused" in capsys.readouterr().err


def test_wrong_router_dtype_is_named(v3, tmp_path):
    from safetensors import safe_open as so

    name = "model.layers.1.mlp.gate.weight"
    bad = rewrite(v3, tmp_path / "bad", drop={name})
    # Put the router back as integers: a wrong dtype, not a silently cast one.
    tensors = {}
    for f in sorted(bad.glob("*.safetensors")):
        with so(str(f), "pt") as h:
            tensors.update({n: h.get_tensor(n) for n in h.keys()})
    tensors[name] = torch.ones(32, 64, dtype=torch.int32)
    write_checkpoint(bad, tensors, config=json.loads((bad / "config.json").read_text()))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.gate\.weight.*I32"):
        load_layer(bad, 1)
