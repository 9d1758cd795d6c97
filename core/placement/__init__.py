"""Placement: where every part of a model lives (PlacementPlan), the strategies that decide it, the cost
model that predicts its speed, and the activation statistics they use.

    from moetier.placement import PlacementPlan, ShardSpec, single_tier_plan, ActivationStats

    plan = PlacementPlan.load("plan.json")      # or single_tier_plan(layout, "cpu.avx512", "bf16")
    plan.validate(layout, budgets)              # before anything is read: LayoutError / PlanBudgetError
    for layer in plan.moe_layers:
        for shard in plan.shards(layer):        # ShardSpec(tier, backend, fmt, experts)
            ...
"""
from .budgets import Budgets, TierBudget, make_budgets
from .plan import (CopySpec, LayerPlacement, LayerShape, ModelRef, Overflow, PlacementPlan, PlanBudgetError, ShardSpec,
                   single_tier_plan)
from .sizes import format_size, parse_size
from .stats import ActivationStats
from .strategy import ExpertTier, PlacementProblem, PlacementStrategy, round_robin, spread_order

__all__ = ["ActivationStats", "Budgets", "CopySpec", "ExpertTier", "LayerPlacement", "LayerShape", "ModelRef",
           "Overflow", "PlacementPlan", "PlacementProblem", "PlacementStrategy", "PlanBudgetError", "ShardSpec",
           "TierBudget", "format_size", "make_budgets", "parse_size", "round_robin", "single_tier_plan",
           "spread_order"]
