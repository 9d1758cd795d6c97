"""The reference MoE math in plain torch: the cpu.torch backend runs it in fp32, the conformance oracle
in float64. Every other backend is judged against this one implementation."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention import ATTENTION_DTYPES, reference_attention
from .errors import SettingError
from .experts import ExpertBackend, ExpertLayerSpec, ExpertTensors
from .formats import FORMATS
from .norm import NORM_DTYPES, reference_rms_norm
from .rotary import ROTARY_DTYPES, reference_rotary


@dataclass(frozen=True, eq=False)
class DenseExpert:
    """One expert dequantized to a compute dtype; gate/up [I, H], down [H, I]."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None

    @classmethod
    def from_tensors(cls, t: ExpertTensors, dtype: torch.dtype) -> DenseExpert:
        b = [None if x is None else x.to(dtype) for x in (t.gate_bias, t.up_bias, t.down_bias)]
        return cls(t.gate.dequantize(dtype), t.up.dequantize(dtype), t.down.dequantize(dtype), *b)


def expert_mlp(layer: ExpertLayerSpec, e: DenseExpert, x: torch.Tensor) -> torch.Tensor:
    """One expert on rows x [n, H] -> [n, H], in x's dtype."""
    g = x @ e.gate.T
    u = x @ e.up.T
    if e.gate_bias is not None:
        g = g + e.gate_bias
        u = u + e.up_bias
    if layer.activation == "silu":
        h = F.silu(g) * u
    else:  # swiglu_oai (gpt-oss): clamped, (up + 1) * glu
        g = g.clamp(max=layer.swiglu_limit)
        u = u.clamp(-layer.swiglu_limit, layer.swiglu_limit)
        h = (u + 1) * (g * torch.sigmoid(layer.swiglu_alpha * g))
    y = h @ e.down.T
    if e.down_bias is not None:
        y = y + e.down_bias
    return y


def moe_forward(layer: ExpertLayerSpec, experts: Mapping[int, DenseExpert], hidden: torch.Tensor,
                topk_ids: torch.Tensor, topk_weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """sum over (t, j) of topk_weights[t, j] * expert_{topk_ids[t, j]}(hidden[t]) for held experts, in `dtype`."""
    T, H = hidden.shape
    out = torch.zeros(T, H, dtype=dtype)
    x_all = hidden.to(dtype)
    w_all = topk_weights.to(dtype)
    for e in torch.unique(topk_ids).tolist():
        dense = experts.get(e)
        if dense is None:
            continue  # not held here: another tier computes it
        tok, slot = (topk_ids == e).nonzero(as_tuple=True)
        y = expert_mlp(layer, dense, x_all[tok])
        out.index_add_(0, tok, y * w_all[tok, slot, None])
    return out


class ReferenceBackend(ExpertBackend):
    """The reference math as a backend: weights dequantized once at prepare to `precision` (fp32, or
    float64 for the oracle), then `moe_forward`. Slow and memory-hungry by design."""

    name = "reference"
    formats = tuple(FORMATS)
    dense_formats = formats
    mixed_formats = True  # each matrix dequantized from its own format

    def __init__(self, precision: torch.dtype = torch.float32, nan_policy: str = "raise"):
        super().__init__(nan_policy=nan_policy)
        if precision not in (torch.float32, torch.float64):
            raise ValueError(f"precision must be torch.float32 or torch.float64, got {precision}")
        self.precision = precision

    @property
    def threads(self) -> int:
        return torch.get_num_threads()

    def set_threads(self, threads: int) -> None:
        """torch's intra-op threads, which this backend computes on: a process-wide setting."""
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise SettingError(f"{self.name}: threads must be a positive integer, got {threads!r}")
        torch.set_num_threads(threads)

    def pack(self, layer, fmt, experts):
        return {e: DenseExpert.from_tensors(t, self.precision) for e, t in experts.items()}

    grouped_dense = True

    def pack_dense(self, weight, bias):
        return weight.dequantize(self.precision), None if bias is None else bias.to(self.precision)

    def pack_dense_grouped(self, weight, bias, groups):
        return self.pack_dense(weight, bias)

    def compute_dense(self, packed, x, out_dtype):
        w, b = packed.payload
        if packed.groups > 1:  # block g of w times x's g-th slice of columns
            G = packed.groups
            y = torch.einsum("tgk,gnk->tgn", x.to(self.precision).view(x.shape[0], G, -1),
                             w.view(G, -1, w.shape[1])).reshape(x.shape[0], -1)
        else:
            y = x.to(self.precision) @ w.T
        return (y if b is None else y + b).to(out_dtype)

    attention_dtypes = ATTENTION_DTYPES

    def compute_attention(self, q, k, v, scale, mask, causal):
        return reference_attention(q, k, v, scale=scale, mask=mask, causal=causal).to(q.dtype)

    norm_dtypes = NORM_DTYPES

    def compute_rms_norm(self, x, weight, eps):
        return reference_rms_norm(x, weight, eps).to(x.dtype)

    rotary_dtypes = ROTARY_DTYPES

    def compute_rotary(self, x, cos, sin, norm_weight, eps):
        return reference_rotary(x, cos, sin, norm_weight, eps).to(x.dtype)

    def compute(self, prepared, inputs):
        out = moe_forward(prepared.layer, prepared.payload, inputs.hidden, inputs.topk_ids, inputs.topk_weights,
                          self.precision)
        return out.to(inputs.out_dtype)


def oracle() -> ReferenceBackend:
    """The float64 reference every backend is compared with (NaNs propagate: it must never refuse)."""
    return ReferenceBackend(precision=torch.float64, nan_policy="propagate")
