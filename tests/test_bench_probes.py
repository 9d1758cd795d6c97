"""The bench's machine-limit probes return plausible numbers and refuse what the CPU lacks."""
import dataclasses

import pytest

from moetier.errors import KernelVariantError
from moetier.hardware import detect_inventory

inventory = detect_inventory()
pytestmark = pytest.mark.skipif(not inventory.cpu.is_x86, reason="the bench probes are x86-only")

probes = pytest.importorskip("moetier.bench.probes")

# Generous physical bounds: no core runs above 6 GHz, and no single instruction of these retires more
# than twice per cycle, so a number above them means the probe counts wrongly.
MAX_HZ = 6e9


def without(*features):
    cpu = dataclasses.replace(inventory.cpu, features=tuple(f for f in inventory.cpu.features if f not in features))
    return dataclasses.replace(inventory, cpu=cpu)


@pytest.mark.parametrize("threads", [1, 2])
def test_read_bandwidth_is_plausible(threads):
    rates = probes.read_bandwidth(inventory, threads, nbytes=64 << 20, repeats=3)
    assert len(rates) == 3
    for r in rates:
        # Above any DRAM on a small machine would be far beyond 0.2 GB/s; no memory system reads 5 TB/s.
        assert 0.2 < r < 5000, rates


def test_read_probe_every_isa_the_cpu_has():
    isas = ["sse2"] + [i for i, f in (("avx2", "avx2"), ("avx512", "avx512f")) if inventory.cpu.has(f)]
    for isa in isas:
        rates = probes._module().read_bandwidth(32 << 20, 1, 2, isa)
        assert all(0.2 < r < 5000 for r in rates), (isa, rates)


def test_read_probe_rejects_bad_arguments():
    with pytest.raises(ValueError, match="threads"):
        probes.read_bandwidth(inventory, 0)
    with pytest.raises(ValueError, match="1 MiB"):
        probes.read_bandwidth(inventory, 1, nbytes=4096)
    with pytest.raises(ValueError, match="unknown isa"):
        probes._module().read_bandwidth(1 << 20, 1, 1, "avx9000")


def test_read_isa_follows_the_inventory():
    assert probes.read_isa(without("avx512f", "avx2")) == "sse2"
    if inventory.cpu.has("avx2"):
        assert probes.read_isa(without("avx512f")) == "avx2"


def test_a_recorded_wider_cpu_never_picks_a_read_loop_this_cpu_lacks():
    # The probe measures this machine: a recorded AMX server's inventory must not select zmm loads here.
    from pathlib import Path

    from moetier.hardware import load_inventory

    server = load_inventory(Path(__file__).parent / "inventories" / "xeon_amx_2socket_rtx4090.json")
    isa = probes.read_isa(server)
    assert isa == ("avx512" if inventory.cpu.has("avx512f") else "avx2" if inventory.cpu.has("avx2") else "sse2")
    assert min(probes.read_bandwidth(server, 1, nbytes=16 << 20, repeats=1)) > 0


@pytest.mark.parametrize("kind", ["bf16", "int8"])
@pytest.mark.parametrize("threads", [1, 2])
def test_dot_peaks_are_plausible(kind, threads):
    feature = "avx512_bf16" if kind == "bf16" else "avx512_vnni"
    if not inventory.cpu.has("avx512f", feature):
        pytest.skip(f"CPU lacks {feature}")
    fn = probes.bf16_peak if kind == "bf16" else probes.int8_peak
    ops_per_instr = 64 if kind == "bf16" else 128
    rate = fn(inventory, threads, seconds=0.05)
    assert 1e9 < rate < threads * MAX_HZ * 2 * ops_per_instr


def test_peaks_refuse_a_cpu_without_the_instruction():
    # The inventory is what selection trusts: a CPU it says lacks the feature never runs the loop.
    with pytest.raises(KernelVariantError, match="avx512_bf16"):
        probes.bf16_peak(without("avx512_bf16"), 1, 0.01)
    with pytest.raises(KernelVariantError, match="avx512_vnni"):
        probes.int8_peak(without("avx512_vnni"), 1, 0.01)


def test_measure_limits_records_missing_peaks_as_notes():
    limits = probes.measure_limits(without("avx512_bf16", "avx512_vnni"), (1,), quick=True)
    assert limits.bf16_gflop_per_s == {1: None} and limits.int8_gop_per_s == {1: None}
    assert limits.read_gb_per_s[1] > 0.2
    assert any("bf16" in n for n in limits.notes) and any("int8" in n for n in limits.notes)
    assert limits.to_dict()["read_gb_per_s"] == {"1": limits.read_gb_per_s[1]}


def test_best_of_keeps_the_higher_limit():
    a = probes.MachineLimits({1: 10.0, 2: 18.0}, {1: 11.0, 2: 19.0}, {1: 200.0, 2: None}, {1: None, 2: None},
                             1 << 30, "avx512", ("x",))
    b = probes.MachineLimits({1: 12.0, 2: 15.0}, {1: 12.5, 2: 16.0}, {1: 150.0, 2: 300.0}, {1: None, 2: None},
                             1 << 30, "avx512", ("x", "y"))
    m = a.best_of(b)
    assert m.read_gb_per_s == {1: 12.0, 2: 18.0} and m.read_gb_per_s_best == {1: 12.5, 2: 19.0}
    assert m.bf16_gflop_per_s == {1: 200.0, 2: 300.0} and m.int8_gop_per_s == {1: None, 2: None}
    assert m.notes == ("x", "y")
