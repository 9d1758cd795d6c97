"""Hardware detection: the CPUID/XCR0 decision logic, this machine, JSON round trips, bounded probes."""
import json

import pytest

from moetier.errors import MoetierError
from moetier.hardware import HardwareInventory, detect_inventory, load_inventory
from moetier.hardware import detect as detect_mod
from moetier.hardware.detect import XCR0_AMX, XCR0_AVX, XCR0_AVX512, x86_features_from_cpuid

from conftest import INVENTORIES

OSXSAVE = 1 << 27
FMA, F16C = 1 << 12, 1 << 29
AVX2, AVX512F, AVX512DQ, AVX512BW, AVX512VL = 1 << 5, 1 << 16, 1 << 17, 1 << 30, 1 << 31
VNNI = 1 << 11
AMX_BF16, AMX_TILE, AMX_INT8 = 1 << 22, 1 << 24, 1 << 25
AVX_VNNI, AVX512_BF16 = 1 << 4, 1 << 5
SPR = {(1, 0): (0, 0, OSXSAVE | FMA | F16C, 0),
       (7, 0): (0, AVX2 | AVX512F | AVX512DQ | AVX512BW | AVX512VL, VNNI, AMX_BF16 | AMX_TILE | AMX_INT8),
       (7, 1): (AVX_VNNI | AVX512_BF16, 0, 0, 0)}
ALL_STATE = XCR0_AVX | XCR0_AVX512 | XCR0_AMX


def test_sapphire_rapids_with_os_support_has_everything():
    feats, notes = x86_features_from_cpuid(SPR, ALL_STATE, 0)
    assert set(feats) == {"avx2", "fma", "f16c", "avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512_vnni",
                          "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16"}
    assert notes == []


def test_avx512_needs_the_xcr0_zmm_state():
    feats, notes = x86_features_from_cpuid(SPR, XCR0_AVX | XCR0_AMX, 0)
    assert "avx2" in feats and not any(f.startswith("avx512") for f in feats)
    assert any("XCR0 lacks the opmask/ZMM state" in n for n in notes)


def test_amx_needs_xcr0_tile_state_and_the_permission():
    feats, notes = x86_features_from_cpuid(SPR, XCR0_AVX | XCR0_AVX512, 0)
    assert "amx_tile" not in feats and any("XTILECFG/XTILEDATA" in n for n in notes)
    feats, notes = x86_features_from_cpuid(SPR, ALL_STATE, 22)  # EINVAL from an old kernel
    assert "amx_tile" not in feats and any("arch_prctl" in n and "errno 22" in n for n in notes)


def test_no_osxsave_means_no_avx_at_all():
    regs = dict(SPR)
    regs[(1, 0)] = (0, 0, FMA | F16C, 0)
    feats, notes = x86_features_from_cpuid(regs, 0, None)
    assert feats == [] and any("XCR0" in n for n in notes)


def test_this_machine():
    inv = detect_inventory()
    assert inv.cpu.logical_cores >= 1 and inv.cpu.physical_cores >= 1
    assert inv.numa_nodes and inv.dram_total_bytes > 0
    if inv.cpu.is_x86:
        assert inv.cpu.vendor in ("GenuineIntel", "AuthenticAMD") or inv.cpu.vendor
        if not inv.cpu.has("amx_tile"):
            assert any(n.startswith("amx:") for n in inv.cpu.notes)  # the reason AMX is absent is recorded


def test_json_round_trip_and_env_override(tmp_path, monkeypatch):
    inv = detect_inventory()
    path = tmp_path / "inv.json"
    inv.save(path)
    back = load_inventory(path)
    assert back.cpu == inv.cpu and back.numa_nodes == inv.numa_nodes and back.accelerators == inv.accelerators
    monkeypatch.setenv("MOETIER_INVENTORY", str(INVENTORIES / "xeon_amx_2socket_rtx4090.json"))
    amx = load_inventory()
    assert amx.cpu.has("amx_tile") and len(amx.numa_nodes) == 2 and amx.accelerators[0].memory_bytes == 24 * 2**30
    assert amx.source == "file:xeon_amx_2socket_rtx4090.json"


@pytest.mark.parametrize("path", sorted(INVENTORIES.glob("*.json")), ids=lambda p: p.stem)
def test_recorded_inventories_load(path):
    inv = load_inventory(path)
    assert HardwareInventory.from_dict(json.loads(inv.to_json())) .cpu == inv.cpu


def test_bad_inventory_files_give_clear_errors(tmp_path):
    with pytest.raises(MoetierError, match="cannot read hardware inventory"):
        load_inventory(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(MoetierError, match="not valid JSON"):
        load_inventory(tmp_path / "bad.json")
    (tmp_path / "partial.json").write_text('{"cpu": {}}')
    with pytest.raises(MoetierError, match="malformed hardware inventory"):
        load_inventory(tmp_path / "partial.json")


def test_hanging_accelerator_probe_is_bounded(monkeypatch):
    # A driver that hangs in init must cost a bounded wait and a note, never a hung process.
    import torch

    monkeypatch.setattr(torch.version, "cuda", "12.8", raising=False)
    monkeypatch.setattr(detect_mod, "_ACCEL_SCRIPT", "import time; time.sleep(30)")
    monkeypatch.setattr(detect_mod, "ACCELERATOR_PROBE_TIMEOUT_S", 1.0)
    notes = []
    assert detect_mod._detect_accelerators(notes) == ()
    assert any("timed out" in n for n in notes)


def test_crashing_accelerator_probe_becomes_a_note(monkeypatch):
    import torch

    monkeypatch.setattr(torch.version, "cuda", "12.8", raising=False)
    monkeypatch.setattr(detect_mod, "_ACCEL_SCRIPT", "import os; os.abort()")
    notes = []
    assert detect_mod._detect_accelerators(notes) == ()
    assert any("crashed" in n for n in notes)
