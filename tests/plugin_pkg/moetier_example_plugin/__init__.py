"""A third-party moetier plugin: a backend ("example.scalar", a deliberately simple per-token loop) and
a model family ("example-moe"), registered only through the `moetier` entry-point group."""
from __future__ import annotations

import torch

import moetier
from moetier import BackendSpec, ExpertBackend, ModelFamily, Probe
from moetier.reference import DenseExpert, expert_mlp


class ScalarBackend(ExpertBackend):
    """Computes token by token in fp32: an independent (if slow) implementation of the contract."""

    name = "example.scalar"
    formats = ("fp32", "bf16", "int8")

    def pack(self, layer, fmt, experts):
        return {e: DenseExpert.from_tensors(t, torch.float32) for e, t in experts.items()}

    def compute(self, prepared, inputs):
        out = torch.zeros(inputs.hidden.shape, dtype=torch.float32)
        x = inputs.hidden.float()
        for t in range(x.shape[0]):
            for j in range(inputs.topk_ids.shape[1]):
                e = int(inputs.topk_ids[t, j])
                if e in prepared.payload:
                    y = expert_mlp(prepared.layer, prepared.payload[e], x[t:t + 1])[0]
                    out[t] += inputs.topk_weights[t, j] * y
        return out.to(inputs.out_dtype)


def _match(config: dict) -> str | None:
    return "Example-MoE" if config.get("model_type") == "example_moe" else None


def _layout(config: dict, version: str):
    return {"experts": config["num_experts"]}


@moetier.hookimpl
def moetier_register_backends(register):
    register(BackendSpec(name="example.scalar", device="cpu", formats=ScalarBackend.formats,
                         probe=lambda inv: Probe(1, "example plugin: always runs, slowly"),
                         factory=lambda inv: ScalarBackend()))


@moetier.hookimpl
def moetier_register_families(register):
    register(ModelFamily(name="example-moe", versions=("Example-MoE",), match=_match, layout=_layout))
