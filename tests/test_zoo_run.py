"""`moetier zoo run`: whole tiny checkpoints, layer by layer, on the chosen backend vs float64."""
import pytest
import torch

from moetier.hardware import load_inventory
from moetier.plugins import load_registry
from moetier.selection import select_backends
from moetier.runtime.layer_check import run_checkpoint

from cli_helpers import moetier

pytest.importorskip("transformers")

CASES = [("qwen", "Qwen3-30B-A3B"), ("deepseek", "DeepSeek-V3"), ("kimi", "Kimi-K2.5")]


@pytest.fixture(scope="module")
def chosen():
    reg, inv = load_registry(no_plugins=True), load_inventory()
    name = select_backends(reg, inv, force=[]).for_device("cpu")
    return reg.backend(name).create(inv)


@pytest.mark.parametrize("family,version", CASES)
def test_every_moe_layer_matches_float64(tmp_path, chosen, family, version):
    fam = load_registry(no_plugins=True).family(family)
    layout = fam.tiny(version, str(tmp_path), quant="default", seed=3)
    results = run_checkpoint(str(tmp_path), chosen, tokens=24, seed=5)
    assert [r.layer for r in results] == [m.index for m in layout.moe_layers]
    assert all(r.ok for r in results), results
    assert results[0].fmt == layout.quantization.fmt or results[0].fmt == "bf16"


def test_cli_fails_when_a_layer_is_wrong(tmp_path):
    fam = load_registry(no_plugins=True).family("qwen")
    fam.tiny("Qwen3-30B-A3B", str(tmp_path), quant="default", seed=1)
    ok = moetier("zoo", "run", tmp_path, "--backend", "cpu.torch")
    assert ok.returncode == 0 and "match the float64 reference" in ok.stdout, ok.stdout + ok.stderr
    # A backend that computes wrongly must be caught, layer by layer:
    from moetier.reference import ReferenceBackend, moe_forward

    class HalfWeights(ReferenceBackend):
        name = "test.half"

        def compute(self, prepared, inputs):
            return moe_forward(prepared.layer, prepared.payload, inputs.hidden, inputs.topk_ids,
                               inputs.topk_weights * 0.5, torch.float32).to(inputs.out_dtype)

    results = run_checkpoint(str(tmp_path), HalfWeights(), tokens=8)
    assert results and not any(r.ok for r in results)
