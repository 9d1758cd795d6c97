"""One MoE forward over a prepared device layer: sort pairs by expert, fused gate/up GEMM, activation
(fp32), down GEMM, weighted sum over each token's k experts (fp32, fixed order). The same function is
the eager forward and the decode step: with the "grouped" or "triton" GEMM it never reads the device
from the host and every shape depends only on T and k."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moetier.experts import ExpertLayerSpec

from .gemm import grouped_gemm, split_activations
from .layout import DeviceExperts
from .routing import dispatch


def activate(layer: ExpertLayerSpec, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """act(gate) * up in fp32; gpt-oss's swiglu_oai clamps and adds one to up (moetier.reference.expert_mlp)."""
    if layer.activation == "silu":
        return F.silu(g) * u
    g = g.clamp(max=layer.swiglu_limit)
    u = u.clamp(-layer.swiglu_limit, layer.swiglu_limit)
    return (u + 1) * (g * torch.sigmoid(layer.swiglu_alpha * g))


def moe_forward(experts: DeviceExperts, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                path: str, grouped_impl: str | None = None) -> torch.Tensor:
    """out [T, H] fp32 = sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(hidden[t]) over held experts."""
    layer = experts.layer
    T, H = hidden.shape
    I = layer.intermediate_size
    cdt = experts.compute_dtype
    d = dispatch(experts, topk_ids)
    split = split_activations(d, cdt)
    x = hidden.to(torch.float32)
    h = grouped_gemm(x, d.tokens, experts.w13, d, path, cdt, split=split, grouped_impl=grouped_impl)
    h = h.to(torch.float32)  # [N, 2I]
    if experts.b13 is not None:
        h = h + experts.b13.index_select(0, d.sorted_slots)
    a = activate(layer, h[:, :I], h[:, I:])
    y = grouped_gemm(a, None, experts.w2, d, path, cdt, grouped_impl=grouped_impl).to(torch.float32)  # [N, H]
    if experts.b2 is not None:
        y = y + experts.b2.index_select(0, d.sorted_slots)
    # Back to (token, j) order, then a fixed-order sum over j: deterministic, unlike index_add_ on a GPU.
    y_pairs = torch.empty_like(y).index_copy_(0, d.order, y).view(T, d.k, H)
    contrib = y_pairs * topk_weights.to(torch.float32).unsqueeze(2)
    # Pairs no held expert serves contribute exactly nothing, whatever their row (unspecified) or their
    # weight (even NaN) holds: select zeros there, after the product (0 * NaN would be NaN).
    held = (d.slots < experts.held).view(T, d.k, 1)
    return torch.where(held, contrib, torch.zeros((), dtype=contrib.dtype, device=contrib.device)).sum(dim=1)
