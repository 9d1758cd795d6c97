"""cpu.avx2, cpu.avx512, cpu.amx: the native C++ kernels, one build per ISA variant.

Probes read only the hardware inventory and whether the extension file exists; the extension itself is
imported by the factory, when the backend is chosen, and only after the loader checked the CPU.
cpu.avx512 runs the avx512_bf16 build (vdpbf16ps/vpdpbusd prefill) where the CPU has BF16 and VNNI,
the plain AVX-512 build otherwise.
"""
from __future__ import annotations

from moetier import BackendSpec, Probe, hookimpl
from moetier.errors import KernelVariantError

from .native import ENV_VARIANT, VARIANT_FEATURES, choose_variant, is_built, missing_features
from .native.backend import NATIVE_FORMATS as FORMATS

# backend -> its variants (best first) and the score of each
BACKENDS = {
    "cpu.avx2": {"avx2": 50},
    "cpu.avx512": {"avx512_bf16": 70, "avx512": 60},
    "cpu.amx": {"amx": 80},
}


def _probe(name: str):
    variants = BACKENDS[name]

    def probe(inv) -> Probe:
        if not inv.cpu.is_x86:
            return Probe(0, f"not an x86 CPU ({inv.cpu.arch})")
        base = min(variants, key=variants.get)  # the lowest variant of this backend
        missing = missing_features(base, inv)
        if missing:
            return Probe(0, f"CPU lacks {', '.join(missing)}")
        try:
            v = choose_variant(tuple(variants), inv)
        except KernelVariantError as exc:
            built = any(is_built(v) for v in variants)
            # Hardware fits but the build is missing: selecting something else is a downgrade.
            return Probe(0, str(exc), downgrade=not built)
        note = ""
        if name == "cpu.avx512" and v == "avx512":
            lacking = missing_features("avx512_bf16", inv)
            note = f"; no BF16/VNNI prefill ({'CPU lacks ' + ', '.join(lacking) if lacking else ENV_VARIANT})"
        if v == "amx":
            note = " (AMX tiles for bf16/int8/fp8/fp16 prefill, AVX-512 VNNI for int4 and decode)"
        return Probe(variants[v], f"native {v} kernels{note}")

    return probe


def _factory(name: str):
    def make(inv, threads: int | None = None, **kwargs):
        from .native.backend import NativeBackend

        variant = choose_variant(tuple(BACKENDS[name]), inv)
        return NativeBackend(name, variant, inv, threads=threads, **kwargs)

    return make


@hookimpl
def moetier_register_backends(register):
    for name, variants in BACKENDS.items():
        feats = ", ".join(VARIANT_FEATURES[min(variants, key=variants.get)])
        register(BackendSpec(name=name, device="cpu", formats=FORMATS, mixed_formats=True, probe=_probe(name),
                             factory=_factory(name), description=f"native C++ kernels, variants {', '.join(variants)} (needs {feats})"))
