"""The one router implementation: a RouterSpec plus the router tensors -> top-k expert ids and weights.

Everything is computed in fp32 whatever the input dtype (DeepSeek/GLM/Kimi keep their routers in fp32,
and routing decisions must not depend on the activation dtype). Ids come out sorted by descending
selection score.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import DTypeError, ShapeError
from ..layout import RouterSpec


def router_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """hidden [T, H] . weight[E, H]^T (+ bias) in fp32."""
    return F.linear(hidden.to(torch.float32), weight.to(torch.float32),
                    None if bias is None else bias.to(torch.float32))


def route(spec: RouterSpec, hidden: torch.Tensor, weight: torch.Tensor,
          selection_bias: torch.Tensor | None = None,
          logit_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (topk_ids int64 [T, k], topk_weights fp32 [T, k]) for hidden [T, H]."""
    _check(spec, hidden, weight, selection_bias, logit_bias)
    logits = router_logits(hidden, weight, logit_bias if spec.logit_bias else None)
    k = spec.top_k
    if spec.scoring == "softmax_topk":
        # gpt-oss: choose by raw logits, then softmax over the chosen k only.
        values, ids = torch.topk(logits, k, dim=-1)
        return ids, torch.softmax(values, dim=-1)
    scores = torch.softmax(logits, dim=-1) if spec.scoring == "softmax" else torch.sigmoid(logits)
    choice = scores + selection_bias.to(torch.float32) if spec.selection_bias else scores
    if spec.n_group > 1:
        T, E = choice.shape
        grouped = choice.view(T, spec.n_group, E // spec.n_group)
        if spec.group_score == "max":
            group_scores = grouped.max(dim=-1).values
        else:
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        keep = torch.topk(group_scores, spec.topk_group, dim=-1).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        expert_mask = group_mask.unsqueeze(-1).expand(T, spec.n_group, E // spec.n_group).reshape(T, E)
        choice = choice.masked_fill(~expert_mask, float("-inf"))
    ids = torch.topk(choice, k, dim=-1).indices
    weights = scores.gather(1, ids)  # selection bias chooses, it never weighs
    if spec.renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + spec.renorm_eps)
    if spec.scaling != 1.0:
        weights = weights * spec.scaling
    return ids, weights


def _check(spec, hidden, weight, selection_bias, logit_bias) -> None:
    if hidden.ndim != 2:
        raise ShapeError(f"router input must be [T, H], got {list(hidden.shape)}")
    if not hidden.is_floating_point():
        raise DTypeError(f"router input must be floating point, got {hidden.dtype}")
    if tuple(weight.shape) != (spec.num_experts, hidden.shape[1]):
        raise ShapeError(f"router weight must be [{spec.num_experts}, {hidden.shape[1]}], got {list(weight.shape)}")
    for flag, t, what in ((spec.selection_bias, selection_bias, "selection bias"), (spec.logit_bias, logit_bias, "logit bias")):
        if flag and (t is None or tuple(t.shape) != (spec.num_experts,)):
            raise ShapeError(f"router {what} must be [{spec.num_experts}], got {None if t is None else list(t.shape)}")
