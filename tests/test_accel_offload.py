"""The n* rule: when a prefill should stream CPU experts to the accelerator (moetier.offload)."""
import pytest

from moetier.errors import ShapeError
from moetier.experts import ExpertLayerSpec
from moetier.offload import bytes_per_param, decide_stream, n_star

DSV3 = ExpertLayerSpec(256, 8, 7168, 2048)


def test_n_star_matches_the_table_of_the_latency_notes():
    # bpp * F / (2 P): a ~3 TFLOPS AVX-512 socket on PCIe 4 (25 GB/s) gives 120 / 60 / 32 tokens.
    assert n_star(2.0, 3e12, 25e9) == pytest.approx(120)
    assert n_star(1.0, 3e12, 25e9) == pytest.approx(60)
    assert n_star(0.53, 3e12, 25e9) == pytest.approx(31.8)
    # PCIe 5 halves it.
    assert n_star(2.0, 3e12, 50e9) == pytest.approx(60)


def test_bytes_per_param_counts_the_scales():
    assert bytes_per_param(DSV3, "bf16") == 2.0
    assert bytes_per_param(DSV3, "fp8_e4m3") == pytest.approx(1 + 4 / 128**2)  # one fp32 scale per 128x128 block
    assert bytes_per_param(DSV3, "int4_g32") == pytest.approx(0.5 + 4 / 32)


@pytest.mark.parametrize("fmt", ["bf16", "fp8_e4m3", "int4_g128"])
def test_the_decision_flips_at_n_star(fmt):
    F, P = 3e12, 25e9
    ns = n_star(bytes_per_param(DSV3, fmt), F, P)
    below = decide_stream(DSV3, fmt, [int(ns * 0.9)] * 40 + [0] * 216, cpu_flops=F, link_bytes_per_s=P)
    above = decide_stream(DSV3, fmt, [int(ns * 1.1) + 1] * 40 + [0] * 216, cpu_flops=F, link_bytes_per_s=P)
    assert not below.stream and above.stream
    assert above.used_experts == 40 and above.n_star == pytest.approx(ns)
    assert "stream the used experts" in above.reason and "compute on the CPU" in below.reason


def test_memory_bound_cpu_floor_and_edge_cases():
    F, P = 3e12, 25e9
    # A CPU that streams its DRAM slower than the link: streaming wins even at one token per expert.
    slow_dram = decide_stream(DSV3, "bf16", [1] * 8, cpu_flops=F, link_bytes_per_s=P, dram_bytes_per_s=10e9)
    assert slow_dram.stream
    assert not decide_stream(DSV3, "bf16", [1] * 8, cpu_flops=F, link_bytes_per_s=P, dram_bytes_per_s=200e9).stream
    nothing = decide_stream(DSV3, "bf16", [0] * 256, cpu_flops=F, link_bytes_per_s=P)
    assert not nothing.stream and nothing.used_experts == 0
    with pytest.raises(ShapeError):
        n_star(2.0, 0, 25e9)
    with pytest.raises(ShapeError):
        decide_stream(DSV3, "bf16", [-1], cpu_flops=F, link_bytes_per_s=P)
