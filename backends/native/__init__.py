"""The native C++ kernels: one compiled module per ISA variant, and the loader that picks one safely.

A variant is imported only when the hardware inventory says this CPU (and its OS) can execute every
instruction the variant was compiled for: importing a higher one would crash the process with SIGILL.
`MOETIER_CPU_VARIANT` caps the variant (so an AVX-512 machine tests the AVX2 build); naming a variant the
CPU lacks, or an unknown one, raises KernelVariantError instead of loading anything.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType

from moetier.errors import KernelVariantError, SettingError

ENV_VARIANT = "MOETIER_CPU_VARIANT"

# Lowest to highest; each variant's features include those of the variants below it.
VARIANTS = ("avx2", "avx512", "avx512_bf16", "amx")
_AVX2 = ("avx2", "fma", "f16c")
_AVX512 = _AVX2 + ("avx512f", "avx512bw", "avx512vl", "avx512dq")
_AVX512_BF16 = _AVX512 + ("avx512_vnni", "avx512_bf16")
VARIANT_FEATURES = {
    "avx2": _AVX2,
    "avx512": _AVX512,
    "avx512_bf16": _AVX512_BF16,
    "amx": _AVX512_BF16 + ("amx_tile", "amx_int8", "amx_bf16"),
}


def module_name(variant: str) -> str:
    return f"{__name__}._moe_{variant}"


def _check_known(variant: str) -> None:
    if variant not in VARIANT_FEATURES:
        raise KernelVariantError(f"unknown CPU kernel variant {variant!r}; known variants: {', '.join(VARIANTS)}")


def missing_features(variant: str, inventory) -> list[str]:
    """Features `variant` needs that this CPU (as the inventory reports it) lacks."""
    _check_known(variant)
    if not inventory.cpu.is_x86:
        return [f"x86 CPU (this is {inventory.cpu.arch})"]
    return inventory.cpu.missing(*VARIANT_FEATURES[variant])


def is_built(variant: str) -> bool:
    """Whether the extension of `variant` exists, found without importing (importing might SIGILL)."""
    _check_known(variant)
    try:
        return importlib.util.find_spec(module_name(variant)) is not None
    except (ImportError, ValueError):
        return False


def forced_variant(inventory) -> str | None:
    """The variant MOETIER_CPU_VARIANT names (any case), checked: an unknown name, or a variant this CPU
    cannot run, raises SettingError naming the valid variants or the missing features."""
    raw = os.environ.get(ENV_VARIANT, "").strip()
    if not raw:
        return None
    forced = raw.lower()
    if forced not in VARIANT_FEATURES:
        raise SettingError(f"{ENV_VARIANT}={raw} is not a kernel variant; valid: {', '.join(VARIANTS)} "
                           f"(or unset it to use the best this CPU runs)")
    missing = missing_features(forced, inventory)
    if missing:
        raise SettingError(f"{ENV_VARIANT}={raw} names a variant this CPU cannot run: it lacks "
                           f"{', '.join(missing)}; valid here: {', '.join(runnable_variants(inventory)) or 'none'}")
    return forced


def runnable_variants(inventory) -> list[str]:
    """The variants whose features this CPU has, lowest first."""
    return [v for v in VARIANTS if not missing_features(v, inventory)]


def choose_variant(candidates: tuple[str, ...], inventory) -> str:
    """The highest of `candidates` (a backend's variants) that the CPU runs, is built, and the cap allows.

    Raises KernelVariantError naming why none qualifies."""
    for v in candidates:
        _check_known(v)
    cap = forced_variant(inventory)
    reasons = []
    for v in sorted(candidates, key=VARIANTS.index, reverse=True):
        if cap is not None and VARIANTS.index(v) > VARIANTS.index(cap):
            reasons.append(f"{v}: above {ENV_VARIANT}={cap}")
            continue
        missing = missing_features(v, inventory)
        if missing:
            reasons.append(f"{v}: CPU lacks {', '.join(missing)}")
            continue
        if not is_built(v):
            reasons.append(f"{v}: extension not built (run `python setup.py build_ext --inplace`)")
            continue
        return v
    raise KernelVariantError("no usable native variant: " + "; ".join(reasons))


def load_variant(variant: str, inventory=None) -> ModuleType:
    """Import the extension of `variant` after checking that this CPU can execute it.

    The check is made against `inventory` (for the caller's selection) and against the CPU actually
    running this process: a recorded inventory of another machine must never make us load code this
    CPU cannot execute."""
    _check_known(variant)
    if inventory is None:
        from moetier.hardware import detect_inventory

        inventory = detect_inventory()
    missing = missing_features(variant, inventory)
    if missing:
        raise KernelVariantError(f"refusing to load kernel variant {variant}: this CPU lacks {', '.join(missing)}")
    from moetier.hardware.detect import host_cpu

    host = host_cpu()
    host_missing = [f"x86 CPU (this is {host.arch})"] if not host.is_x86 else host.missing(*VARIANT_FEATURES[variant])
    if host_missing:
        raise KernelVariantError(f"refusing to load kernel variant {variant}: the inventory in use allows it, but "
                                 f"the CPU running this process lacks {', '.join(host_missing)}")
    cap = forced_variant(inventory)
    if cap is not None and VARIANTS.index(variant) > VARIANTS.index(cap):
        raise KernelVariantError(f"kernel variant {variant} is above {ENV_VARIANT}={cap}")
    if not is_built(variant):
        raise KernelVariantError(f"kernel variant {variant} is not built (run `python setup.py build_ext --inplace`)")
    try:
        return importlib.import_module(module_name(variant))
    except ImportError as exc:
        raise KernelVariantError(f"kernel variant {variant} failed to import: {exc}") from exc


__all__ = ["ENV_VARIANT", "VARIANTS", "VARIANT_FEATURES", "choose_variant", "forced_variant", "is_built",
           "load_variant", "missing_features", "module_name"]
