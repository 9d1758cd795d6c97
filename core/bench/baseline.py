"""The torch baseline: what a user without moetier runs. A separate bf16 weight tensor per expert and a
Python loop over the experts a batch hits, each computing its MLP with torch matmuls (the Hugging Face
transformers style of MoE block; the layer's own activation and biases, as the float64 reference
computes them), accumulated with index_add_. It is timed in the same run, on the same
routing, so "x vs torch" compares like with like."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..experts import ExpertLayerSpec, ExpertWeights
from ..reference import DenseExpert, expert_mlp

NAME = "torch.loop"
FORMAT = "bf16"


@dataclass(frozen=True, eq=False)
class LoopExperts:
    layer: ExpertLayerSpec
    experts: tuple[DenseExpert, ...]  # bf16 gate/up [I, H], down [H, I], fp32 biases as bf16


class TorchLoopBaseline:
    name = NAME

    def prepare(self, layer: ExpertLayerSpec, weights: ExpertWeights) -> LoopExperts:
        """Own bf16 copies of every expert (so several prepared copies never share memory)."""
        def bf16(q):
            return q.data.clone() if q.data.dtype == torch.bfloat16 else q.dequantize(torch.float32).to(torch.bfloat16)

        def bias(b):
            return None if b is None else b.to(torch.bfloat16)

        experts = []
        for e in range(layer.num_experts):
            t = weights.expert(e)
            experts.append(DenseExpert(bf16(t.gate), bf16(t.up), bf16(t.down), bias(t.gate_bias), bias(t.up_bias),
                                       bias(t.down_bias)))
        return LoopExperts(layer, tuple(experts))

    def set_threads(self, threads: int) -> None:
        torch.set_num_threads(threads)

    @torch.inference_mode()
    def forward(self, prepared: LoopExperts, hidden: torch.Tensor, topk_ids: torch.Tensor,
                topk_weights: torch.Tensor) -> torch.Tensor:
        x = hidden.to(torch.bfloat16)
        out = torch.zeros(hidden.shape, dtype=torch.float32)
        for e in torch.unique(topk_ids).tolist():
            tok, slot = (topk_ids == e).nonzero(as_tuple=True)
            y = expert_mlp(prepared.layer, prepared.experts[e], x[tok])
            out.index_add_(0, tok, y.float() * topk_weights[tok, slot, None])
        return out
