"""Backend selection on every recorded inventory: the choice per device kind and each loser's reason."""
import importlib.util

import pytest

from moetier.errors import BackendUnavailable, SelectionError
from moetier.hardware import load_inventory
from moetier.plugins import load_registry
from moetier.selection import select_backends

from conftest import INVENTORIES

HAS_NUMBA = importlib.util.find_spec("numba") is not None
PORTABLE = "cpu.numba" if HAS_NUMBA else "cpu.torch"


@pytest.fixture(scope="module")
def registry():
    return load_registry(no_plugins=True)


def select(registry, name, **kw):
    return select_backends(registry, load_inventory(INVENTORIES / name), force=kw.pop("force", []), **kw)


def reason(sel, name):
    return sel.verdict(name).probe.reason


def test_zen4_avx512_machine(registry):
    sel = select(registry, "zen4_avx512_2core.json")
    assert sel.chosen == {"cpu": "cpu.avx512"}
    assert "amx_tile" in reason(sel, "cpu.amx")
    assert "no CUDA device" in reason(sel, "cuda") and "no ROCm device" in reason(sel, "rocm")
    assert sel.verdict("cpu.avx512").probe.score > sel.verdict("cpu.avx2").probe.score > sel.verdict("cpu.torch").probe.score


def test_dual_socket_amx_server_with_a_gpu(registry):
    sel = select(registry, "xeon_amx_2socket_rtx4090.json")
    assert sel.for_device("cpu") == "cpu.amx"
    assert sel.for_device("cuda") is None  # the GPU is there, this CPU-only torch cannot drive it
    assert "RTX 4090" in reason(sel, "cuda") and "CPU-only build" in reason(sel, "cuda")
    with pytest.raises(SelectionError, match="--strict: cuda would be downgraded"):
        select(registry, "xeon_amx_2socket_rtx4090.json", strict=True)


def test_avx2_only_desktop(registry):
    sel = select(registry, "desktop_avx2_only.json")
    assert sel.chosen == {"cpu": "cpu.avx2"}
    assert "avx512f" in reason(sel, "cpu.avx512") and "amx_tile" in reason(sel, "cpu.amx")


def test_arm_server_gets_the_portable_backend(registry):
    sel = select(registry, "arm_graviton3.json")
    assert sel.chosen == {"cpu": PORTABLE}
    for name in ("cpu.avx2", "cpu.avx512", "cpu.amx"):
        assert "not an x86 CPU" in reason(sel, name)


def test_rocm_box(registry):
    sel = select(registry, "epyc_rocm_mi300x.json")
    assert sel.chosen == {"cpu": "cpu.avx512"}
    assert "MI300X" in reason(sel, "rocm") and sel.verdict("rocm").probe.downgrade
    assert "no CUDA device" in reason(sel, "cuda")


def test_ascend_box(registry):
    sel = select(registry, "kunpeng_ascend_910b.json")
    assert sel.chosen == {"cpu": PORTABLE}
    assert "8x Ascend910B" in reason(sel, "ascend")


def test_forcing_a_backend(registry, monkeypatch):
    sel = select(registry, "zen4_avx512_2core.json", force=["cpu.torch"])
    assert sel.chosen == {"cpu": "cpu.torch"} and sel.verdict("cpu.torch").forced
    with pytest.raises(BackendUnavailable, match="'cpu.amx' was requested but cannot run here: CPU lacks amx_tile"):
        select(registry, "zen4_avx512_2core.json", force=["cpu.amx"])
    with pytest.raises(BackendUnavailable, match="'cpu.nope' was requested but is not registered"):
        select(registry, "zen4_avx512_2core.json", force=["cpu.nope"])
    monkeypatch.setenv("MOETIER_BACKEND", "cpu.avx2")
    sel = select_backends(registry, load_inventory(INVENTORIES / "zen4_avx512_2core.json"))
    assert sel.chosen == {"cpu": "cpu.avx2"}


def test_a_crashing_probe_is_a_verdict_not_a_crash(registry):
    from dataclasses import replace

    from moetier.plugins import Registry

    broken = replace(registry.backends["cpu.torch"], name="cpu.broken", probe=lambda inv: 1 / 0)
    reg = Registry(backends={**registry.backends, "cpu.broken": broken})
    sel = select_backends(reg, load_inventory(INVENTORIES / "zen4_avx512_2core.json"), force=[])
    assert "probe failed: ZeroDivisionError" in reason(sel, "cpu.broken") and not sel.verdict("cpu.broken").chosen
