"""gpt-oss's shipped MXFP4 experts through the out-of-tree example family: the checkpoint reader returns
each expert's on-disk bytes as the mxfp4 format (no conversion), transformers' own MXFP4 loader reads the
same file to the same weights, and every layer runs on the native kernels, cpu.numba and cpu.torch against
float64. (The
block-level golden against transformers' GptOssMLP is tests/test_zoo_plugin.py, through check_golden.)"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from moetier.checkpoint import Checkpoint  # noqa: E402
from moetier.errors import FormatError  # noqa: E402
from moetier.checkpoint.experts import CheckpointExperts, verify_checkpoint  # noqa: E402
from moetier.plugins import load_registry  # noqa: E402
from moetier.runtime.layer_check import run_checkpoint  # noqa: E402
from moetier.runtime.moe_block import MoEBlock  # noqa: E402
from zoo.backends import runnable_native  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "moetier-gpt-oss"


@pytest.fixture
def gpt_oss(install_plugin, tmp_path):
    import sys

    install_plugin("moetier-gpt-oss", {"gpt_oss": "moetier_gpt_oss"}, package_dir=EXAMPLE / "moetier_gpt_oss")
    registry = load_registry()
    out = tmp_path / "tiny"
    layout = registry.family("gpt_oss").tiny("gpt-oss-20b", str(out))
    yield registry, out, layout
    for mod in [m for m in sys.modules if m.startswith("moetier_gpt_oss")]:
        del sys.modules[mod]


def test_shipped_layout_is_read_as_mxfp4_bytes(gpt_oss):
    registry, out, layout = gpt_oss
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "mxfp4"
    assert layout.quantization.scheme == "mxfp4" and layout.quantization.fmt == "mxfp4"
    with Checkpoint(out) as ckpt:
        report = verify_checkpoint(ckpt, layout)
        assert report.matrices == 2 * len(layout.moe_layers) and not report.differs
        m = layout.moe_layers[1]
        gu, dn = m.names.fused_names(m.index)
        blocks = ckpt.read(gu + "_blocks")  # [E, 2I, H/32, 16]
        scales = ckpt.read(gu + "_scales")
        t = CheckpointExperts(ckpt, layout, m).expert(5)
        I, H = m.experts.intermediate_size, m.experts.hidden_size
        assert t.gate.fmt.name == t.up.fmt.name == t.down.fmt.name == "mxfp4"
        assert torch.equal(t.gate.data, blocks[5, 0::2].reshape(I, H // 2))  # the file's bytes, even rows
        assert torch.equal(t.up.scales, scales[5, 1::2])
        assert torch.equal(t.down.data, ckpt.read(dn + "_blocks")[5].reshape(H, I // 2))
        assert torch.equal(t.gate_bias, ckpt.read(m.names.fused_bias_names(m.index)[0])[5, 0::2].float())


def test_transformers_reads_the_same_weights(gpt_oss):
    import transformers

    registry, out, layout = gpt_oss
    model = transformers.GptOssForCausalLM.from_pretrained(
        str(out), quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.float32)
    with Checkpoint(out) as ckpt:
        for m in layout.moe_layers:
            hf = model.model.layers[m.index].mlp.experts  # gate_up [E, H, 2I] (x @ W), down [E, I, H]
            src = CheckpointExperts(ckpt, layout, m)
            for e in (0, 7):
                t = src.expert(e)
                ours = [t.gate.dequantize(), t.up.dequantize(), t.down.dequantize()]
                theirs = [hf.gate_up_proj[e][:, 0::2].T, hf.gate_up_proj[e][:, 1::2].T, hf.down_proj[e].T]
                for a, b in zip(ours, theirs):
                    want = b.detach().contiguous().numpy()
                    np.testing.assert_array_equal(a.numpy().view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("backend_name", ["native", "cpu.numba", "cpu.torch"])
def test_every_layer_runs_in_mxfp4(gpt_oss, backend_name):
    from moetier.hardware import load_inventory

    registry, out, layout = gpt_oss
    if backend_name == "cpu.numba":
        pytest.importorskip("numba")
    if backend_name == "native":
        backend = runnable_native(registry)
    else:
        backend = registry.backend(backend_name).create(load_inventory())
    results = run_checkpoint(str(out), backend, tokens=20, seed=4, registry=registry)
    assert [r.layer for r in results] == list(layout.moe_layer_indices)
    assert all(r.fmt == "mxfp4" and r.ok for r in results), results


def test_a_backend_without_mxfp4_refuses_it(gpt_oss):
    from moetier.hardware import load_inventory

    registry, out, layout = gpt_oss
    accel = registry.backend("cpu.accel").create(load_inventory())
    assert "mxfp4" not in accel.formats
    with Checkpoint(out) as ckpt:
        with pytest.raises(FormatError, match="backend cpu.accel does not compute format mxfp4"):
            MoEBlock.from_checkpoint(ckpt, layout, 0, accel, fmt="mxfp4", progress=False)
