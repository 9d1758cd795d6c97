"""The runtime: routing, one MoE layer on a backend (moe_block), the tiered layer (shards in memory, the
disk tier with its cache and prefetcher), loading a checkpoint's experts where a plan puts them (loader),
and checking a checkpoint's layers against float64 (layer_check).

    from moetier.runtime import load_experts
    with load_experts("model-dir") as experts:      # or plan=PlacementPlan, cache_bytes=... for disk
        out = experts[layer_index](hidden, topk_ids, topk_weights)   # fp32 [T, H]
"""
from .loader import ModelExperts, load_experts
from .tiered import Shard, TieredExperts

__all__ = ["ModelExperts", "Shard", "TieredExperts", "load_experts"]
