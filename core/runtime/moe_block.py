"""One MoE layer end to end: moe_block(hidden) = routed(hidden) + shared(hidden), on one backend.

`MoEBlock` holds the router tensors (fp32), the shared expert and the prepared experts; it reads them
from a checkpoint through `moetier.checkpoint.experts`.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from ..checkpoint import Checkpoint
from ..checkpoint.experts import CheckpointExperts, RouterTensors, SharedTensors, read_router, read_shared
from ..errors import CheckpointError, FormatError
from ..experts import ExpertBackend, PreparedExperts
from ..formats import WeightFormat
from ..layout import MoELayerLayout, MoELayout
from .routing import route


class SharedExpert:
    """The always-on SwiGLU expert in fp32; its output is scaled by sigmoid(x . gate_weight) when gated."""

    def __init__(self, tensors: SharedTensors):
        self.tensors = tensors

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tensors
        x = x.to(torch.float32)
        y = F.linear(F.silu(F.linear(x, t.gate)) * F.linear(x, t.up), t.down)
        if t.gate_weight is not None:
            y = torch.sigmoid(F.linear(x, t.gate_weight)) * y
        return y


def default_format(layout: MoELayout, backend: ExpertBackend) -> str:
    """The checkpoint's own expert format. A backend that does not compute it is an error saying what to
    choose: converting silently (mxfp4 to bf16 is four times the memory) is never the default."""
    native = layout.quantization.fmt
    if native not in backend.formats:
        raise FormatError(f"backend {backend.name} does not compute {native}, the format this checkpoint's experts "
                          f"are stored in; name a format to convert them to (one of {', '.join(backend.formats)}) "
                          f"or a backend that computes {native}")
    return native


class MoEBlock:
    """One MoE layer: router (fp32) + routed experts on a backend + shared expert. Call it on hidden
    [T, H] (fp32 or bf16); it returns fp32 [T, H]."""

    def __init__(self, layer: MoELayerLayout, router: RouterTensors, backend: ExpertBackend,
                 prepared: PreparedExperts, *, shared: SharedTensors | None = None):
        if (shared is None) != (layer.shared is None):
            raise CheckpointError(f"layer {layer.index}: the layout {'has' if layer.shared else 'has no'} shared expert "
                                  f"but one was {'not ' if shared is None else ''}given")
        self.layer, self.router = layer, router
        self.backend, self.prepared = backend, prepared
        self.shared_expert = None if shared is None else SharedExpert(shared)

    def route(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.router
        return route(self.layer.router, hidden, r.weight, r.selection_bias, r.logit_bias)

    def routed(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        return self.backend.forward(self.prepared, hidden.contiguous(), topk_ids.contiguous(),
                                    topk_weights.contiguous(), out_dtype=torch.float32)

    def shared(self, hidden: torch.Tensor) -> torch.Tensor | None:
        return None if self.shared_expert is None else self.shared_expert(hidden)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        ids, weights = self.route(hidden)
        out = self.routed(hidden, ids, weights)
        s = self.shared(hidden)
        return out if s is None else out + s

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, layout: MoELayout, layer_index: int, backend: ExpertBackend, *,
                        fmt: str | WeightFormat | None = None, experts: Iterable[int] | None = None,
                        read_as: torch.dtype | str | WeightFormat | None = None,
                        progress: bool | None = None) -> MoEBlock:
        """Read layer `layer_index` of `ckpt` (router, shared expert, routed experts one at a time) and
        prepare its experts on `backend` in `fmt` (default: `default_format`). `experts`: the ids this
        backend holds (default all). `progress`: a bar per layer (default: on a terminal)."""
        layer = layout.layer(layer_index)
        router, shared = read_router(ckpt, layer), read_shared(ckpt, layer)
        source = CheckpointExperts(ckpt, layout, layer, to=read_as, progress=progress)
        ids = range(layer.experts.num_experts) if experts is None else experts
        try:
            prepared = backend.prepare(layer.experts, source, ids, fmt or default_format(layout, backend))
        finally:
            source.done()
        return cls(layer, router, backend, prepared, shared=shared)
