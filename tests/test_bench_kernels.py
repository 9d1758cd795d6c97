"""`moetier bench kernels` on tiny shapes: workload, accounting, records, JSON and the CLI."""
import json
import random

import pytest
import torch

from moetier.bench import report
from moetier.bench.baseline import TorchLoopBaseline
from moetier.bench.kernels import BenchConfig, KernelBench, apply_threads, formats_for, reference_relerr
from moetier.bench.measure import TINY_PLAN, Measurement, quantile, time_calls
from moetier.bench.probes import measure_limits
from moetier.bench.workload import (GIB, deepseek_v3, flops_per_forward, plan_copies, qwen3_30b, random_routing,
                                    random_weights, tiny, weight_bytes_per_forward)
from moetier.conformance.tolerances import tolerance
from moetier.cli import main
from moetier.errors import ShapeError
from moetier.experts import ExpertLayerSpec
from moetier.hardware import detect_inventory
from moetier.plugins import load_registry
from moetier.reference import DenseExpert, moe_forward

inventory = detect_inventory()


def test_shapes_match_the_models():
    q = qwen3_30b().layer
    assert (q.num_experts, q.top_k, q.hidden_size, q.intermediate_size) == (128, 8, 2048, 768)
    d = deepseek_v3(3 * GIB).layer
    assert (d.top_k, d.hidden_size, d.intermediate_size) == (8, 7168, 2048)
    # As many experts as 3 GiB of bf16 holds, in multiples of 8.
    assert d.num_experts % 8 == 0 and d.num_experts * d.expert_bytes("bf16") <= 3 * GIB
    assert (d.num_experts + 8) * d.expert_bytes("bf16") > 3 * GIB
    assert deepseek_v3(10 * 2**40).layer.num_experts == 256


def test_routing_is_distinct_normalized_deterministic_and_skewed():
    layer = ExpertLayerSpec(128, 8, 64, 32)
    seed = random.randrange(1 << 30)
    a = random_routing(layer, 64, 3, seed)
    b = random_routing(layer, 64, 3, seed)
    c = random_routing(layer, 64, 3, seed + 1)
    for r in a:
        assert r.topk_ids.dtype == torch.int64 and r.topk_ids.shape == (64, 8)
        assert all(len(set(row.tolist())) == 8 for row in r.topk_ids)
        assert int(r.topk_ids.min()) >= 0 and int(r.topk_ids.max()) < 128
        torch.testing.assert_close(r.topk_weights.sum(1), torch.ones(64), rtol=0, atol=1e-6)
    assert all(torch.equal(x.topk_ids, y.topk_ids) for x, y in zip(a, b))
    assert not all(torch.equal(x.topk_ids, y.topk_ids) for x, y in zip(a, c))
    # Realistic spread: neither uniform nor collapsed onto a few experts.
    counts = torch.bincount(random_routing(layer, 4096, 1, seed)[0].topk_ids.flatten(), minlength=128).float()
    ratio = float(counts.max() / counts.mean())
    assert 1.3 < ratio < 8, ratio
    assert int((counts > 0).sum()) == 128
    with pytest.raises(ShapeError):
        random_routing(layer, 0, 1, seed)


def test_accounting():
    layer = ExpertLayerSpec(16, 4, 256, 128)
    ids = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [4, 5, 6, 7]])
    assert weight_bytes_per_forward(layer, "int8", ids) == 8 * layer.expert_bytes("int8")
    assert layer.expert_bytes("int8") == 3 * (256 * 128) + 4 * (128 + 128 + 256)
    assert flops_per_forward(layer, 3) == 2 * 3 * 256 * 128 * 3 * 4


def test_plan_copies():
    l3 = 32 << 20
    layer = qwen3_30b().layer
    step = 8 * layer.expert_bytes("bf16")  # 75 MB: two copies stream 150 MB > 4 x 32 MiB between reuses
    assert plan_copies(layer, 128 * layer.expert_bytes("bf16"), step, 3 * GIB, l3) == 2
    step4 = 8 * layer.expert_bytes("int4_g64")
    n = plan_copies(layer, 128 * layer.expert_bytes("int4_g64"), step4, 3 * GIB, l3)
    assert (n - 1) * step4 < 4 * l3 <= n * step4
    # The budget wins over the cache rule, and there is always one copy.
    assert plan_copies(layer, 2 * GIB, step4, 3 * GIB, l3) == 1
    assert plan_copies(layer, 10 * GIB, step4, 3 * GIB, l3) == 1


def test_timing_plan_bounds():
    calls = []
    times = time_calls(calls.append, TINY_PLAN)
    assert calls[:TINY_PLAN.warmup] == list(range(TINY_PLAN.warmup))
    assert TINY_PLAN.min_iters <= len(times) <= TINY_PLAN.max_iters
    assert len(calls) == TINY_PLAN.warmup + len(times)
    assert quantile([3.0, 1.0, 2.0], 0.0) == 1.0 and quantile([3.0, 1.0, 2.0], 1.0) == 3.0


def test_torch_loop_baseline_matches_the_float64_reference():
    layer = ExpertLayerSpec(8, 2, 128, 64)
    seed = random.randrange(1 << 30)
    w = random_weights(layer, "bf16", seed)
    r = random_routing(layer, 5, 1, seed)[0]
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    out = TorchLoopBaseline().forward(TorchLoopBaseline().prepare(layer, w), x, r.topk_ids, r.topk_weights)
    dense = {e: DenseExpert.from_tensors(w.expert(e), torch.float64) for e in range(8)}
    ref = moe_forward(layer, dense, x, r.topk_ids, r.topk_weights, torch.float64)
    # bf16 activations and intermediates (8 significant bits, about 0.4% per rounding) over three chained
    # matmuls: a few rounding steps, well under 3%.
    rel = float((out.double() - ref).norm() / ref.norm())
    assert rel < 3e-2, rel


def test_reference_check_catches_a_wrong_forward():
    layer = ExpertLayerSpec(8, 2, 128, 64)
    w = random_weights(layer, "int8", random.randrange(1 << 30))
    assert reference_relerr(layer, w, lambda x, i, wt: torch.zeros(x.shape), 3) == pytest.approx(1.0)
    dense = {e: DenseExpert.from_tensors(w.expert(e), torch.float64) for e in range(8)}
    exact = lambda x, i, wt: moe_forward(layer, dense, x, i, wt, torch.float64)  # noqa: E731
    assert reference_relerr(layer, w, exact, 3) < 1e-6
    doubled = lambda x, i, wt: 2 * exact(x, i, wt)  # noqa: E731
    assert reference_relerr(layer, w, doubled, 3) == pytest.approx(1.0, rel=1e-5)


def test_formats_for():
    declared = ("fp32", "bf16", "int8", "int4_g64")
    assert formats_for(declared, None) == (["bf16", "int8", "int4_g64"], [])
    assert formats_for(declared, ("int8", "fp8_e4m3")) == (["int8"], ["fp8_e4m3"])


def test_apply_threads_sets_the_backend_and_torch():
    saved = torch.get_num_threads()
    try:
        b = TorchLoopBaseline()
        apply_threads(b, 1)
        assert torch.get_num_threads() == 1
        numba_spec = load_registry(no_plugins=True).backends.get("cpu.numba")
        if numba_spec is not None and numba_spec.safe_probe(inventory).usable:
            n = numba_spec.create(inventory)
            apply_threads(n, 1)
            assert n.threads == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def tiny_doc():
    registry = load_registry()
    config = BenchConfig(shapes=("tiny",), backends=("cpu.torch",), formats=("bf16", "int4_g64"), batches=(1, 4, 32),
                         threads=(1, 2), seed=random.randrange(1000), plans=(TINY_PLAN, TINY_PLAN),
                         max_weight_bytes=16 << 20)
    limits = measure_limits(inventory, (1, 2), quick=True)
    result = KernelBench(config, inventory, registry, limits=limits).run()
    return report.document(result, inventory, command=["test"], settings={"seed": config.seed})


def test_records_have_the_documented_fields_and_consistent_arithmetic(tiny_doc, tmp_path):
    layer = tiny().layer
    recs = tiny_doc["records"]
    # torch loop (bf16) + cpu.torch x 2 formats, for 3 batches x 2 thread counts.
    assert len(recs) == 3 * 3 * 2
    assert {r["backend"] for r in recs} == {"torch.loop", "cpu.torch"}
    for r in recs:
        assert set(report.RECORD_FIELDS) <= set(r)
        assert r["seconds_p10"] <= r["seconds"] <= r["seconds_p90"] and r["seconds"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["batch"] / r["seconds"], rel=1e-12)
        assert r["gb_per_s"] == pytest.approx(r["weight_bytes"] / r["seconds"] / 1e9, rel=1e-12)
        assert r["gflop_per_s"] == pytest.approx(r["flops"] / r["seconds"] / 1e9, rel=1e-12)
        assert r["flops"] == flops_per_forward(layer, r["batch"])
        eb = layer.expert_bytes(r["format"])
        assert layer.top_k * eb <= r["weight_bytes"] <= min(layer.num_experts, r["batch"] * layer.top_k) * eb
        assert r["read_gb_per_s"] == tiny_doc["limits"]["read_gb_per_s_best"][str(r["threads"])]
        assert r["pct_bandwidth"] == pytest.approx(100 * r["gb_per_s"] / r["read_gb_per_s"])
        if r["peak_gflop_per_s"] is not None:
            assert r["pct_peak"] == pytest.approx(100 * r["gflop_per_s"] / r["peak_gflop_per_s"])
        base = [b for b in recs if b["backend"] == "torch.loop" and b["batch"] == r["batch"]
                and b["threads"] == r["threads"]]
        assert len(base) == 1
        assert r["x_vs_torch"] == pytest.approx(r["tokens_per_s"] / base[0]["tokens_per_s"])
        # What was timed computes the right thing: cpu.torch is fp32 on the same weights (float32
        # rounding only), the torch loop rounds activations to bf16 (8 significant bits, a few roundings).
        assert r["check_relerr"] < (1e-4 if r["backend"] == "cpu.torch" else 3e-2), r
    assert {r["peak_kind"] for r in recs if r["format"] == "int4_g64"} == {"int8"}
    assert {r["peak_kind"] for r in recs if r["format"] == "bf16"} == {"bf16"}
    # The document names the machine, the date, and survives a JSON round trip.
    assert tiny_doc["machine"]["cpu"]["model"] == inventory.cpu.model and tiny_doc["date"]
    path = tmp_path / "bench.json"
    report.write_json(tiny_doc, path)
    again = json.loads(path.read_text())
    assert again["records"] == json.loads(json.dumps(tiny_doc["records"]))
    assert [Measurement.from_record(r).gb_per_s for r in again["records"]] == pytest.approx(
        [r["gb_per_s"] for r in recs])


def test_peer_records_are_matched_by_shape_format_batch_threads(tiny_doc):
    ours = [Measurement.from_record(r) for r in tiny_doc["records"] if r["backend"] == "cpu.torch"]
    peer = [Measurement(**{**m.__dict__, "backend": "kt-kernel X", "seconds": m.seconds * 2}) for m in ours
            if m.format == "bf16"]
    limits = report.MachineLimits({1: 10.0, 2: 20.0}, {1: 11.0, 2: 21.0}, {1: None, 2: None}, {1: None, 2: None},
                                  1 << 20, "sse2")
    recs = report.build_records(ours, limits, peer)
    for r in recs:
        if r["format"] == "bf16":
            assert r["peer_backend"] == "kt-kernel X" and r["x_vs_peer"] == pytest.approx(2.0)
        else:
            assert r["peer_backend"] is None and r["x_vs_peer"] is None
        assert r["pct_peak"] is None
    table = report.markdown_table(recs, peer=True)
    assert table.count("\n") == len(recs) + 1 and "2.00x" in table


def test_cli_quick_run_writes_json(tmp_path, capsys):
    out = tmp_path / "b.json"
    md = tmp_path / "b.md"
    rc = main(["bench", "kernels", "--backend", "cpu.torch", "--shapes", "tiny", "--quick", "--batches", "1",
               "--threads", "1", "--formats", "int8", "--json", str(out), "--markdown", str(md)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert [(r["backend"], r["format"], r["batch"], r["threads"]) for r in doc["records"]] == [
        ("torch.loop", "bf16", 1, 1), ("cpu.torch", "int8", 1, 1)]
    assert doc["command"][0] == "moetier"
    assert "Machine limits" in capsys.readouterr().out
    text = md.read_text()
    assert text.startswith("- date: ") and inventory.cpu.model in text and "| shape |" in text


def test_cli_times_a_gguf_format_on_the_native_kernels(tmp_path):
    """A block format the backend declares is benched like any other: q4_0 on the native backend."""
    from moetier.selection import select_backends

    name = select_backends(load_registry(), inventory).for_device("cpu")
    if name is None or "q4_0" not in load_registry().backend(name).formats:
        pytest.skip("the chosen CPU backend does not compute q4_0")
    out = tmp_path / "b.json"
    rc = main(["bench", "kernels", "--backend", name, "--shapes", "tiny", "--quick", "--batches", "1",
               "--threads", "1", "--formats", "q4_0", "--no-baseline", "--json", str(out)])
    assert rc == 0
    (rec,) = json.loads(out.read_text())["records"]
    assert (rec["backend"], rec["format"], rec["peak_kind"]) == (name, "q4_0", "int8") and rec["tokens_per_s"] > 0
    assert rec["check_relerr"] <= tolerance("q4_0")  # checked against the fp32 reference before it was timed


def test_cli_rejects_bad_options(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "kernels", "--formats", "int3"])
    assert "unknown weight format 'int3'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a mixed name is parsed as one: both parts must be formats
        main(["bench", "kernels", "--formats", "q4_k+int3"])
    assert "GATEUP+DOWN" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "kernels", "--batches", "0"])
    assert ">= 1" in capsys.readouterr().err
    assert main(["bench", "kernels", "--backend", "no.such", "--shapes", "tiny"]) == 2
