"""The variant guard and the backend probes: never import a variant the CPU cannot execute."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

from moetier.backends import cpu_native
from moetier.backends.native import (VARIANTS, choose_variant, forced_variant, load_variant, missing_features,
                                     module_name)
from moetier.errors import KernelVariantError, SettingError
from moetier.hardware import load_inventory
from moetier.plugins import load_registry
from moetier.selection import select_backends

from test_native_common import INVENTORY, RUNNABLE, make_backend, needs_native

INVENTORIES = Path(__file__).parent / "inventories"


def recorded(name: str):
    return load_inventory(INVENTORIES / name)


def without(inv, *features):
    cpu = dataclasses.replace(inv.cpu, features=tuple(f for f in inv.cpu.features if f not in features))
    return dataclasses.replace(inv, cpu=cpu)


def probe(name, inv):
    return cpu_native._probe(name)(inv)


def test_variant_features_are_cumulative():
    for lower, higher in zip(VARIANTS, VARIANTS[1:]):
        assert set(cpu_native.VARIANT_FEATURES[lower]) < set(cpu_native.VARIANT_FEATURES[higher])


def test_a_variant_the_cpu_lacks_is_refused_without_importing(monkeypatch):
    monkeypatch.delenv("MOETIER_CPU_VARIANT", raising=False)
    avx2_only = recorded("desktop_avx2_only.json")
    before = set(sys.modules)
    for v in ("avx512", "avx512_bf16", "amx"):
        with pytest.raises(KernelVariantError, match="lacks"):
            load_variant(v, avx2_only)
        assert module_name(v) not in set(sys.modules) - before
    with pytest.raises(KernelVariantError, match="x86"):
        load_variant("avx2", recorded("arm_graviton3.json"))


def test_forcing_amx_on_a_cpu_without_amx_raises(monkeypatch):
    """A setting that cannot be honoured is an error everywhere, the probe included: never a quiet
    fallback to another backend. A recorded AVX-512 CPU without AMX, so that every backend's probe reaches
    the forced setting whatever CPU runs the test."""
    inv = recorded("zen4_avx512_2core.json")
    monkeypatch.setenv("MOETIER_CPU_VARIANT", "amx")
    with pytest.raises(SettingError, match="cannot run: it lacks amx_tile"):
        forced_variant(inv)
    with pytest.raises(SettingError):
        choose_variant(("avx512_bf16", "avx512"), inv)
    with pytest.raises(SettingError):
        cpu_native._factory("cpu.avx512")(inv)
    spec = load_registry(no_plugins=True).backend("cpu.avx512")
    with pytest.raises(SettingError, match="MOETIER_CPU_VARIANT=amx"):
        spec.safe_probe(inv)


def test_forcing_an_unknown_variant_raises(monkeypatch):
    monkeypatch.setenv("MOETIER_CPU_VARIANT", "avx1024")
    with pytest.raises(SettingError, match="MOETIER_CPU_VARIANT=avx1024 is not a kernel variant; valid: avx2"):
        forced_variant(INVENTORY)
    with pytest.raises(KernelVariantError, match="unknown"):
        load_variant("sse2", INVENTORY)


def test_variant_names_are_case_insensitive(monkeypatch):
    monkeypatch.setenv("MOETIER_CPU_VARIANT", "AVX2")
    assert forced_variant(INVENTORY) == "avx2"


def test_probes_on_recorded_machines(monkeypatch):
    monkeypatch.delenv("MOETIER_CPU_VARIANT", raising=False)
    monkeypatch.setattr(cpu_native, "is_built", lambda v: True)
    monkeypatch.setattr("moetier.backends.native.is_built", lambda v: True)
    zen4 = recorded("zen4_avx512_2core.json")
    assert probe("cpu.avx512", zen4).score == 70
    assert probe("cpu.avx2", zen4).score == 50
    amx = probe("cpu.amx", zen4)
    assert amx.score == 0 and "CPU lacks amx_tile" in amx.reason
    xeon = recorded("xeon_amx_2socket_rtx4090.json")
    assert probe("cpu.amx", xeon).score == 80
    assert probe("cpu.avx512", without(zen4, "avx512_bf16")).score == 60
    avx2 = recorded("desktop_avx2_only.json")
    assert probe("cpu.avx2", avx2).score == 50
    assert "CPU lacks avx512f" in probe("cpu.avx512", avx2).reason
    assert "not an x86 CPU" in probe("cpu.avx2", recorded("arm_graviton3.json")).reason


def test_probe_says_when_the_extension_is_not_built(monkeypatch):
    monkeypatch.delenv("MOETIER_CPU_VARIANT", raising=False)
    monkeypatch.setattr(cpu_native, "is_built", lambda v: False)
    monkeypatch.setattr("moetier.backends.native.is_built", lambda v: False)
    p = probe("cpu.avx512", recorded("zen4_avx512_2core.json"))
    assert p.score == 0 and "not built" in p.reason and p.downgrade


def test_env_caps_the_variant_and_selection_follows(monkeypatch):
    monkeypatch.setattr("moetier.backends.native.is_built", lambda v: True)
    monkeypatch.setattr(cpu_native, "is_built", lambda v: True)
    zen4 = recorded("zen4_avx512_2core.json")
    monkeypatch.setenv("MOETIER_CPU_VARIANT", "avx2")
    assert probe("cpu.avx512", zen4).score == 0
    assert probe("cpu.avx2", zen4).score == 50
    monkeypatch.setenv("MOETIER_CPU_VARIANT", "avx512")
    assert probe("cpu.avx512", zen4).score == 60


@needs_native
def test_selection_picks_the_best_native_backend_here(monkeypatch):
    monkeypatch.delenv("MOETIER_CPU_VARIANT", raising=False)
    monkeypatch.delenv("MOETIER_BACKEND", raising=False)
    chosen = select_backends(load_registry(), INVENTORY).for_device("cpu")
    best = RUNNABLE[-1]
    want = {"avx2": "cpu.avx2", "avx512": "cpu.avx512", "avx512_bf16": "cpu.avx512", "amx": "cpu.amx"}[best]
    assert chosen == want


@needs_native
@pytest.mark.parametrize("variant", RUNNABLE)
def test_each_runnable_variant_loads_and_reports_itself(variant, monkeypatch):
    be = make_backend(variant, monkeypatch, threads=1)
    assert be._ext.VARIANT == variant
    assert be._ext.HAS_DOT_KERNELS == (variant in ("avx512_bf16", "amx"))
    assert not missing_features(variant, INVENTORY)


def test_a_recorded_inventory_never_loads_a_variant_this_cpu_lacks():
    # Selection may be shown for a recorded AMX server, but loading its kernels here must be refused
    # (with a typed error) unless this very CPU has AMX: otherwise the first tile instruction is a SIGILL.
    from moetier.errors import KernelVariantError
    from moetier.hardware import load_inventory
    from moetier.hardware.detect import detect_cpu
    from moetier.backends.native import load_variant

    amx_server = load_inventory(INVENTORIES / "xeon_amx_2socket_rtx4090.json")
    if detect_cpu([]).has("amx_tile", "amx_int8", "amx_bf16"):
        pytest.skip("this CPU has AMX")
    with pytest.raises(KernelVariantError, match="the CPU running this process lacks (.*, )?amx_tile"):
        load_variant("amx", amx_server)
