"""The cost model: predicted decode and prefill time of every layer under a plan.

Per MoE layer and tier, for B tokens (a decode step of `batch` sequences, or a prompt of `context`
tokens), with p_e the chance that one token routes to expert e (activation statistics, or k/E):

    bytes_t = sum over the tier's experts of P(expert touched) x its bytes in the tier's format,
              P(touched) = 1 - (1 - p_e)^B
    flops_t = B x sum p_e x 6 H I            (gate, up, down: 2 FLOP per multiply-add)
    time_t  = bytes_t / read_bw_t + flops_t / peak_t    (CPU: the kernels do not hide DRAM waits fully)
            = max(bytes_t / read_bw_t, flops_t / peak_t) (accelerators)

The tier holding the non-expert parts adds the layer's shared expert and router; the tiers run at once,
so the MoE part takes the slowest tier plus a fixed per-layer overhead (routing, dispatch; host round
trips when the layer joins an accelerator and the CPU). Attention runs before it on its tier: its weights
and the KV cache of `context` tokens read per decode step, its projections and scores computed. A decode
step adds the LM head once. tokens/s = B / the sum over layers. The part that bounds each layer is the
tier (and "read" or "compute") whose time is largest.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .model_parts import ModelParts
from .plan import DISK, PlacementPlan
from .speeds import Speeds, TierSpeed

GB = 1e9


@dataclass(frozen=True)
class LayerCost:
    """One decoder layer: decode_s for one decode step (all of `batch`), decode_moe_s its MoE part alone
    (routed experts, shared expert, router, overhead: what a run of the MoE layers measures), prefill_s
    for the prompt; the bound names the tier and resource that took longest."""

    layer: int
    moe: bool
    decode_s: float
    decode_moe_s: float
    decode_bound: str
    prefill_s: float
    prefill_bound: str


@dataclass(frozen=True)
class Prediction:
    layers: tuple[LayerCost, ...]
    batch: int
    prompt_tokens: int
    head_decode_s: float  # the LM head per decode step
    notes: tuple[str, ...] = ()

    @property
    def decode_step_s(self) -> float:
        return sum(c.decode_s for c in self.layers) + self.head_decode_s

    @property
    def decode_moe_s(self) -> float:
        return sum(c.decode_moe_s for c in self.layers if c.moe)

    @property
    def prefill_s(self) -> float:
        return sum(c.prefill_s for c in self.layers)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.batch / self.decode_step_s

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s

    def bounds(self, which: str = "decode") -> dict[str, int]:
        """bound -> how many layers it bounds."""
        out: dict[str, int] = {}
        for c in self.layers:
            b = c.decode_bound if which == "decode" else c.prefill_bound
            out[b] = out.get(b, 0) + 1
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def probabilities(shapes: Sequence, stats=None) -> dict[int, torch.Tensor]:
    """layer -> float64 [E] for each MoE layer shape (plan.model.layers): the chance that one token routes
    to each expert; from `stats` where they have tokens for the layer, else k/E (uniform)."""
    out = {}
    probs = stats.probabilities() if stats is not None else None
    rows = {layer: i for i, layer in enumerate(stats.layers)} if stats is not None else {}
    for shape in shapes:
        p = None
        if probs is not None and shape.index in rows:
            r = probs[rows[shape.index]]
            if torch.isfinite(r).all() and r.sum() > 0:
                p = (r * (shape.top_k / r.sum())).clamp(max=1.0)  # rows sum to k even for dumps without tokens
        out[shape.index] = p if p is not None else torch.full((shape.num_experts,), shape.top_k / shape.num_experts,
                                                              dtype=torch.float64)
    return out


def _tier_time(speed: TierSpeed, nbytes: float, flops: float, fmt: str) -> tuple[float, str]:
    read = nbytes / (speed.read_for(fmt) * GB)
    comp = flops / (speed.peak(fmt) * GB)
    t = max(read, comp) if speed.overlap else read + comp
    return t, "read" if read >= comp else "compute"


def expert_time(speed: TierSpeed, expert_bytes: int, p: torch.Tensor, tokens: int, flops_per_pair: int,
                fmt: str) -> torch.Tensor:
    """Per expert: the time its share of `tokens` costs on a tier (touch probability x bytes / bandwidth
    + expected pairs x FLOP / peak; the max of the two on overlapping tiers)."""
    touched = 1.0 - (1.0 - p).pow(tokens)
    read = touched * expert_bytes / (speed.read_for(fmt) * GB)
    comp = tokens * p * flops_per_pair / (speed.peak(fmt) * GB)
    return torch.maximum(read, comp) if speed.overlap else read + comp


def predict(plan: PlacementPlan, parts: ModelParts, speeds: Speeds, stats=None, *, context: int | None = None,
            batch: int | None = None) -> Prediction:
    """Predicted time per layer of a decode step (`batch` sequences at `context` tokens of cache) and of a
    `context`-token prompt, under `plan` (defaults: the plan's context and batch)."""
    context = context or plan.context or 4096
    batch = batch or plan.batch or 1
    lay = parts.layout
    H = lay.hidden_size
    probs = probabilities(plan.model.layers, stats)
    parts_tier = plan.part_tiers.get("attention") or plan.tier_names[0]
    ps = speeds.of(parts_tier)
    lb = parts.linear_bytes_per_param
    fmt_parts = "bf16"
    costs = []
    for i in range(lay.num_hidden_layers):
        att = parts.attention[i]
        # attention: weights and cache read per decode step; projections and scores computed
        kv_read = batch * att.cache_bytes(context, 1)
        att_flops_dec = batch * (2 * att.params + 2 * att.pair_macs * min(context, att.window or context)
                                 + 2 * att.token_macs)
        att_dec, _ = _tier_time(ps, att.params * lb + kv_read, att_flops_dec, fmt_parts)
        span = context if att.window is None else min(context, att.window)
        att_flops_pre = 2 * att.params * context + 2 * att.pair_macs * context * span / 2 + 2 * att.token_macs * context
        att_pre, _ = _tier_time(ps, att.params * lb, att_flops_pre, fmt_parts)
        if i in lay.dense_layers:
            w = 3 * H * (lay.dense_intermediate_size or 0)
            d, _ = _tier_time(ps, w * lb, 2 * w * batch, fmt_parts)
            p_, _ = _tier_time(ps, w * lb, 2 * w * context, fmt_parts)
            costs.append(LayerCost(i, False, att_dec + d, 0.0, f"{parts_tier} (dense layer)", att_pre + p_,
                                   f"{parts_tier} (dense layer)"))
            continue
        m = lay.layer(i)
        shape = plan.model.layer(i)
        spec = shape.spec(H)
        per_pair = 6 * H * spec.intermediate_size
        p = probs[i]
        dec: dict[str, tuple[float, str]] = {}
        pre: dict[str, tuple[float, str]] = {}
        # the shared expert and the router run on the parts tier, every token
        shared_w = 0 if m.shared is None else 3 * H * m.shared.intermediate_size
        router_w = m.router.num_experts * H
        for tokens, table in ((batch, dec), (context, pre)):
            t, what = _tier_time(ps, shared_w * lb + 4 * router_w, 2 * (shared_w + router_w) * tokens, fmt_parts)
            table[parts_tier] = (t, what)
        for s in plan.shards(i):
            if not s.experts:
                continue
            speed = speeds.of(s.tier)
            idx = torch.tensor(s.experts)
            fmt_bytes = spec.expert_bytes(plan.model.shipped(i) if s.tier == DISK else s.fmt)
            for tokens, table in ((batch, dec), (context, pre)):
                touched = float((1.0 - (1.0 - p[idx]).pow(tokens)).sum())
                flops = tokens * float(p[idx].sum()) * per_pair
                t, what = _tier_time(speed, touched * fmt_bytes, flops, s.fmt)
                prev, prev_what = table.get(s.tier, (0.0, what))
                table[s.tier] = (prev + t, what if t >= prev else prev_what)
        hybrid = any(speeds.of(t).overlap for t in dec) and any(not speeds.of(t).overlap for t in dec)
        overhead = speeds.layer_overhead_s + (speeds.hybrid_overhead_s if hybrid else 0.0)
        tier_d = max(dec, key=lambda t: dec[t][0])
        tier_p = max(pre, key=lambda t: pre[t][0])
        moe_d = dec[tier_d][0] + overhead
        moe_p = pre[tier_p][0] + overhead
        bound_d = f"{tier_d} {dec[tier_d][1]}" if dec[tier_d][0] >= att_dec else f"{parts_tier} attention"
        bound_p = f"{tier_p} {pre[tier_p][1]}" if pre[tier_p][0] >= att_pre else f"{parts_tier} attention"
        costs.append(LayerCost(i, True, att_dec + moe_d, moe_d, bound_d, att_pre + moe_p, bound_p))
    head_bytes = (parts.part_bytes["lm_head"] or parts.part_bytes["embeddings"])
    head, _ = _tier_time(ps, head_bytes, 2 * parts.vocab_size * H * batch, fmt_parts)
    notes = (f"decode: {batch} sequence(s) at {context} tokens of context; prefill: one {context}-token prompt",
             f"fixed cost per MoE layer {speeds.layer_overhead_s * 1e6:.0f} us"
             + (f" (+{speeds.hybrid_overhead_s * 1e6:.0f} us when it joins an accelerator and the CPU)"
                if any(s.overlap for s in speeds.tiers.values()) else ""),
             "routing probabilities " + ("from the activation statistics" if stats is not None else
                                         "uniform (k/E; no statistics given)"))
    return Prediction(tuple(costs), batch, context, head, notes)


def expert_savings(plan_shapes: Sequence, probs: dict[int, torch.Tensor], fast: TierSpeed,
                   fast_fmt: str | Mapping[int, str], slow: TierSpeed, slow_fmt: str | Mapping[int, str], *,
                   batch: int, context: int, decode_share: float, hidden: int,
                   slow_bytes: Mapping[int, int] | None = None) -> dict[int, torch.Tensor]:
    """layer -> [E] seconds saved per token of the workload by an expert living on the fast tier instead
    of the slow one: decode_share of the tokens are decode steps of `batch` tokens, the rest prompts of
    `context` tokens (the cost strategy ranks experts by this over their bytes on the fast tier). The
    formats the tiers compute in: one for every layer, or one per layer. slow_bytes: layer -> bytes one
    expert reads on the slow tier where that is not its compute format's (the disk tier reads as shipped)."""
    out = {}
    for shape in plan_shapes:
        spec = shape.spec(hidden)
        fast_fmt_i = fast_fmt if isinstance(fast_fmt, str) else fast_fmt[shape.index]
        slow_fmt_i = slow_fmt if isinstance(slow_fmt, str) else slow_fmt[shape.index]
        p = probs[shape.index]
        per_pair = 6 * hidden * spec.intermediate_size
        slow_read = dict(slow_bytes or {}).get(shape.index) or spec.expert_bytes(slow_fmt_i)
        d = (expert_time(slow, slow_read, p, batch, per_pair, slow_fmt_i)
             - expert_time(fast, spec.expert_bytes(fast_fmt_i), p, batch, per_pair, fast_fmt_i)) / batch
        pf = (expert_time(slow, slow_read, p, context, per_pair, slow_fmt_i)
              - expert_time(fast, spec.expert_bytes(fast_fmt_i), p, context, per_pair, fast_fmt_i)) / context
        out[shape.index] = decode_share * d + (1.0 - decode_share) * pf
    return out
