"""How each ISA variant of the native kernels is compiled: read by setup.py, and by the tests that build
the amx kernels over a software tile unit. Explicit feature flags, never -march=native, so a wheel runs
on every CPU that has the variant's features."""

from pathlib import Path

# ISA variant -> compiler flags. Each becomes the module moetier.backends.native._moe_<variant>.
_AVX2 = ["-mavx2", "-mfma", "-mf16c"]
_AVX512 = _AVX2 + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
_AVX512_BF16 = _AVX512 + ["-mavx512vnni", "-mavx512bf16"]
KERNEL_VARIANTS = {
    "avx2": _AVX2,
    "avx512": _AVX512,
    "avx512_bf16": _AVX512_BF16,
    "amx": _AVX512_BF16 + ["-mamx-tile", "-mamx-int8", "-mamx-bf16"],
}

KERNEL_SOURCES = ["kernels/moe_module.cpp"]
# Headers of the kernel tree, every one: a change to any of them rebuilds every variant (a hand-kept list
# missed new headers, and their changes did not rebuild).
KERNEL_HEADERS = sorted(f"kernels/{p.name}" for p in Path(__file__).resolve().parent.glob("*.h"))
# -fno-wrapv undoes the -fwrapv of Python's own compile flags: with defined signed overflow the compiler
# keeps int index arithmetic unwidened, which cost the decode attention kernel 30% (measured; the expert
# kernels were unchanged within noise).
COMPILE_ARGS = ["-O3", "-fno-math-errno", "-fno-wrapv", "-pthread"]
LINK_ARGS = ["-pthread"]


def define_macros(variant: str) -> list[tuple[str, str]]:
    return [("MOETIER_VARIANT", f'"{variant}"'), ("MOETIER_VARIANT_" + variant.upper(), "1")]
