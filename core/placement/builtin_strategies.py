"""moetier's own placement strategies, a plugin of the `moetier` entry-point group like any other.

uniform             the same number of fast-tier experts in every MoE layer: the hottest of each layer
                    when statistics exist, spread over the ids otherwise
frequency           one global ranking by activation count (layers get unequal shares), per-layer bounds
frequency-per-layer counts normalized within each layer, then one global ranking, per-layer bounds
front-loading       the earliest MoE layers first (hottest first within a layer)
random              a seeded random order over all (layer, expert) pairs
cost                greedy on predicted time saved per byte of the fast tier, from the activation
                    probabilities and the tiers' measured speeds, for a decode/prefill mix
explicit            rules (`layers.A-B.experts.C-D=TIER` or regexes over tensor names), first match wins;
                    the rest as uniform
"""
from __future__ import annotations

import torch

import moetier

from ..errors import SettingError
from .rules import resolve_rules
from .strategy import PlacementProblem, PlacementStrategy, round_robin

BOUNDS = ("min_per_layer", "max_per_layer")


def uniform(problem: PlacementProblem):
    return problem.fill(round_robin({i: problem.ranked(i) for i in problem.moe_layers}))


def frequency(problem: PlacementProblem):
    stats = problem.require_stats("frequency")
    pairs = [(int(-stats.row(i)[e]), i, e) for i in problem.moe_layers for e in range(problem.num_experts(i))]
    order = [(i, e) for _, i, e in sorted(pairs)]
    return problem.fill(order, min_fast=problem.options.get("min_per_layer"),
                        max_fast=problem.options.get("max_per_layer"))


def frequency_per_layer(problem: PlacementProblem):
    stats = problem.require_stats("frequency-per-layer")
    shares = stats.shares()
    rows = {layer: r for r, layer in enumerate(stats.layers)}
    pairs = [(-float(shares[rows[i], e]), i, e) for i in problem.moe_layers for e in range(problem.num_experts(i))]
    order = [(i, e) for _, i, e in sorted(pairs)]
    return problem.fill(order, min_fast=problem.options.get("min_per_layer"),
                        max_fast=problem.options.get("max_per_layer"))


def front_loading(problem: PlacementProblem):
    return problem.fill([(i, e) for i in problem.moe_layers for e in problem.ranked(i)])


def random_order(problem: PlacementProblem):
    seed = int(problem.options.get("seed") or 0)
    pairs = [(i, e) for i in problem.moe_layers for e in range(problem.num_experts(i))]
    perm = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))
    return problem.fill([pairs[k] for k in perm.tolist()])


def cost(problem: PlacementProblem):
    from .cost import expert_savings, probabilities
    from .plan import ModelRef

    classes = problem.classes
    if len(classes) < 2 or problem.speeds is None:
        return uniform(problem)  # one kind of tier: nothing to trade
    fast, slow = classes[0][0], classes[1][0]
    model = ModelRef.of(problem.layout)
    probs = probabilities(model.layers, problem.stats)
    fmts = {t.name: {i: problem.compute_format(i, t.name) for i in problem.moe_layers} for t in (fast, slow)}
    slow_bytes = {}
    if slow.kind == "disk":  # read as shipped; a layer that cannot stay on disk is refused when filled there
        for i in problem.moe_layers:
            try:
                slow_bytes[i] = problem.expert_bytes(i, slow.name)
            except SettingError:
                pass
    saved = expert_savings(model.layers, probs, problem.speeds.of(fast.name), fmts[fast.name],
                           problem.speeds.of(slow.name), fmts[slow.name], slow_bytes=slow_bytes, batch=problem.batch, context=problem.context,
                           decode_share=float(problem.options.get("decode_share", 0.5)),
                           hidden=problem.layout.hidden_size)
    keyed = []
    for i in problem.moe_layers:
        per_byte = saved[i] / problem.expert_bytes(i, fast.name)
        ranked = problem.ranked(i)  # ties (uniform probabilities) broken hottest-first / spread
        rank = {e: r for r, e in enumerate(ranked)}
        keyed += [(-float(per_byte[e]), rank[e], i, e) for e in range(problem.num_experts(i))]
    order = [(i, e) for *_, i, e in sorted(keyed)]
    return problem.fill(order, min_fast=problem.options.get("min_per_layer"),
                        max_fast=problem.options.get("max_per_layer"))


def explicit(problem: PlacementProblem):
    rules = problem.options.get("rules") or ()
    if not rules:
        raise SettingError("strategy 'explicit' needs rules: --rule PATTERN=TIER (repeatable) or --rules FILE")
    pinned = resolve_rules(rules, problem.layout, [t.name for t in problem.tiers])
    rest = [p for p in round_robin({i: problem.ranked(i) for i in problem.moe_layers}) if p not in pinned]
    return problem.fill(rest, pinned=pinned)


STRATEGIES = (
    PlacementStrategy("uniform", "the same number of fast-tier experts per MoE layer: the hottest of each layer "
                      "with statistics, spread over the ids without", uniform),
    PlacementStrategy("frequency", "one global ranking by activation count; layers get unequal shares",
                      frequency, needs_stats=True, options=BOUNDS),
    PlacementStrategy("frequency-per-layer", "activation counts normalized within each layer, then ranked",
                      frequency_per_layer, needs_stats=True, options=BOUNDS),
    PlacementStrategy("front-loading", "the earliest MoE layers first", front_loading),
    PlacementStrategy("random", "a seeded random order over all (layer, expert) pairs", random_order,
                      options=("seed",)),
    PlacementStrategy("cost", "greedy on predicted time saved per byte of the fast tier, for a decode/prefill mix",
                      cost, options=BOUNDS + ("decode_share",)),
    PlacementStrategy("explicit", "rules: layers.A-B.experts.C-D=TIER or regexes over tensor names, first match "
                      "wins; the rest as uniform", explicit, options=("rules",)),
)


@moetier.hookimpl
def moetier_register_placements(register):
    for s in STRATEGIES:
        register(s)
