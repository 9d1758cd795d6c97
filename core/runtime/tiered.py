"""The tiered MoE layer: one layer's routed experts split into shards, each computed where it lives.

A `Shard` is the experts one backend computes in one format from memory (one prepared set; on a
multi-node machine the native kernels home each expert on its NUMA node inside that one set). The disk
tier is a `DiskShard` (moetier.runtime.disk_tier): experts read from the checkpoint into a bounded cache
on a miss. Forward: device shards are enqueued first (they run asynchronously on their streams), the CPU
shards run in the calling thread meanwhile, then the disk shard; the partial outputs are summed in fp32
in the shards' fixed order. With one shard the layer is exactly that backend's forward, bit for bit.

For inputs on a CUDA device, with native CPU shards, the layer runs the hybrid step
(moetier.runtime.hybrid): hidden states staged to pinned memory on a side stream, the CPU shards started
by a host function the moment the copy lands, the device shards computed meanwhile, the join an event;
the result equals the path above (same shards, same order of the fp32 sum). With `streaming` set, a large
prefill streams a CPU shard's used experts to the device when the n* cost model says so.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from ..errors import MoetierError, SettingError, ShapeError
from ..experts import ExpertBackend, ExpertLayerSpec, ExpertSource, PreparedExperts, validate_forward_inputs
from .hybrid import (DeviceStreams, HybridStep, PrefillStreaming, ShardStreamDecision, decide_shard, stream_experts,
                     tokens_per_expert)


class Recorder(Protocol):
    """Receives every layer's routing (moetier.placement's ActivationStats is one)."""

    def add(self, layer_index: int, topk_ids: torch.Tensor) -> None: ...


@dataclass(eq=False)
class Shard:
    """Experts of one layer held by one backend in one format. `tiers`: expert id -> the tier it lives on
    (for accounting; the backend places the bytes). `source`: where the experts can be read again (a
    large prefill may stream them to the device from there); None: nowhere."""

    backend: ExpertBackend
    prepared: PreparedExperts
    tiers: dict[int, str]
    source: ExpertSource | None = None

    @property
    def device(self) -> torch.device:
        return getattr(self.backend, "device", torch.device("cpu"))

    @property
    def on_cpu(self) -> bool:
        return self.device.type == "cpu"

    def bytes_per_tier(self) -> dict[str, int]:
        """The prepared bytes attributed to each tier by expert count."""
        per_expert = self.prepared.nbytes / max(1, len(self.prepared.expert_ids))
        out: dict[str, int] = {}
        for tier in self.tiers.values():
            out[tier] = out.get(tier, 0) + per_expert
        return {t: int(round(b)) for t, b in out.items()}


class TieredExperts:
    """The routed experts of MoE layer `layer_index`: shards in memory plus an optional disk shard.

    forward(hidden [T, H], topk_ids [T, k], topk_weights [T, k]) -> [T, H] in out_dtype: the weighted sum
    over every expert of the layer, wherever it lives. Every expert id of the layer is held by exactly
    one shard (checked at construction)."""

    def __init__(self, layer_index: int, spec: ExpertLayerSpec, shards: Sequence[Shard], disk=None, *,
                 recorder: Recorder | None = None):
        self.layer_index, self.spec = layer_index, spec
        self.shards = tuple(shards)
        self.disk = disk
        self.recorder = recorder
        self.lookahead = None  # called with this layer's hidden state to read the next layer's experts ahead
        self.deferral = None  # a runtime.deferral.Deferral shared by the model's layers, when enabled
        self.last = False  # the model's last MoE layer never defers
        held: list[int] = [e for s in self.shards for e in s.prepared.expert_ids]
        if disk is not None:
            held += list(disk.expert_ids)
        if sorted(held) != list(range(spec.num_experts)):
            missing = sorted(set(range(spec.num_experts)) - set(held))
            twice = sorted({e for e in held if held.count(e) > 1})
            raise ShapeError(f"layer {layer_index}: the shards must hold every expert exactly once "
                             f"(missing {missing[:8]}, held twice {twice[:8]})")
        self._cpu = tuple(s for s in self.shards if s.on_cpu)
        self._device = tuple(s for s in self.shards if not s.on_cpu)
        self.hybrid: HybridStep | None = None  # set by set_hybrid, or made on the first call on a CUDA device
        self.hybrid_note = ""  # why the hybrid step does not run, when it was tried and cannot
        self._hybrid_tried = False
        self.streaming: PrefillStreaming | None = None
        self.last_stream_decisions: tuple[ShardStreamDecision, ...] = ()

    def set_hybrid(self, step: HybridStep | None) -> None:
        """Run the hybrid step `step` (it must hold exactly this layer's shards) for inputs on its
        device; None: back to the standard path. Used for a CPU stand-in device; on CUDA the layer makes
        its own step on the first call."""
        if step is not None:
            if self.disk is not None:
                raise SettingError(f"layer {self.layer_index}: the hybrid step does not compute a disk tier")
            mine = sorted(id(s) for s in self.shards)
            if sorted(id(s) for s in step.host_shards + step.device_shards) != mine:
                raise SettingError(f"layer {self.layer_index}: the hybrid step must hold exactly this layer's shards")
        self.hybrid, self._hybrid_tried, self.hybrid_note = step, step is not None, ""

    def _hybrid_for(self, hidden: torch.Tensor) -> HybridStep | None:
        if self.disk is not None or self.lookahead is not None:
            return None
        if self.hybrid is not None:
            return self.hybrid if hidden.device.type == self.hybrid.device.type else None
        if hidden.device.type != "cuda" or self._hybrid_tried:
            return None
        self._hybrid_tried = True
        try:
            streams = DeviceStreams.for_device(hidden.device)
            self.hybrid = HybridStep(self.spec, self._cpu, self._device, streams, streams.ring(self.spec.hidden_size))
        except MoetierError as exc:
            self.hybrid_note = f"standard path: {exc}"
        return self.hybrid

    def _stream_backend(self) -> ExpertBackend | None:
        if self.streaming is None:
            return None
        if self.streaming.device_backend is not None:
            return self.streaming.device_backend
        return self._device[0].backend if self._device else None

    def _decide_streaming(self, ids_cpu: torch.Tensor) -> dict[int, list[int]]:
        """Per CPU shard, stream its used experts to the device for this batch? -> shard index: experts."""
        counts = tokens_per_expert(ids_cpu, self.spec.num_experts)
        decisions, chosen = [], {}
        for i, s in enumerate(self._cpu):
            d = decide_shard(self.spec, s, counts, self.streaming.costs)
            if d.stream and s.source is None:
                decisions.append(ShardStreamDecision(i, d, False, "the shard has no source to read its experts from"))
                continue
            decisions.append(ShardStreamDecision(i, d, d.stream))
            if d.stream:
                chosen[i] = [e for e in s.prepared.expert_ids if counts[e] > 0]
        self.last_stream_decisions = tuple(decisions)
        return chosen

    def bytes_per_tier(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.shards:
            for tier, n in s.bytes_per_tier().items():
                out[tier] = out.get(tier, 0) + n
        return out

    def forward(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, *,
                out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.recorder is not None:
            self.recorder.add(self.layer_index, topk_ids)
        if self.deferral is None:
            return self._compute(hidden, topk_ids, topk_weights, out_dtype)
        carried = self.deferral.take(self.layer_index)
        now, later = (topk_ids, topk_weights), None
        if not self.last:
            now, later = self.deferral.split(topk_ids, topk_weights)
        out = self._compute(hidden, *now, torch.float32)
        if later is not None:
            h = hidden.detach().clone()  # the caller may reuse its buffer before the deferred work ran
            self.deferral.defer(self.layer_index, lambda: self._compute(h, *later, torch.float32))
        if carried is not None:
            out = out + carried.to(out.device)
        return out if out_dtype == torch.float32 else out.to(out_dtype)

    def _compute(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                 out_dtype: torch.dtype) -> torch.Tensor:
        stream_to = self._stream_backend()
        if len(self.shards) == 1 and self.disk is None and self.lookahead is None and stream_to is None \
                and hidden.device == self.shards[0].device:
            s = self.shards[0]
            return s.backend.forward(s.prepared, hidden, topk_ids, topk_weights, out_dtype=out_dtype)
        if stream_to is None:
            hybrid = self._hybrid_for(hidden)
            if hybrid is not None:
                return hybrid.forward(hidden, topk_ids, topk_weights, out_dtype=out_dtype)
        cpu = torch.device("cpu")
        h, ids, w = _on(hidden, cpu), _on(topk_ids, cpu), _on(topk_weights, cpu)
        # Checked once here, so a bad call fails before any shard started.
        checked = validate_forward_inputs(self.spec, h, ids, w, torch.float32, "propagate")
        streamed = self._decide_streaming(checked.topk_ids) if stream_to is not None else {}
        if self.disk is not None:  # start reading this layer's disk experts while the others compute
            self.disk.prefetch(torch.unique(ids).tolist())
        if self.lookahead is not None:
            self.lookahead(h)
        pending = [s.backend.submit(s.prepared, _on(hidden, s.device), _on(topk_ids, s.device),
                                    _on(topk_weights, s.device), out_dtype=torch.float32) for s in self._device]
        if streamed:
            # The CPU shards that stay compute on their workers while the streamed ones load and compute.
            cpu_pending = {i: s.backend.submit(s.prepared, h, ids, w, out_dtype=torch.float32)
                           for i, s in enumerate(self._cpu) if i not in streamed}
            dev = stream_to.device
            nan = "raise" if any(self._cpu[i].backend.nan_policy == "raise" for i in streamed) else "propagate"
            dev_inputs = validate_forward_inputs(self.spec, _on(hidden, dev), _on(topk_ids, dev),
                                                 _on(topk_weights, dev), torch.float32, nan, device=dev)
            parts = []
            for i, s in enumerate(self._cpu):
                if i in streamed:
                    parts.append(stream_experts(self.spec, s.source, s.prepared.fmt, streamed[i], stream_to,
                                                dev_inputs, self.streaming.chunk_experts))
                else:
                    parts.append(cpu_pending[i].wait())
        else:
            parts = [s.backend.forward(s.prepared, h, ids, w, out_dtype=torch.float32) for s in self._cpu]
        if self.disk is not None:
            parts.append(self.disk.forward(h, ids, w))
        parts += [p.wait() for p in pending]
        out = parts[0].to(hidden.device)
        for p in parts[1:]:
            out = out + p.to(hidden.device)
        return out if out_dtype == torch.float32 else out.to(out_dtype)

    __call__ = forward


def _on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    # To a device: stream-ordered, so non-blocking is safe; to the CPU it must have landed before use.
    return t if t.device == device else t.to(device, non_blocking=device.type != "cpu")
