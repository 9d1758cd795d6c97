"""cpu.avx2, cpu.avx512, cpu.amx: the native C++ kernels, one build per ISA variant."""
from __future__ import annotations

from moetier import BackendSpec, Probe, hookimpl

# backend -> (score, required features)
VARIANTS = {
    "cpu.avx2": (50, ("avx2", "fma", "f16c")),
    "cpu.avx512": (60, ("avx512f", "avx512bw", "avx512vl", "avx512dq")),
    "cpu.amx": (80, ("amx_tile", "amx_int8", "amx_bf16")),
}


def _probe(name, features):
    def probe(inv):
        if not inv.cpu.is_x86:
            return Probe(0, f"not an x86 CPU ({inv.cpu.arch})")
        missing = inv.cpu.missing(*features)
        if missing:
            return Probe(0, f"CPU lacks {', '.join(missing)}")
        return Probe(0, "native kernels not built yet", downgrade=True)
    return probe


@hookimpl
def moetier_register_backends(register):
    for name, (_, feats) in VARIANTS.items():
        register(BackendSpec(name=name, device="cpu", formats=(), probe=_probe(name, feats),
                             factory=lambda inv: None, description=f"native C++ kernels ({name[4:]})"))
