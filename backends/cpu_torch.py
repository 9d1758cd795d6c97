"""cpu.torch: the portable reference backend in plain PyTorch, for every format.

It is moetier's reference math (`moetier.reference`) run in fp32: weights dequantized once at prepare,
then per-expert matmuls. Slow and memory-hungry by design: the fallback that runs on any CPU, and the
same code that, in float64, is the conformance oracle.
"""
from __future__ import annotations

from moetier import BackendSpec, Probe, hookimpl
from moetier.formats import FORMATS
from moetier.reference import ReferenceBackend

NAME = "cpu.torch"


class TorchBackend(ReferenceBackend):
    name = NAME
    # Its attention, norms and rotary embedding would be torch's own, which transformers' modules already
    # are: nothing to take over (the reference's float64 versions are oracles, not a way to run a model).
    attention_dtypes = ()
    norm_dtypes = ()
    rotary_dtypes = ()


@hookimpl
def moetier_register_backends(register):
    register(BackendSpec(
        name=NAME, device="cpu", formats=tuple(FORMATS), mixed_formats=True,
        probe=lambda inv: Probe(10, "portable PyTorch reference; runs on any CPU (slow: dequantizes to fp32)"),
        factory=lambda inv: TorchBackend(),
        description="PyTorch reference implementation, all formats, fp32 accumulation",
    ))
