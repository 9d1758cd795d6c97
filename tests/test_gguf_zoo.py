"""A GGUF file is the model its config.json describes: tiny checkpoints of each family (written in their
real safetensors layout by `moetier zoo tiny`) are turned into GGUF files the way llama.cpp's converter
writes them; the layout moetier derives from the GGUF metadata must equal the family's layout from
config.json, and every MoE layer read from the GGUF file must compute what the same layer read from the
safetensors checkpoint computes."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("gguf")
pytest.importorskip("transformers")

from moetier.checkpoint import Checkpoint  # noqa: E402
from moetier.checkpoint.gguf import GGUFFile  # noqa: E402
from moetier.runtime.gguf_model import gguf_block  # noqa: E402
from moetier.runtime.moe_block import MoEBlock  # noqa: E402
from moetier.reference import oracle  # noqa: E402
from zoo.fixtures import tiny_checkpoint  # noqa: E402, F401  (session fixture)
from zoo.gguf_files import from_hf  # noqa: E402

# Unquantized checkpoints (the versions that ship FP8 asked for as bf16): the same session-cached tiny
# checkpoints the golden tests build.
CASES = [("qwen", "Qwen3-30B-A3B", "default"), ("qwen", "Qwen1.5-MoE-A2.7B", "default"),
         ("deepseek", "DeepSeek-V3", None), ("deepseek", "DeepSeek-V2", "default"),
         ("deepseek", "DeepSeek-V2-Lite", "default"), ("kimi", "Kimi-K2", None), ("glm", "GLM-4.5-Air", "default"),
         ("minimax", "MiniMax-M2", None)]


@pytest.mark.parametrize("family,version,quant", CASES)
def test_gguf_layout_and_layers_equal_the_safetensors_ones(tmp_path, tiny_checkpoint, family, version, quant):
    ckpt_dir, layout = tiny_checkpoint(family, version, quant)
    assert layout.quantization.scheme == "none"
    path = from_hf(ckpt_dir, layout, tmp_path / "model.gguf")
    with GGUFFile(path) as gf:
        got = gf.layout()
        assert (got.family, got.version) == (layout.family, layout.version)
        assert (got.num_hidden_layers, got.hidden_size, got.dense_layers) == \
            (layout.num_hidden_layers, layout.hidden_size, layout.dense_layers)
        assert got.moe_layer_indices == layout.moe_layer_indices
        for a, b in zip(got.moe_layers, layout.moe_layers):
            assert (a.experts, a.router, a.shared) == (b.experts, b.router, b.shared)
        ref = oracle()
        g = torch.Generator().manual_seed(3)
        with Checkpoint(ckpt_dir) as ckpt:
            for m in layout.moe_layers:
                from_gguf = gguf_block(gf, got, m.index, ref)  # F32 experts: the bf16 values exactly
                from_st = MoEBlock.from_checkpoint(ckpt, layout, m.index, ref, fmt="bf16", progress=False)
                hidden = torch.randn(11, layout.hidden_size, generator=g)
                a, b = from_gguf(hidden).double(), from_st(hidden).double()
                assert float((a - b).norm() / b.norm()) < 1e-12, f"layer {m.index}"
