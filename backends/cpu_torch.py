"""cpu.torch: the portable reference backend in plain PyTorch, for every format.

Weights are dequantized once at prepare (to fp32, or float64 in oracle mode) and computed with the
reference MoE math in `moetier.reference`, so this backend is slow and memory-hungry by design: it is
the fallback that runs anywhere and, in float64 mode, the oracle the conformance suite trusts.
"""
from __future__ import annotations

import torch

from moetier import BackendSpec, ExpertBackend, Probe, hookimpl
from moetier.formats import FORMATS
from moetier.reference import DenseExpert, moe_forward

NAME = "cpu.torch"


class TorchBackend(ExpertBackend):
    name = NAME
    formats = tuple(FORMATS)

    def __init__(self, precision: torch.dtype = torch.float32, nan_policy: str = "raise"):
        super().__init__(nan_policy=nan_policy)
        if precision not in (torch.float32, torch.float64):
            raise ValueError(f"precision must be torch.float32 or torch.float64, got {precision}")
        self.precision = precision

    def pack(self, layer, fmt, experts):
        return {e: DenseExpert.from_tensors(t, self.precision) for e, t in experts.items()}

    def compute(self, prepared, inputs):
        out = moe_forward(prepared.layer, prepared.payload, inputs.hidden, inputs.topk_ids, inputs.topk_weights,
                          self.precision)
        return out.to(inputs.out_dtype)


def oracle() -> TorchBackend:
    """The float64 reference the conformance suite compares every backend with."""
    return TorchBackend(precision=torch.float64, nan_policy="propagate")


@hookimpl
def moetier_register_backends(register):
    register(BackendSpec(
        name=NAME, device="cpu", formats=tuple(FORMATS),
        probe=lambda inv: Probe(10, "portable PyTorch reference; runs on any CPU (slow: dequantizes to fp32)"),
        factory=lambda inv: TorchBackend(),
        description="PyTorch reference implementation, all formats, fp32 accumulation",
    ))
