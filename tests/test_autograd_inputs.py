"""Inference works with autograd enabled on every CPU backend: inputs that require grad are read as data,
and the output carries no gradient."""
import pytest
import torch

from moetier.experts import ExpertLayerSpec, ExpertWeights
from moetier.hardware import load_inventory
from moetier.plugins import load_registry
from moetier.reference import oracle

REGISTRY = load_registry(no_plugins=True)
INVENTORY = load_inventory()
CPU_BACKENDS = [n for n, s in sorted(REGISTRY.backends.items())
                if s.device == "cpu" and s.safe_probe(INVENTORY).usable]


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_inputs_requiring_grad(name):
    g = torch.Generator().manual_seed(7)
    spec = ExpertLayerSpec(num_experts=4, top_k=2, hidden_size=64, intermediate_size=32)
    weights = ExpertWeights.from_float(torch.randn(4, 32, 64, generator=g), torch.randn(4, 32, 64, generator=g),
                                       torch.randn(4, 64, 32, generator=g) / 8, "fp32")
    backend = REGISTRY.backend(name).create(INVENTORY)
    prepared = backend.prepare(spec, weights, range(4), "fp32")
    hidden = torch.randn(3, 64, generator=g, requires_grad=True)
    ids = torch.tensor([[0, 1], [2, 3], [1, 2]])
    topk_weights = torch.rand(3, 2, generator=g, requires_grad=True)
    out = backend.forward(prepared, hidden, ids, topk_weights)
    assert not out.requires_grad
    ref = oracle()
    want = ref.forward(ref.prepare(spec, weights, range(4), "fp32"), hidden.detach().double().float(), ids,
                       topk_weights.detach())
    assert float((out - want).norm() / want.norm()) < 1e-4
    assert not backend.submit(prepared, hidden, ids, topk_weights).wait().requires_grad
