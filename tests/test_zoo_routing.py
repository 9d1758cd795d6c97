"""The one router against an independent float64 reference written per token, and gpt-oss's router."""
from __future__ import annotations

import math
import random

import pytest
import torch

from moetier.errors import LayoutError, ShapeError
from moetier.layout import RouterSpec
from moetier.runtime.routing import route

SPECS = {
    "softmax-greedy": RouterSpec(16, 4, "softmax"),
    "softmax-renorm": RouterSpec(12, 3, "softmax", renormalize=True),
    "v2-group-max": RouterSpec(32, 4, "softmax", n_group=8, topk_group=3, group_score="max", scaling=16.0),
    "v3-group-top2": RouterSpec(32, 6, "sigmoid", selection_bias=True, n_group=8, topk_group=4,
                                group_score="top2_sum", renormalize=True, renorm_eps=1e-20, scaling=2.5),
    "sigmoid-bias": RouterSpec(8, 2, "sigmoid", selection_bias=True, renormalize=True),
    "softmax-topk-logit-bias": RouterSpec(8, 3, "softmax_topk", logit_bias=True),
}


def reference(spec: RouterSpec, x, w, sel, lb):
    """float64, one token at a time, straight from the formulas; also the smallest decision margin."""
    logits = x.double() @ w.double().T + (lb.double() if spec.logit_bias else 0)
    ids_all, w_all, margins = [], [], []
    for row in logits:
        row = row.tolist()
        E, k = len(row), spec.top_k
        if spec.scoring == "softmax_topk":
            order = sorted(range(E), key=lambda e: -row[e])
            ids = order[:k]
            m = max(row[e] for e in ids)
            ex = [math.exp(row[e] - m) for e in ids]
            ids_all.append(ids)
            w_all.append([v / sum(ex) for v in ex])
            margins.append(row[order[k - 1]] - row[order[k]])
            continue
        if spec.scoring == "softmax":
            m = max(row)
            ex = [math.exp(v - m) for v in row]
            s = [v / sum(ex) for v in ex]
        else:
            s = [1 / (1 + math.exp(-v)) for v in row]
        c = [s[e] + (float(sel[e]) if spec.selection_bias else 0.0) for e in range(E)]
        eligible = list(range(E))
        margin = math.inf
        if spec.n_group > 1:
            size = E // spec.n_group
            groups = [c[g * size:(g + 1) * size] for g in range(spec.n_group)]
            gs = [max(g) if spec.group_score == "max" else sum(sorted(g)[-2:]) for g in groups]
            gorder = sorted(range(spec.n_group), key=lambda g: -gs[g])
            keep = gorder[:spec.topk_group]
            margin = gs[gorder[spec.topk_group - 1]] - gs[gorder[spec.topk_group]]
            eligible = [e for e in range(E) if e // size in keep]
        order = sorted(eligible, key=lambda e: -c[e])
        ids = order[:k]
        if len(order) > k:
            margin = min(margin, c[order[k - 1]] - c[order[k]])
        wt = [s[e] for e in ids]
        if spec.renormalize:
            tot = sum(wt) + spec.renorm_eps
            wt = [v / tot for v in wt]
        ids_all.append(ids)
        w_all.append([v * spec.scaling for v in wt])
        margins.append(margin)
    return torch.tensor(ids_all), torch.tensor(w_all, dtype=torch.float64), torch.tensor(margins)


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_route_matches_float64_reference(name, dtype):
    spec = SPECS[name]
    seed = random.SystemRandom().randrange(2**31)
    g = torch.Generator().manual_seed(seed)
    H, T = 24, 64
    x = torch.randn(T, H, generator=g).to(dtype)
    w = torch.randn(spec.num_experts, H, generator=g) * 0.5
    sel = torch.randn(spec.num_experts, generator=g) * 0.1
    lb = torch.randn(spec.num_experts, generator=g) * 0.5
    ids, weights = route(spec, x, w, sel, lb)
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32 and ids.shape == (T, spec.top_k)
    ref_ids, ref_w, margin = reference(spec, x.float(), w, sel, lb)
    # Tokens whose decision is within fp32 rounding of a tie may legitimately go either way.
    clear = margin > 1e-5
    assert clear.float().mean() > 0.8, f"seed {seed}: too many near-ties to test"
    got_ids, order = ids.sort(dim=-1)
    want_ids, want_order = ref_ids.sort(dim=-1)
    assert torch.equal(got_ids[clear], want_ids[clear]), f"seed {seed}"
    got_w = weights.gather(1, order).double()[clear]
    want_w = ref_w.gather(1, want_order)[clear]
    rel = float((got_w - want_w).norm() / want_w.norm())
    assert rel <= 2e-6, f"seed {seed}: relative error {rel:.2e}"  # fp32 softmax/sigmoid: a few ulp


def test_softmax_topk_with_router_bias_matches_gpt_oss():
    tf = pytest.importorskip("transformers")
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter

    cfg = tf.GptOssConfig(hidden_size=32, num_local_experts=8, num_experts_per_tok=4)
    hf = GptOssTopKRouter(cfg)
    g = torch.Generator().manual_seed(random.SystemRandom().randrange(2**31))
    with torch.no_grad():
        hf.weight.copy_(torch.randn(8, 32, generator=g))
        hf.bias.copy_(torch.randn(8, generator=g))
    x = torch.randn(40, 32, generator=g)
    with torch.no_grad():
        _, hf_w, hf_ids = hf(x)
    ids, w = route(RouterSpec(8, 4, "softmax_topk", logit_bias=True), x, hf.weight.detach(), logit_bias=hf.bias.detach())
    assert torch.equal(ids, hf_ids)
    assert float((w - hf_w).norm() / hf_w.norm()) <= 1e-6


def test_router_rejects_bad_inputs():
    spec = RouterSpec(8, 2, "sigmoid", selection_bias=True)
    x, w = torch.randn(4, 16), torch.randn(8, 16)
    with pytest.raises(ShapeError, match="router weight"):
        route(spec, x, torch.randn(7, 16), torch.zeros(8))
    with pytest.raises(ShapeError, match="selection bias"):
        route(spec, x, w, None)
    with pytest.raises(ShapeError, match=r"\[T, H\]"):
        route(spec, x[None], w, torch.zeros(8))


@pytest.mark.parametrize("kwargs,words", [
    (dict(num_experts=8, top_k=2, scoring="sqrtsoftplus"), "scoring"),
    (dict(num_experts=8, top_k=9), "top_k"),
    (dict(num_experts=12, top_k=2, n_group=5), "n_group"),
    (dict(num_experts=16, top_k=8, n_group=8, topk_group=2), "fewer than top_k"),
    (dict(num_experts=8, top_k=2, n_group=2, topk_group=3), "topk_group"),
    (dict(num_experts=8, top_k=2, group_score="mean"), "group score"),
])
def test_router_spec_refuses_what_it_cannot_compute(kwargs, words):
    with pytest.raises(LayoutError, match=words):
        RouterSpec(**kwargs)
