"""Tokens sorted by expert, on the device, with shapes fixed by the number of (token, expert) pairs: no
host synchronisation and nothing data-dependent, so it can run inside a captured graph."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .layout import DeviceExperts


@dataclass(frozen=True, eq=False)
class Dispatch:
    """The N = T*k (token, slot) pairs in expert-sorted order.

    slots[p]: the slot of pair p = t*k + j (`held` = not held here); order[i]: the pair at sorted position i; tokens[i] = order[i] // k; sorted_slots[i]: its
    slot (`held` = not held here, sorted last); counts[s]: pairs of slot s (counts[held]: not held);
    ends[s]: end of slot s's segment in sorted order (int64; cumulative counts).
    """

    k: int
    held: int
    slots: torch.Tensor
    order: torch.Tensor
    tokens: torch.Tensor
    sorted_slots: torch.Tensor
    counts: torch.Tensor
    ends: torch.Tensor

    @property
    def pairs(self) -> int:
        return self.order.numel()


def dispatch(experts: DeviceExperts, topk_ids: torch.Tensor) -> Dispatch:
    E = experts.layer.num_experts
    k = topk_ids.shape[1]
    ids = topk_ids.reshape(-1)
    # Ids outside [0, E) go to the not-held slot instead of indexing out of bounds: forward() has
    # rejected them already, the unchecked decode step must not fault on the device.
    ids = torch.where((ids >= 0) & (ids < E), ids, torch.full_like(ids, E))
    slots = experts.slot_of.index_select(0, ids)
    sorted_slots, order = torch.sort(slots, stable=True)
    # scatter_add, not bincount: bincount sizes its output from the data (a host synchronisation).
    counts = torch.zeros(experts.held + 1, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(0, slots, torch.ones_like(slots))
    ends = torch.cumsum(counts[:experts.held], 0)
    return Dispatch(k, experts.held, slots, order, torch.div(order, k, rounding_mode="floor"), sorted_slots, counts, ends)
