"""AccelBackend: the expert contract on one torch device (cuda, HIP builds' cuda, npu, or the CPU)."""
from __future__ import annotations

import os
import threading

import torch

from moetier.errors import BackendUnavailable, PreparedExpertsError, ShapeError
from moetier.experts import EventPending, ExpertBackend, ForwardInputs, Pending, PreparedExperts, device_module
from moetier.formats import FORMATS

from .forward import moe_forward
from .gemm import GEMM_PATHS
from .layout import DeviceExperts, pack_experts
from .plan import KernelPlan


class AccelBackend(ExpertBackend):
    """Experts stacked on `device`, computed by the kernels of `plan`.

    gemm: "auto" (the plan's choice per format and shape) or one of "grouped", "triton", "loop" to force
    a path (tests and benchmarks compare them); a forced path that does not apply raises
    BackendUnavailable at prepare. On an accelerator, submit() enqueues the work on this backend's side
    stream after the caller's current stream and returns an EventPending.
    """

    formats = tuple(FORMATS)

    def __init__(self, name: str, device: torch.device | str, plan: KernelPlan, *, gemm: str = "auto",
                 nan_policy: str = "raise"):
        super().__init__(nan_policy=nan_policy)
        if gemm != "auto" and gemm not in GEMM_PATHS:
            raise ValueError(f"gemm must be 'auto' or one of {GEMM_PATHS}, got {gemm!r}")
        self.name = name
        self.device = torch.device(device)
        self.plan = plan
        self.gemm = gemm
        self._stream = None
        self._stream_lock = threading.Lock()

    # ---- which kernels -------------------------------------------------------------------------
    def gemm_path(self, experts: DeviceExperts) -> str:
        layer, fmt = experts.layer, experts.fmt.name
        if self.gemm == "auto":
            return self.plan.gemm_for(fmt, layer.hidden_size, layer.intermediate_size)
        self._check_forced(fmt, layer.hidden_size, layer.intermediate_size)
        return self.gemm

    def _check_forced(self, fmt: str, hidden: int, intermediate: int) -> None:
        if self.gemm == "grouped" and not self.plan.grouped_fits(fmt, hidden, intermediate):
            raise BackendUnavailable(f"{self.name}: the grouped GEMM does not take {fmt} with hidden {hidden}, "
                                     f"intermediate {intermediate} here ({self.plan.describe()})")
        if self.gemm == "triton" and not self.plan.triton:
            if self.device.type != "cpu" or os.environ.get("TRITON_INTERPRET") != "1":
                raise BackendUnavailable(f"{self.name}: the Triton kernel does not run on {self.device} "
                                         f"({'; '.join(self.plan.notes) or self.plan.describe()})")

    # ---- the contract --------------------------------------------------------------------------
    def pack(self, layer, fmt, experts):
        if self.gemm != "auto":  # a forced path that cannot run is refused before any weight moves
            self._check_forced(fmt.name, layer.hidden_size, layer.intermediate_size)
        return pack_experts(layer, fmt, experts, self.device)

    def compute(self, prepared: PreparedExperts, inputs: ForwardInputs) -> torch.Tensor:
        experts: DeviceExperts = prepared.payload
        out = moe_forward(experts, inputs.hidden, inputs.topk_ids, inputs.topk_weights, self.gemm_path(experts),
                          self.plan.grouped)
        return out.to(inputs.out_dtype)

    def submit_validated(self, prepared: PreparedExperts, inputs: ForwardInputs) -> Pending:
        if self.device.type == "cpu":
            return super().submit_validated(prepared, inputs)
        mod = device_module(self.device)
        caller = mod.current_stream(self.device)
        stream = self._side_stream(mod)
        stream.wait_stream(caller)  # inputs written on the caller's stream are ready before we read them
        with mod.stream(stream):
            out = self._run(prepared, inputs)
            event = mod.Event()
            event.record(stream)
        for t in (inputs.hidden, inputs.topk_ids, inputs.topk_weights):
            t.record_stream(stream)  # their memory is not reused while the side stream reads it
        return EventPending(out, event, stream)

    def _side_stream(self, mod):
        with self._stream_lock:
            if self._stream is None:
                self._stream = mod.Stream(self.device)
            return self._stream

    # ---- decode ----------------------------------------------------------------------------------
    def decode_runner(self, prepared: PreparedExperts, batch_size: int, **kwargs):
        """A DecodeRunner for `batch_size` tokens: fixed buffers, no host synchronisation (see decode.py)."""
        from .decode import DecodeRunner

        if not isinstance(prepared, PreparedExperts) or prepared.backend != self.name:
            raise PreparedExpertsError(f"backend {self.name} got experts prepared by "
                                       f"{getattr(prepared, 'backend', type(prepared).__name__)}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ShapeError(f"batch_size must be a positive int, got {batch_size!r}")
        return DecodeRunner(self, prepared, batch_size, **kwargs)
