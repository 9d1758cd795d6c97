"""The "moetier" experts implementation: the function transformers' experts modules dispatch to.

transformers 5 routes every MoE experts module's forward through a registry keyed by
`config._experts_implementation` (`ExpertsInterface`; FP8 checkpoints loaded by transformers' own FP8
quantizer swap the module for one that looks up `FP8ExpertsInterface` instead). The router has run
before the call and the shared experts are added after it, so the function only computes the weighted
sum over the routed experts: here, on the moetier runtime layer attached to the module at load.
"""
from __future__ import annotations

import torch

from ...errors import SettingError

IMPLEMENTATION = "moetier"
# Set on every routed-experts module by moetier.load (transformers' experts modules carry no layer index).
LAYER_ATTR = "moetier_layer_index"
RUNTIME_ATTR = "moetier_experts"


def experts_forward(module: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """[T, H] hidden, [T, k] ids and weights -> [T, H] in hidden's dtype, computed by the TieredExperts of
    the module's layer (wherever its experts live)."""
    layer = getattr(module, RUNTIME_ATTR, None)
    if layer is None:
        raise SettingError(f"{type(module).__name__} has no moetier experts attached: experts_implementation="
                           f"'{IMPLEMENTATION}' needs a model loaded by moetier.load")
    return layer(hidden_states, top_k_index, top_k_weights, out_dtype=hidden_states.dtype)


def register() -> None:
    """Register the implementation in both of transformers' experts registries (idempotent). It must be
    registered before a model names it: transformers checks the name when the model is built."""
    from transformers.integrations.finegrained_fp8 import FP8ExpertsInterface
    from transformers.integrations.moe import ExpertsInterface

    for interface in (ExpertsInterface, FP8ExpertsInterface):
        interface.register(IMPLEMENTATION, experts_forward)
