"""Each built-in placement strategy's defining property, the explicit rules, and the out-of-tree example
strategy (docs/examples/moetier-back-loading) found through its own entry point."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from moetier.errors import BudgetError, SettingError
from moetier.experts import ExpertLayerSpec
from moetier.layout import MoELayerLayout, MoELayout, RouterSpec, TensorNames
from moetier.placement import ActivationStats, PlacementProblem, spread_order
from moetier.placement.cost import expert_savings, probabilities
from moetier.placement.plan import ModelRef
from moetier.placement.speeds import Speeds, TierSpeed
from moetier.placement.strategy import ExpertTier
from moetier.plugins import load_registry

L, E, K, H, I = 6, 16, 2, 64, 32
ONE = ExpertLayerSpec(E, K, H, I).expert_bytes("bf16")
EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"


def layout(first_dense: int = 1) -> MoELayout:
    spec = ExpertLayerSpec(E, K, H, I)
    names = TensorNames(block="model.layers.{layer}.mlp")
    moe = tuple(MoELayerLayout(i, spec, RouterSpec(E, K, "softmax", renormalize=True), names)
                for i in range(first_dense, first_dense + L))
    return MoELayout("test", "Test-MoE", L + first_dense, H, moe, dense_layers=tuple(range(first_dense)),
                     dense_intermediate_size=96)


def skewed_stats(lay: MoELayout, seed: int = 0, layer_tokens=None) -> ActivationStats:
    """Zipf-like counts per layer with a different hot set per layer; layer_tokens scales layers."""
    g = torch.Generator().manual_seed(seed)
    counts = []
    for r in range(L):
        base = (1000.0 / torch.arange(1, E + 1, dtype=torch.float64) ** 1.1)
        perm = torch.randperm(E, generator=g)
        scale = 1.0 if layer_tokens is None else layer_tokens[r]
        counts.append((base[perm] * scale).round().to(torch.int64))
    c = torch.stack(counts)
    return ActivationStats(lay.moe_layer_indices, E, c, c.sum(dim=1) // K)


def problem(lay, fast_experts: int, stats=None, **options) -> PlacementProblem:
    tiers = (ExpertTier("cuda:0", "accelerator", fast_experts * ONE, "bf16"), ExpertTier("cpu:numa0", "cpu", None, "bf16"))
    speeds = Speeds({"cuda:0": TierSpeed(1000.0, 1e5, 2e5, "t", overlap=True), "cpu:numa0": TierSpeed(50.0, 500.0, 1e3, "t")})
    return PlacementProblem(lay, tiers, stats, options, speeds, context=512, batch=1)


@pytest.fixture(scope="module")
def strategies():
    return load_registry().placements


def fast_set(assignment) -> set[tuple[int, int]]:
    return {(i, e) for i, tiers in assignment.items() for e, t in enumerate(tiers) if t == "cuda:0"}


def served(stats, chosen) -> int:
    return sum(int(stats.row(i)[e]) for i, e in chosen)


def test_uniform_without_statistics_spreads_ids_evenly_per_layer(strategies):
    lay = layout()
    a = strategies["uniform"].place(problem(lay, 20))
    fast = fast_set(a)
    per_layer = [sum(1 for i, _ in fast if i == layer) for layer in lay.moe_layer_indices]
    assert sum(per_layer) == 20 and max(per_layer) - min(per_layer) <= 1
    for layer in lay.moe_layer_indices:
        ids = sorted(e for i, e in fast if i == layer)
        assert ids == sorted(spread_order(E)[:len(ids)]) and ids in ([0, 4, 8], [0, 4, 8, 12])  # never 0..n-1
    assert spread_order(8) == [0, 4, 2, 6, 1, 5, 3, 7] and sorted(spread_order(60)) == list(range(60))


def test_uniform_with_statistics_takes_the_hottest_of_each_layer(strategies):
    lay = layout()
    stats = skewed_stats(lay)
    fast = fast_set(strategies["uniform"].place(problem(lay, 18, stats)))
    for layer in lay.moe_layer_indices:
        ids = {e for i, e in fast if i == layer}
        hottest = set(torch.argsort(stats.row(layer), descending=True)[:3].tolist())
        assert ids == hottest


def test_frequency_serves_the_largest_share_of_activations(strategies):
    lay = layout()
    stats = skewed_stats(lay, layer_tokens=[1, 1, 4, 1, 1, 0.25])
    budget = 17
    shares = {}
    for name in ("frequency", "frequency-per-layer", "uniform", "front-loading", "random", "cost"):
        fast = fast_set(strategies[name].place(problem(lay, budget, stats, seed=1)))
        assert len(fast) == budget
        shares[name] = served(stats, fast)
    best = sorted((int(stats.row(i)[e]) for i in lay.moe_layer_indices for e in range(E)), reverse=True)[:budget]
    assert shares["frequency"] == sum(best)  # the optimum for equal-size experts
    assert all(shares["frequency"] >= v for v in shares.values())
    assert shares["frequency"] > shares["uniform"] and shares["frequency"] > shares["random"]


def test_frequency_per_layer_bounds_hold(strategies):
    lay = layout()
    stats = skewed_stats(lay, layer_tokens=[1, 1, 20, 1, 1, 1])
    free = fast_set(strategies["frequency"].place(problem(lay, 24, stats)))
    per = [sum(1 for i, _ in free if i == layer) for layer in lay.moe_layer_indices]
    assert max(per) > 6 and min(per) < 2  # unbounded, the loud layer takes most
    bounded = fast_set(strategies["frequency"].place(problem(lay, 24, stats, min_per_layer=2, max_per_layer=6)))
    per = [sum(1 for i, _ in bounded if i == layer) for layer in lay.moe_layer_indices]
    assert sum(per) == 24 and all(2 <= n <= 6 for n in per)
    with pytest.raises(SettingError, match="--min-per-layer 5 exceeds --max-per-layer 3"):
        strategies["frequency"].place(problem(lay, 24, stats, min_per_layer=5, max_per_layer=3))
    with pytest.raises(BudgetError, match="--min-per-layer 5: 30 experts must fit"):
        strategies["frequency"].place(problem(lay, 24, stats, min_per_layer=5))


def test_frequency_per_layer_ranks_by_share_within_each_layer(strategies):
    lay = layout()
    stats = skewed_stats(lay, layer_tokens=[1, 1, 20, 1, 1, 1])
    fast = fast_set(strategies["frequency-per-layer"].place(problem(lay, 12, stats)))
    shares = stats.shares()
    ranked = sorted(((float(shares[r, e]), i, e) for r, i in enumerate(lay.moe_layer_indices) for e in range(E)),
                    key=lambda x: (-x[0], x[1], x[2]))
    assert fast == {(i, e) for _, i, e in ranked[:12]}
    per = [sum(1 for i, _ in fast if i == layer) for layer in lay.moe_layer_indices]
    assert max(per) <= 3  # the loud layer does not take everything


def test_frequency_refuses_to_run_without_statistics(strategies):
    with pytest.raises(SettingError, match="strategy 'frequency' ranks experts by recorded activations: give --stats"):
        strategies["frequency"].place(problem(layout(), 8))


def test_front_loading_fills_the_earliest_layers(strategies):
    lay = layout()
    fast = fast_set(strategies["front-loading"].place(problem(lay, 2 * E + 5)))
    first, second, third = lay.moe_layer_indices[:3]
    assert {e for i, e in fast if i == first} == set(range(E)) == {e for i, e in fast if i == second}
    assert sorted(e for i, e in fast if i == third) == sorted(spread_order(E)[:5])
    assert not any(i > third for i, _ in fast)


def test_random_is_reproducible_and_seeded(strategies):
    lay = layout()
    a = fast_set(strategies["random"].place(problem(lay, 30, seed=7)))
    b = fast_set(strategies["random"].place(problem(lay, 30, seed=7)))
    c = fast_set(strategies["random"].place(problem(lay, 30, seed=8)))
    assert a == b and a != c and len(a) == 30


def test_cost_takes_the_most_time_saved_per_byte(strategies):
    lay = layout()
    stats = skewed_stats(lay, layer_tokens=[1, 3, 1, 1, 2, 1])
    p = problem(lay, 15, stats, decode_share=0.8)
    fast = fast_set(strategies["cost"].place(p))
    model = ModelRef.of(lay)
    saved = expert_savings(model.layers, probabilities(model.layers, stats), p.speeds.of("cuda:0"), "bf16",
                           p.speeds.of("cpu:numa0"), "bf16", batch=1, context=512, decode_share=0.8, hidden=H)
    chosen = [float(saved[i][e]) for i, e in fast]
    rest = [float(saved[i][e]) for i in lay.moe_layer_indices for e in range(E) if (i, e) not in fast]
    assert len(fast) == 15 and min(chosen) >= max(rest) and min(chosen) > 0  # equal sizes: per byte = per expert


# ---- explicit rules ----------------------------------------------------------------------------------------

def test_explicit_rules_place_what_they_name(strategies):
    lay = layout()
    a = strategies["explicit"].place(problem(lay, 40, rules=["layers.2-3.experts.0-3,9=gpu",
                                                             r"layers\.5\.mlp\.experts\.(7|8)\.=cuda:0"]))
    fast = fast_set(a)
    assert {(i, e) for i in (2, 3) for e in (0, 1, 2, 3, 9)} | {(5, 7), (5, 8)} <= fast
    # first match wins: layer 2 expert 0 is claimed by the first rule, the second adds the rest of layer 2
    a = strategies["explicit"].place(problem(lay, 40, rules=["layers.2.experts.0=cpu", "layers.2.experts.*=gpu"]))
    assert a[2][0] == "cpu:numa0" and all(t == "cuda:0" for t in a[2][1:])


@pytest.mark.parametrize("rule,message", [
    ("layers.1-2.experts.0-3", "does not parse: expected PATTERN=TIER"),
    ("layers.1-x.experts.0=gpu", "does not parse: '1-x' is not a number"),
    ("layers.9-20.experts.0=gpu", "matches no routed expert of Test-MoE"),
    ("layers.3-1.experts.0=gpu", "range 3-1 runs backwards"),
    ("experts\\.(=gpu", "is not a valid regular expression"),
    ("self_attn=gpu", "matches no routed expert"),
    ("gate_proj=gpu", "matches model.layers.1.mlp.experts.0.gate_proj but not model.layers.1.mlp.experts.0.down_proj"),
    ("layers.1.experts.0=cuda:7", "names tier 'cuda:7', which is not here"),
])
def test_explicit_rule_errors_name_the_rule(strategies, rule, message):
    with pytest.raises(SettingError) as exc:
        strategies["explicit"].place(problem(layout(), 10, rules=[rule]))
    assert repr(rule) in str(exc.value) and message in str(exc.value)


def test_explicit_rule_claimed_by_an_earlier_one_matches_nothing(strategies):
    with pytest.raises(SettingError, match="'layers.1.experts.3=gpu' matches no .* claimed by an earlier rule"):
        strategies["explicit"].place(problem(layout(), 10, rules=["layers.1.experts.*=cpu", "layers.1.experts.3=gpu"]))


# ---- the out-of-tree example ---------------------------------------------------------------------------------

@pytest.fixture
def back_loading(install_plugin):
    import tomllib

    example = EXAMPLES / "moetier-back-loading"
    meta = tomllib.loads((example / "pyproject.toml").read_text())
    eps = dict(meta["project"]["entry-points"]["moetier"])
    install_plugin(meta["project"]["name"], eps, package_dir=example / "moetier_back_loading")
    yield meta["project"]["name"]
    for mod in [m for m in sys.modules if m.startswith("moetier_back_loading")]:
        del sys.modules[mod]


def test_example_strategy_is_discovered_and_used(back_loading, capsys, tmp_path):
    from moetier.cli import main

    registry = load_registry()
    s = registry.placement("back-loading")
    owner = registry.owners[("placement strategy", "back-loading")]
    assert {p.name: p.distribution for p in registry.plugins}[owner] == back_loading
    lay = layout()
    fast = fast_set(s.place(problem(lay, E + 3)))
    last, before = lay.moe_layer_indices[-1], lay.moe_layer_indices[-2]
    assert {e for i, e in fast if i == last} == set(range(E)) and len([1 for i, _ in fast if i == before]) == 3

    assert main(["plan", "--list-strategies", "--inventory", str(Path(__file__).parent / "inventories" /
                                                                   "zen4_avx512_2core.json")]) == 0
    assert "back-loading" in capsys.readouterr().out
    out = tmp_path / "plan.json"
    assert main(["plan", "Qwen3-30B-A3B", "--strategy", "back-loading", "--gpu-mem", "12GiB", "--json", str(out),
                 "--inventory", str(Path(__file__).parent / "inventories" / "xeon_amx_2socket_rtx4090.json")]) == 0
    capsys.readouterr()
    plan = json.loads(out.read_text())
    assert plan["strategy"]["name"] == "back-loading"
    on_gpu = [p["layer"] for p in plan["experts"] if any(s["tier"] == "cuda:0" for s in p["shards"])]
    assert on_gpu and on_gpu[-1] == 47 and on_gpu == list(range(on_gpu[0], 48))
    assert main(["plan", "--list-strategies", "--no-plugins", "--inventory",
                 str(Path(__file__).parent / "inventories" / "zen4_avx512_2core.json")]) == 0
    assert "back-loading" not in capsys.readouterr().out
