"""The runtime: routing, one MoE layer on a backend (moe_block), and checking a checkpoint's layers
against float64 (layer_check). The tiered layer and its shards grow here."""
