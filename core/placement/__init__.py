"""Placement: where every part of a model lives (PlacementPlan), the strategies that decide it, the cost
model that predicts its speed, and the activation statistics they use."""
