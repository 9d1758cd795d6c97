"""moetier inside transformers: the "moetier" experts implementation and `load`, which returns a
transformers model whose routed experts run on moetier's runtime.

    import moetier
    model = moetier.load("path/to/checkpoint", dtype=torch.bfloat16)
    out = model.generate(input_ids, max_new_tokens=32)
    model.moetier_experts.bytes_per_tier()
"""
from .experts import IMPLEMENTATION, LAYER_ATTR, RUNTIME_ATTR, experts_forward, register
from .loader import load

__all__ = ["IMPLEMENTATION", "LAYER_ATTR", "RUNTIME_ATTR", "experts_forward", "load", "register"]
