"""The decode step without host synchronisation, for one batch size.

A DecodeRunner owns static buffers (hidden, ids, weights in; out) on the device and runs the eager
forward's own code over them with a GEMM path that keeps everything on the device ("grouped" or
"triton"): no .item(), no .cpu(), no nonzero/unique, every shape fixed by the batch size. So the step
can be captured in a CUDA graph (`graph=True` on CUDA/HIP) and replayed: run() copies the new inputs into
the static buffers and replays. The output buffer is the same tensor every step (valid until the next).

Unlike forward(), run() does not read values back to check them (that would synchronise): ids outside
[0, num_experts) contribute nothing instead of raising, and NaNs propagate. Shapes, dtypes and devices
are still checked, from metadata only.
"""
from __future__ import annotations

import torch

from moetier.errors import BackendUnavailable, DTypeError, FormatError, ShapeError
from moetier.experts import PreparedExperts, check_static_inputs

from .forward import moe_forward


class DecodeRunner:
    def __init__(self, backend, prepared: PreparedExperts, batch_size: int, *, top_k: int | None = None,
                 hidden_dtype: torch.dtype = torch.bfloat16, out_dtype: torch.dtype = torch.float32,
                 graph: bool = False):
        experts = prepared.payload
        layer = prepared.layer
        fmt = prepared.fmt.name
        if backend.gemm == "auto":
            path = backend.plan.decode_gemm_for(fmt, layer.hidden_size, layer.intermediate_size)
        else:
            path = backend.gemm_path(experts)
        if path in (None, "loop"):
            raise FormatError(f"{backend.name}: no synchronisation-free kernel computes {fmt} with hidden "
                              f"{layer.hidden_size}, intermediate {layer.intermediate_size} on {backend.device} "
                              f"({backend.plan.describe()}); forward() still computes it")
        for what, dt in (("hidden_dtype", hidden_dtype), ("out_dtype", out_dtype)):
            if dt not in (torch.float32, torch.bfloat16):
                raise DTypeError(f"{what} must be torch.float32 or torch.bfloat16, got {dt}")
        k = layer.top_k if top_k is None else top_k
        if not isinstance(k, int) or not 1 <= k <= layer.num_experts:
            raise ShapeError(f"top_k must be in [1, {layer.num_experts}], got {k!r}")
        dev = backend.device
        self.backend, self.prepared, self.experts, self.path = backend, prepared, experts, path
        self.batch_size, self.top_k = batch_size, k
        self.hidden = torch.zeros(batch_size, layer.hidden_size, dtype=hidden_dtype, device=dev)
        self.topk_ids = torch.zeros(batch_size, k, dtype=torch.int64, device=dev)
        self.topk_weights = torch.zeros(batch_size, k, dtype=torch.float32, device=dev)
        self.out = torch.zeros(batch_size, layer.hidden_size, dtype=out_dtype, device=dev)
        self.graph = None
        if graph:
            self.capture()

    def step(self) -> None:
        """One forward over the static buffers into self.out (what a graph captures)."""
        if self.experts.held == 0:
            self.out.zero_()
            return
        out = moe_forward(self.experts, self.hidden, self.topk_ids, self.topk_weights, self.path,
                          self.backend.plan.grouped)
        self.out.copy_(out)

    def capture(self) -> None:
        """Capture step() in a CUDA graph (CUDA and HIP builds). Warm-up runs on a side stream first, as
        graph capture requires (Triton compiles, the allocator and cuBLAS set up their workspaces)."""
        dev = self.backend.device
        if dev.type != "cuda" or not self.backend.plan.graphs:
            raise BackendUnavailable(f"{self.backend.name}: graph capture needs a CUDA or HIP device, "
                                     f"this backend computes on {dev}")
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.step()
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.step()
        self.graph = graph

    def run(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """Copy the inputs into the static buffers, compute, return the static output buffer."""
        check_static_inputs(hidden, topk_ids, topk_weights, batch_size=self.batch_size,
                            hidden_size=self.hidden.shape[1], top_k=self.top_k, device=self.backend.device)
        self.hidden.copy_(hidden)
        self.topk_ids.copy_(topk_ids)
        self.topk_weights.copy_(topk_weights)
        if self.graph is not None:
            self.graph.replay()
        else:
            self.step()
        return self.out
