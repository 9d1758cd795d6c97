"""PlacementPlan (validation, budget errors, JSON), tier budgets, the cost model and the plugin hook."""
from __future__ import annotations

import json

import pytest

from moetier.errors import BudgetError, LayoutError, PluginError, SettingError
from moetier.hardware.inventory import HardwareInventory
from moetier.placement import (Budgets, PlacementPlan, PlacementStrategy, ShardSpec, TierBudget, parse_size,
                               single_tier_plan)
from moetier.placement.budgets import make_budgets
from moetier.placement.cost import predict
from moetier.placement.model_parts import CACHE_BYTES
from moetier.placement.models import resolve_model
from moetier.placement.plan import SCHEMA_VERSION, LayerPlacement, PlanBudgetError
from moetier.placement.planner import make_plan, tier_compute
from moetier.placement.sizes import format_size
from moetier.placement.speeds import Speeds, TierSpeed
from moetier.plugins import load_registry

from conftest import INVENTORIES
from zoo.fixtures import tiny_checkpoint  # noqa: F401  (session fixture)

GIB = 2**30


@pytest.fixture(scope="module")
def registry():
    return load_registry()


@pytest.fixture(scope="module")
def xeon():
    return HardwareInventory.from_dict(json.loads((INVENTORIES / "xeon_amx_2socket_rtx4090.json").read_text()))


@pytest.fixture(scope="module")
def zen4():
    return HardwareInventory.from_dict(json.loads((INVENTORIES / "zen4_avx512_2core.json").read_text()))


def plan_for(registry, inventory, model, strategy="uniform", *, cpu_format=None, check=True, stats=None,
             options=None, speeds=None, **budget_kw):
    info = resolve_model(model, registry)
    budgets = make_budgets(info.parts, inventory, registry.tiers.values(), **budget_kw)
    compute = tier_compute(info.layout, budgets, cpu_backend="cpu.avx512",
                           cpu_formats=registry.backend("cpu.avx512").formats,
                           accelerator_backends={"cuda": "cuda"}, cpu_format=cpu_format)
    return info, budgets, make_plan(info.layout, info.parts, budgets, registry.placement(strategy), compute,
                                    stats=stats, speeds=speeds, options=options, check=check)


# ---- sizes -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,value", [("24GiB", 24 * GIB), ("512GB", 512 * 10**9), ("0", 0), ("1.5TiB", int(1.5 * 2**40)),
                                        ("64G", 64 * GIB), ("100 MiB", 100 * 2**20), ("12345", 12345), ("2gb", 2 * 10**9)])
def test_sizes_parse(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["lots", "-3GiB", "24 GiBs", "", "1e9"])
def test_bad_sizes_name_the_option(text):
    with pytest.raises(SettingError, match="--gpu-mem: cannot read"):
        parse_size(text, "--gpu-mem")


def test_format_size():
    assert format_size(24 * GIB) == "24.0 GiB" and format_size(0) == "0 B" and format_size(605 * GIB) == "605 GiB"


# ---- budgets and the KV cache ------------------------------------------------------------------------------

def test_kv_cache_per_attention_shape(registry):
    v3 = resolve_model("DeepSeek-V3", registry).parts  # MLA: kv_lora_rank 512 + rope 64 per token per layer
    assert v3.kv_cache_bytes(4096, 2) == 61 * (512 + 64) * CACHE_BYTES * 4096 * 2
    v32 = resolve_model("DeepSeek-V3.2", registry).parts  # + the DSA indexer's 128-value key
    assert v32.kv_bytes_per_token() == 61 * (512 + 64 + 128) * CACHE_BYTES
    qwen = resolve_model("Qwen3-30B-A3B", registry).parts  # GQA: 4 kv heads x 128 x (K and V)
    assert qwen.kv_cache_bytes(1000, 1) == 48 * 4 * 128 * 2 * CACHE_BYTES * 1000
    nxt = resolve_model("Qwen3-Next-80B-A3B", registry).parts  # 12 full-attention layers grow, 36 DeltaNet fixed
    grow = nxt.kv_cache_bytes(2000, 1) - nxt.kv_cache_bytes(1000, 1)
    assert grow == 12 * 2 * 256 * 2 * CACHE_BYTES * 1000
    state = 32 * 128 * 128 * 4 + (2 * 16 * 128 + 32 * 128) * 3 * CACHE_BYTES
    assert nxt.kv_cache_bytes(1, 1) == 36 * state + 12 * 2 * 256 * 2 * CACHE_BYTES
    text01 = resolve_model("MiniMax-Text-01", registry).parts  # 70 lightning layers: state only
    assert sum(a.kind == "linear" for a in text01.attention) == 70


def test_budgets_reserve_the_non_expert_parts_on_the_first_accelerator(registry, xeon):
    info = resolve_model("DeepSeek-V3", registry)
    b = make_budgets(info.parts, xeon, registry.tiers.values(), context=8192, batch=2)
    assert b.names == ("cuda:0", "cpu:numa0", "cpu:numa1") and b.parts_tier == "cuda:0"
    gpu = b.tier("cuda:0")
    reserved = dict(gpu.reserved)
    assert gpu.capacity_bytes == 24 * GIB
    assert reserved["attention"] == info.parts.part_bytes["attention"]
    assert reserved["KV cache (8192 tokens x 2)"] == info.parts.kv_cache_bytes(8192, 2)
    assert gpu.free_bytes == gpu.capacity_bytes - sum(reserved.values())
    numa1 = b.tier("cpu:numa1")
    assert numa1.capacity_bytes == 512 * GIB and dict(numa1.reserved) == {"headroom (OS, other processes)":
                                                                           int(512 * GIB * 0.05)}
    # CPU only: the parts move to the first NUMA node; --cpu-mem is split evenly, without headroom
    b = make_budgets(info.parts, xeon, registry.tiers.values(), gpu_mem=0, cpu_mem=parse_size("800GiB"), disk=True)
    assert b.names == ("cpu:numa0", "cpu:numa1", "disk") and b.parts_tier == "cpu:numa0"
    assert b.tier("cpu:numa0").capacity_bytes == b.tier("cpu:numa1").capacity_bytes == 400 * GIB
    assert "attention" in dict(b.tier("cpu:numa0").reserved) and "disk cache" in dict(b.tier("cpu:numa0").reserved)
    assert b.tier("disk").capacity_bytes is None and b.tier("disk").free_bytes is None


def test_gpu_mem_plans_for_a_card_this_machine_lacks(registry, zen4):
    info = resolve_model("Qwen3-30B-A3B", registry)
    b = make_budgets(info.parts, zen4, registry.tiers.values(), gpu_mem=parse_size("16GiB"))
    assert b.names[0] == "cuda:0" and b.tier("cuda:0").capacity_bytes == 16 * GIB
    assert "none here" in b.tier("cuda:0").source


# ---- the plan ---------------------------------------------------------------------------------------------

def test_shards_partition_each_layer_per_tier_backend_and_format(registry, xeon):
    info, budgets, plan = plan_for(registry, xeon, "DeepSeek-V3", disk=True, gpu_mem=parse_size("24GiB"),
                                   cpu_mem=parse_size("200GiB"), cpu_format="int4_g64")
    assert plan.moe_layers == tuple(range(3, 61))
    tiers_used = set()
    for i in plan.moe_layers:
        shards = plan.shards(i)
        assert all(isinstance(s, ShardSpec) for s in shards)
        assert len({(s.tier, s.backend, s.fmt) for s in shards}) == len(shards)
        ids = [e for s in shards for e in s.experts]
        assert sorted(ids) == list(range(256)) and all(list(s.experts) == sorted(s.experts) for s in shards)
        for s in shards:
            tiers_used.add(s.tier)
            want = ("cuda", "fp8_e4m3") if s.tier == "cuda:0" else ("cpu.avx512", "int4_g64")
            assert (s.backend, s.fmt) == want  # disk: the CPU backend and format that compute it after a read
    assert tiers_used == {"cuda:0", "cpu:numa0", "cpu:numa1", "disk"}
    # both NUMA nodes are filled before anything is left on disk (numa0 also holds the disk cache)
    one = info.layout.moe_layers[0].experts.expert_bytes("int4_g64")
    for node in ("cpu:numa0", "cpu:numa1"):
        assert 0 <= budgets.tier(node).capacity_bytes - plan.used_bytes(node) < one
    with pytest.raises(LayoutError, match="layer 2 is not an MoE layer"):
        plan.shards(2)


def test_plan_json_round_trip_and_schema_version(registry, xeon, tmp_path):
    _, _, plan = plan_for(registry, xeon, "Qwen3-30B-A3B", "random", options={"seed": 3})
    path = tmp_path / "plan.json"
    plan.save(path)
    again = PlacementPlan.load(path)
    assert again == plan and again.shards(7) == plan.shards(7) and again.to_json() == plan.to_json()
    d = json.loads(path.read_text())
    assert d["schema_version"] == SCHEMA_VERSION and d["strategy"] == {"name": "random", "options": {"seed": 3}}
    d["schema_version"] = 2
    with pytest.raises(SettingError, match="schema_version 2 is not supported; this moetier reads version 1"):
        PlacementPlan.from_json(json.dumps(d))
    with pytest.raises(SettingError, match="not a moetier placement plan"):
        PlacementPlan.from_json(json.dumps({"experts": []}))
    with pytest.raises(SettingError, match="not JSON"):
        PlacementPlan.from_json("{")
    d["schema_version"] = 1
    del d["experts"][0]["shards"][0]["experts"][0]
    with pytest.raises(SettingError, match="layer 0 must hold each of its 128 experts in exactly one shard"):
        PlacementPlan.from_dict(d)


def test_plan_structure_is_checked_when_built(registry):
    info = resolve_model("Qwen3-30B-A3B", registry)
    plan = single_tier_plan(info.layout, "cpu.avx512", "bf16")
    assert [len(plan.shards(i)) for i in plan.moe_layers] == [1] * 48 and plan.part_tiers["attention"] == "cpu:numa0"
    bad = [LayerPlacement(p.index, p.shards) for p in plan.experts]
    bad[3] = LayerPlacement(3, (ShardSpec("cpu:numa0", "cpu.avx512", "bf16", tuple(range(127))),
                                ShardSpec("cpu:numa0", "cpu.avx512", "int8", (126, 127))))
    with pytest.raises(SettingError, match=r"layer 3 must hold .* repeated or out of range 126"):
        PlacementPlan(plan.model, tuple(bad))
    bad[3] = LayerPlacement(3, (ShardSpec("cpu:numa0", "cpu.avx512", "int3", tuple(range(128))),))
    with pytest.raises(SettingError, match="unknown weight format 'int3'"):
        PlacementPlan(plan.model, tuple(bad))
    with pytest.raises(SettingError, match="sorted and unique"):
        ShardSpec("cpu:numa0", "cpu.avx512", "bf16", (3, 1))


def test_plan_for_another_model_is_refused(registry):
    a = resolve_model("Qwen3-30B-A3B", registry).layout
    b = resolve_model("Qwen3-235B-A22B", registry).layout
    with pytest.raises(LayoutError, match="made for Qwen3-30B-A3B .* the model given is Qwen3-235B-A22B"):
        single_tier_plan(a, "cpu.avx512", "bf16").validate(b)


def test_budget_error_names_tier_bytes_and_biggest_contributors(registry, zen4):
    # DeepSeek-V3 in FP8 does not fit 512 GiB of DRAM beside a 24 GiB card
    info, budgets, plan = plan_for(registry, zen4, "DeepSeek-V3", check=False, gpu_mem=parse_size("24GiB"),
                                   cpu_mem=parse_size("512GiB"))
    with pytest.raises(BudgetError) as exc:
        plan.check_budgets()
    err = exc.value
    assert isinstance(err, PlanBudgetError) and len(err.overflows) == 1
    o = err.overflows[0]
    experts = sum(plan.layer_bytes(i).get("cpu:numa0", 0) for i in plan.moe_layers)
    assert o.tier == "cpu:numa0" and o.needed == experts and o.free == 512 * GIB == o.capacity
    msg = str(err)
    assert f"needs 605 GiB ({experts:,} bytes)" in msg and f"has 512 GiB ({512 * GIB:,} bytes) free" in msg
    assert "biggest contributors: routed experts (14,740 in fp8_e4m3, layers 3-60)" in msg
    # the accelerator is full of reservations first: a card too small for the dense parts says so
    info, budgets, plan = plan_for(registry, zen4, "DeepSeek-V3", check=False, gpu_mem=parse_size("8GiB"),
                                   cpu_mem=parse_size("1TiB"))
    with pytest.raises(PlanBudgetError) as exc:
        plan.check_budgets()
    o = exc.value.overflows[0]
    assert o.tier == "cuda:0" and o.free < 0 and o.contributors[0][0] == "attention"
    assert o.contributors[0][1] == info.parts.part_bytes["attention"]


def test_no_cpu_copy_of_accelerator_experts_unless_asked(registry, xeon):
    info = resolve_model("DeepSeek-V3", registry)
    budgets = make_budgets(info.parts, xeon, registry.tiers.values())
    compute = tier_compute(info.layout, budgets, cpu_backend="cpu.avx512",
                           cpu_formats=registry.backend("cpu.avx512").formats, accelerator_backends={"cuda": "cuda"})
    plain = make_plan(info.layout, info.parts, budgets, registry.placement("uniform"), compute)
    copies = make_plan(info.layout, info.parts, budgets, registry.placement("uniform"), compute, cpu_copies=True)
    n_gpu = plain.expert_count("cuda:0")
    assert n_gpu > 0 and copies.expert_count("cuda:0") == n_gpu
    one = info.layout.moe_layers[0].experts.expert_bytes("fp8_e4m3")
    assert not any("CPU copies" in w for w, _ in plain.usage()["cpu:numa0"])
    cpu = ("cpu:numa0", "cpu:numa1")
    added = sum(copies.used_bytes(t) - plain.used_bytes(t) for t in cpu)
    assert added == n_gpu * one  # the same experts on the CPU tiers, plus one copy of each GPU expert
    assert dict(copies.usage()["cpu:numa0"])[f"CPU copies of {n_gpu:,} accelerator experts (fp8_e4m3)"] == n_gpu * one


# ---- the cost model -------------------------------------------------------------------------------------

def test_cost_model_matches_the_formula_for_a_cpu_only_layer(registry, zen4):
    info = resolve_model("Qwen3-30B-A3B", registry)
    plan = single_tier_plan(info.layout, "cpu.avx512", "bf16")
    speed = TierSpeed(read_gb_per_s=40.0, bf16_gflop_per_s=400.0, int8_gop_per_s=800.0, source="test")
    p = predict(plan, info.parts, Speeds({"cpu:numa0": speed}, layer_overhead_s=50e-6), batch=1, context=1024)
    spec = info.layout.moe_layers[0].experts
    experts = 8 * spec.expert_bytes("bf16") / 40e9 + 8 * 6 * 2048 * 768 / 400e9
    router = 128 * 2048 * 4 / 40e9 + 2 * 128 * 2048 / 400e9
    assert p.decode_moe_s / 48 == pytest.approx(experts + router + 50e-6, rel=1e-9)
    assert p.decode_tokens_per_s == pytest.approx(1 / p.decode_step_s)
    assert set(p.bounds()) == {"cpu:numa0 read"}
    # half the bandwidth: the read part doubles, the rest stays
    slow = TierSpeed(20.0, 400.0, 800.0, "test")
    q = predict(plan, info.parts, Speeds({"cpu:numa0": slow}, layer_overhead_s=50e-6), batch=1, context=1024)
    read = (8 * spec.expert_bytes("bf16") + 128 * 2048 * 4) / 40e9
    assert q.decode_moe_s / 48 - p.decode_moe_s / 48 == pytest.approx(read, rel=1e-9)


def test_accelerator_experts_cut_the_predicted_cpu_time(registry, xeon):
    speeds = Speeds({"cuda:0": TierSpeed(1000.0, 165e3, 330e3, "t", overlap=True),
                     "cpu:numa0": TierSpeed(100.0, 2000.0, 4000.0, "t"), "cpu:numa1": TierSpeed(100.0, 2000.0, 4000.0, "t")})
    info, _, small = plan_for(registry, xeon, "Qwen3-30B-A3B", "uniform", gpu_mem=parse_size("8GiB"))
    _, _, big = plan_for(registry, xeon, "Qwen3-30B-A3B", "uniform", gpu_mem=parse_size("40GiB"))
    assert big.expert_count("cuda:0") > small.expert_count("cuda:0") > 0
    ps, pb = predict(small, info.parts, speeds), predict(big, info.parts, speeds)
    assert pb.decode_tokens_per_s > ps.decode_tokens_per_s
    assert all(c.decode_bound.startswith("cpu:numa") for c in ps.layers)


# ---- the plugin hook --------------------------------------------------------------------------------------

class _Plugin:
    def __init__(self, *strategies):
        self.strategies = strategies

    import moetier as _m

    @_m.hookimpl
    def moetier_register_placements(self, register):
        for s in self.strategies:
            register(s)


def _noop(problem):
    return problem.fill([])


def test_placement_hook_collects_and_refuses_duplicates():
    reg = load_registry(extra_plugins={"mine": _Plugin(PlacementStrategy("mine", "test", _noop))})
    assert reg.placement("mine").place is _noop and reg.owners[("placement strategy", "mine")] == "mine"
    with pytest.raises(PluginError, match="placement strategy name 'uniform' is registered twice"):
        load_registry(extra_plugins={"dup": _Plugin(PlacementStrategy("uniform", "again", _noop))})
    with pytest.raises(PluginError, match="registered a str as a placement strategy"):
        load_registry(extra_plugins={"bad": _Plugin("uniform")})
    with pytest.raises(PluginError, match="no placement strategy named 'nope'; registered: cost, explicit"):
        reg.placement("nope")


def test_budget_objects_round_trip():
    t = TierBudget("cpu:numa0", "cpu", 10 * GIB, (("headroom", GIB),), "detected")
    assert TierBudget.from_dict(t.to_dict()) == t and t.free_bytes == 9 * GIB
    b = Budgets((t,), "cpu:numa0", 4096, 1)
    with pytest.raises(SettingError, match="no tier named 'gpu'"):
        b.tier("gpu")


# ---- speeds and the decode check --------------------------------------------------------------------------

def test_cpu_speeds_from_a_bench_file_and_measured_now(tmp_path, zen4):
    from moetier.bench.probes import MachineLimits
    from moetier.placement.speeds import cpu_from_bench, measured_cpu

    limits = MachineLimits({1: 30.0, 2: 35.0}, {1: 32.0, 2: 60.1}, {1: 234.0, 2: 466.0}, {1: 468.0, 2: 931.0},
                           1 << 30, "avx512")
    path = tmp_path / "bench.json"
    fp8 = {"backend": "cpu.avx512", "format": "fp8_e4m3", "batch": 1, "threads": 2, "seconds": 2e-3,
           "weight_bytes": 40e6, "flops": 75.5e6}
    records = [fp8, dict(fp8, shape="other", seconds=3e-3), dict(fp8, batch=128, seconds=1.0),
               dict(fp8, backend="cpu.numba", seconds=1.0), dict(fp8, format="bf16", threads=1, seconds=1.0)]
    path.write_text(json.dumps({"date": "2026-11-29T00:45:40+00:00", "limits": limits.to_dict(), "records": records}))
    s = cpu_from_bench(path, zen4, backend="cpu.avx512")
    assert (s.read_gb_per_s, s.bf16_gflop_per_s, s.int8_gop_per_s) == (60.1, 466.0, 931.0)
    assert s.peak("int4_g64") == 931.0 and s.peak("fp8_e4m3") == 466.0 and "2 threads" in s.source
    # fp8's decode stream rate: bytes over the time left once its math is taken out (median of two shapes)
    rates = [40e6 / (t - 75.5e6 / 466e9) / 1e9 for t in (2e-3, 3e-3)]
    assert s.read_for("fp8_e4m3") == pytest.approx(sum(rates) / 2) and s.read_for("bf16") == 60.1
    assert cpu_from_bench(path, zen4, threads=1).read_gb_per_s == 32.0
    with pytest.raises(SettingError, match="measured at 1, 2 threads, not 4"):
        cpu_from_bench(path, zen4, threads=4)
    path.write_text("{}")
    with pytest.raises(SettingError, match="not the JSON of `moetier bench kernels --json`"):
        cpu_from_bench(path, zen4)
    from moetier.hardware import detect_inventory
    here = measured_cpu(detect_inventory(), threads=1)  # the bench's own probes, quick
    assert here.read_gb_per_s > 0.5 and here.bf16_gflop_per_s > 1 and here.source.startswith("measured now (1 threads)")


def test_decode_check_runs_real_layers_and_predicts_each_round(tiny_checkpoint, registry, zen4):  # noqa: F811
    pytest.importorskip("transformers")
    from moetier.family import read_config
    from moetier.placement.check import check_decode
    from moetier.placement.model_parts import parts_from_config

    path, layout = tiny_checkpoint("qwen", "Qwen3-30B-A3B", "default")
    parts = parts_from_config(read_config(path), layout)
    plan = single_tier_plan(layout, "cpu.torch", "bf16")
    backend = registry.backend("cpu.torch").create(zen4)
    rounds = check_decode(plan, parts, backend, zen4, layers=2, rounds=2, steps=3)
    assert len(rounds) == 2
    for r in rounds:
        assert r.read_gb_per_s > 0 and r.predicted_s > 0 and r.measured_s > 0
        assert r.error == pytest.approx((r.predicted_s - r.measured_s) / r.measured_s)
    mixed = PlacementPlan(plan.model, (LayerPlacement(1, (
        ShardSpec("cpu:numa0", "cpu.torch", "bf16", (0, 1, 2, 3)), ShardSpec("cpu:numa0", "cpu.torch", "fp32", (4, 5, 6, 7)))),
        *plan.experts[1:]))
    with pytest.raises(SettingError, match="one CPU backend and format"):
        check_decode(mixed, parts, backend, zen4, layers=1, rounds=1, steps=1)


def test_cpu_format_is_as_shipped_or_asked_never_a_silent_conversion(registry, zen4):
    info = resolve_model("DeepSeek-V3", registry)
    budgets = make_budgets(info.parts, zen4, registry.tiers.values(), gpu_mem=parse_size("24GiB"))
    with pytest.raises(SettingError, match="backend cpu.x does not compute fp8_e4m3, the format this model's experts "
                                           r"are shipped in; give --cpu-format \(one of bf16, int8\)"):
        tier_compute(info.layout, budgets, cpu_backend="cpu.x", cpu_formats=("bf16", "int8"),
                     accelerator_backends={"cuda": "cuda"})
    compute = tier_compute(info.layout, budgets, cpu_backend="cpu.x", cpu_formats=("bf16", "int8"),
                           accelerator_backends={"cuda": "cuda"}, cpu_format="int8")
    assert compute["cpu:numa0"].fmt == "int8" and compute["cuda:0"].fmt == "fp8_e4m3"
    with pytest.raises(SettingError, match="--cpu-format int4_g64: backend cpu.x does not compute it"):
        tier_compute(info.layout, budgets, cpu_backend="cpu.x", cpu_formats=("bf16", "int8"),
                     accelerator_backends={"cuda": "cuda"}, cpu_format="int4_g64")
