"""`moetier bench hybrid` through the real console script: the whole harness on the CPU stand-in (small
and fast), its refusal without a GPU, and its usage errors."""
from __future__ import annotations

import json

import pytest
import torch

from cli_helpers import assert_usage_error, moetier


def test_cpu_stand_in_runs_every_configuration_end_to_end(tmp_path):
    out = tmp_path / "hybrid.json"
    r = moetier("bench", "hybrid", "--cpu-stand-in", "--shapes", "tiny", "--batches", "1,3", "--shares", "0,0.5,1",
                "--quick", "--json", out, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stdout + r.stderr
    text = " ".join(r.stdout.split())  # rich wraps lines to the terminal's width
    assert "CPU stand-in" in text and "mean nothing about a GPU" in text
    doc = json.loads(out.read_text())
    assert doc["stand_in"] is True and "measure nothing" in doc["note"]
    assert doc["skipped"] == []
    rows = {(row["share"], row["batch"]): row for row in doc["rows"]}
    assert set(rows) == {(s, b) for s in (0.0, 0.5, 1.0) for b in (1, 3)}
    for (share, batch), row in rows.items():
        assert row["matches_standard_path"] is True, row  # the hybrid step equals the tiered layer's standard path
        assert row["device_experts"] == round(share * 16) and row["cpu_experts"] == 16 - row["device_experts"]
        assert row["joint_s"] > 0 and row["iterations"] >= 3
        assert (row["cpu_s"] is None) == (share == 1.0) and (row["device_s"] is None) == (share == 0.0)
        assert (row["overlap"] is None) == (share in (0.0, 1.0))
        if row["overlap"] is not None:
            assert row["overlap"] == pytest.approx(max(row["cpu_s"], row["device_s"]) / row["joint_s"])
        assert row["graph"] is False and row["device_bw_share"] is None  # no device, no bandwidth
    hf = doc["host_functions"]
    assert hf["ctypes_pair_us"] > 0 and hf["host_thread_pair_us"] > 0 and "stream_pair_us" not in hf
    # The placement cost model's prediction for every configuration (its CPU speeds measured in the run).
    assert doc["cost_model"]["available"] is True and "measured now" in doc["cost_model"]["cpu"]
    for row in rows.values():
        assert row["predicted_s"] > 0
        parts = [t for t in (row["predicted_cpu_s"], row["predicted_device_s"]) if t is not None]
        assert row["predicted_s"] == pytest.approx(max(parts) + doc["cost_model"]["layer_overhead_s"]
                                                   + (doc["cost_model"]["hybrid_overhead_s"] if len(parts) == 2 else 0))
    assert [g["goal"] for g in doc["goals"]] == ["overlap efficiency >= 0.9 at batch 1 (tiny)"]


def test_a_spent_time_budget_lists_what_was_skipped(tmp_path):
    out = tmp_path / "hybrid.json"
    r = moetier("bench", "hybrid", "--cpu-stand-in", "--shapes", "tiny", "--batches", "1,2", "--shares", "0.5",
                "--quick", "--time-budget", "0.001", "--json", out, timeout=300)
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    assert doc["rows"] == []
    assert [(s["batch"], s["why"]) for s in doc["skipped"]] == [(1, "out of time"), (2, "out of time")]
    assert "skipped tiny share 50% batch 1: out of time" in " ".join(r.stdout.split())


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_says_it_needs_one():
    r = moetier("bench", "hybrid", "--shapes", "tiny")
    assert_usage_error(r, "needs a CUDA or ROCm GPU", "--cpu-stand-in")


def test_usage_errors_are_one_line():
    assert_usage_error(moetier("bench", "hybrid", "--cpu-stand-in", "--shares", "0,1.5"), "shares must be numbers in [0, 1]")
    assert_usage_error(moetier("bench", "hybrid", "--cpu-stand-in", "--time-budget", "0"), "--time-budget")
    assert_usage_error(moetier("bench", "hybrid", "--cpu-stand-in", "--backend", "cpu.torch", "--shapes", "tiny"),
                       "cpu.torch runs no host tasks")
