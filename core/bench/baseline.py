"""The torch baseline: what a user without moetier runs. A separate bf16 weight tensor per expert and a
Python loop over the experts a batch hits, each doing F.linear for gate, up and down (the Hugging Face
transformers style of MoE block), accumulated with index_add_. It is timed in the same run, on the same
routing, so "x vs torch" compares like with like."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..experts import ExpertLayerSpec, ExpertWeights

NAME = "torch.loop"
FORMAT = "bf16"


@dataclass(frozen=True, eq=False)
class LoopExperts:
    layer: ExpertLayerSpec
    gate: tuple[torch.Tensor, ...]  # per expert [I, H] bf16
    up: tuple[torch.Tensor, ...]
    down: tuple[torch.Tensor, ...]  # per expert [H, I] bf16


class TorchLoopBaseline:
    name = NAME

    def prepare(self, layer: ExpertLayerSpec, weights: ExpertWeights) -> LoopExperts:
        """Own bf16 copies of every expert (so several prepared copies never share memory)."""
        gate, up, down = [], [], []
        for e in range(layer.num_experts):
            t = weights.expert(e)
            for out, q in ((gate, t.gate), (up, t.up), (down, t.down)):
                out.append(q.data.clone() if q.data.dtype == torch.bfloat16 else q.dequantize(torch.float32).to(torch.bfloat16))
        return LoopExperts(layer, tuple(gate), tuple(up), tuple(down))

    def set_threads(self, threads: int) -> None:
        torch.set_num_threads(threads)

    @torch.inference_mode()
    def forward(self, prepared: LoopExperts, hidden: torch.Tensor, topk_ids: torch.Tensor,
                topk_weights: torch.Tensor) -> torch.Tensor:
        x = hidden.to(torch.bfloat16)
        out = torch.zeros(hidden.shape, dtype=torch.float32)
        for e in torch.unique(topk_ids).tolist():
            tok, slot = (topk_ids == e).nonzero(as_tuple=True)
            xe = x[tok]
            h = F.silu(F.linear(xe, prepared.gate[e])) * F.linear(xe, prepared.up[e])
            y = F.linear(h, prepared.down[e])
            out.index_add_(0, tok, y.float() * topk_weights[tok, slot, None])
        return out
