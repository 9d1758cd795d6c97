"""The tiered MoE layer: one layer's routed experts split into shards, each computed where it lives.

A `Shard` is the experts one backend computes in one format from memory (one prepared set; on a
multi-node machine the native kernels home each expert on its NUMA node inside that one set). The disk
tier is a `DiskShard` (moetier.runtime.disk_tier): experts read from the checkpoint into a bounded cache
on a miss. Forward: device shards are enqueued first (they run asynchronously on their streams), the CPU
shards run in the calling thread meanwhile, then the disk shard; the partial outputs are summed in fp32
in the shards' fixed order. With one shard the layer is exactly that backend's forward, bit for bit.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from ..errors import ShapeError
from ..experts import ExpertBackend, ExpertLayerSpec, PreparedExperts, validate_forward_inputs


class Recorder(Protocol):
    """Receives every layer's routing (moetier.placement's ActivationStats is one)."""

    def add(self, layer_index: int, topk_ids: torch.Tensor) -> None: ...


@dataclass(eq=False)
class Shard:
    """Experts of one layer held by one backend in one format. `tiers`: expert id -> the tier it lives on
    (for accounting; the backend places the bytes)."""

    backend: ExpertBackend
    prepared: PreparedExperts
    tiers: dict[int, str]

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
        if len(self.shards) == 1 and self.disk is None and self.lookahead is None \
                and hidden.device == self.shards[0].device:
            s = self.shards[0]
            return s.backend.forward(s.prepared, hidden, topk_ids, topk_weights, out_dtype=out_dtype)
        cpu = torch.device("cpu")
        h, ids, w = _on(hidden, cpu), _on(topk_ids, cpu), _on(topk_weights, cpu)
        # Checked once here, so a bad call fails before any shard started.
        validate_forward_inputs(self.spec, h, ids, w, torch.float32, "propagate")
        if self.disk is not None:  # start reading this layer's disk experts while the others compute
            self.disk.prefetch(torch.unique(ids).tolist())
        if self.lookahead is not None:
            self.lookahead(h)
        pending = [s.backend.submit(s.prepared, _on(hidden, s.device), _on(topk_ids, s.device),
                                    _on(topk_weights, s.device), out_dtype=torch.float32) for s in self._device]
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
