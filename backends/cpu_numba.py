"""cpu.numba: a portable backend written with numba."""
from __future__ import annotations

from moetier import BackendSpec, Probe, hookimpl


@hookimpl
def moetier_register_backends(register):
    register(BackendSpec(name="cpu.numba", device="cpu", formats=(),
                         probe=lambda inv: Probe(0, "numba backend not built yet"),
                         factory=lambda inv: None, description="portable numba kernels"))
