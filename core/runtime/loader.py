"""Loading a checkpoint's routed experts where a placement plan puts them.

`load_experts(model, plan=...)` opens the checkpoint lazily, creates each backend the plan names once
(through the registry), and for every MoE layer prepares one shard per (backend, format) from memory
tiers and a disk shard for the experts left on disk, reading one expert at a time (peak memory: what
the plan keeps resident plus about one expert). The result maps a layer index to its `TieredExperts`.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch

from ..checkpoint import Checkpoint
from ..checkpoint.experts import CheckpointExperts, read_router
from ..errors import SettingError
from ..experts import ExpertBackend
from ..family import load_layout
from ..layout import MoELayout
from .deferral import Deferral
from .disk_tier import CacheCounters, DiskShard, ExpertCache, Prefetcher
from .moe_block import default_format
from .routing import route
from .tiered import Recorder, Shard, TieredExperts

DISK = "disk"


@dataclass(frozen=True)
class ShardSpec:
    """Experts of one layer on one tier, computed by one backend in one format (a placement plan's unit)."""

    tier: str
    backend: str
    fmt: str
    experts: tuple[int, ...]


class SingleTierPlan:
    """Every expert of every MoE layer on one tier, backend and format: what a run without a plan does."""

    def __init__(self, layout: MoELayout, tier: str, backend: str, fmt: str):
        self.layout, self.tier, self.backend, self.fmt = layout, tier, backend, fmt
        self.moe_layers = layout.moe_layer_indices

    def shards(self, layer_index: int) -> tuple[ShardSpec, ...]:
        n = self.layout.layer(layer_index).experts.num_experts
        return (ShardSpec(self.tier, self.backend, self.fmt, tuple(range(n))),)


class ModelExperts(Mapping):
    """Layer index -> TieredExperts for a whole checkpoint; close() releases the files and the prefetcher."""

    def __init__(self, layout: MoELayout, layers: dict[int, TieredExperts], checkpoints: tuple[Checkpoint, ...],
                 backends: dict[str, ExpertBackend], cache: ExpertCache | None, prefetcher: Prefetcher | None):
        self.layout, self._layers, self._checkpoints = layout, layers, checkpoints
        self.backends, self.cache, self.prefetcher = backends, cache, prefetcher
        self._deferral: Deferral | None = None
        if layers:
            layers[max(layers)].last = True

    def __getitem__(self, layer_index: int) -> TieredExperts:
        return self._layers[layer_index]

    def __iter__(self) -> Iterator[int]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def bytes_per_tier(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for layer in self._layers.values():
            for tier, n in layer.bytes_per_tier().items():
                out[tier] = out.get(tier, 0) + n
        if self.cache is not None:
            out["disk cache"] = self.cache.used_bytes
        return out

    @property
    def disk_counters(self) -> CacheCounters | None:
        return None if self.cache is None else self.cache.counters

    def set_recorder(self, recorder: Recorder | None) -> None:
        for layer in self._layers.values():
            layer.recorder = recorder

    def set_deferral(self, max_deferred: int) -> None:
        """Defer each token's `max_deferred` lowest-weight experts to the next MoE layer (0: off, the default)."""
        if self._deferral is not None:
            self._deferral.close()
            self._deferral = None
        if max_deferred:
            self._deferral = Deferral(max_deferred)
        for layer in self._layers.values():
            layer.deferral = self._deferral

    def set_prefill_streaming(self, streaming) -> None:
        """Let large prefills stream CPU experts to the device when the n* cost model says so
        (a moetier.runtime.hybrid.PrefillStreaming; None: never, the default)."""
        for layer in self._layers.values():
            layer.streaming = streaming

    def close(self) -> None:
        if self._deferral is not None:
            self._deferral.close()
        if self.prefetcher is not None:
            self.prefetcher.close()
        for c in self._checkpoints:
            c.close()

    def __enter__(self) -> ModelExperts:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_experts(model, *, plan=None, fmt: str | None = None, registry=None, inventory=None,
                 threads: int | None = None, cache_bytes: int | None = None, prefetch: bool = True,
                 layers: Iterable[int] | None = None, progress: bool | None = None) -> ModelExperts:
    """Prepare the routed experts of checkpoint `model` (a folder or its config.json).

    plan: anything with `shards(layer_index) -> [ShardSpec-like]` (a moetier.placement PlacementPlan);
    default: every expert on the CPU backend the selection picks, in `fmt` (default: the checkpoint's
    format if that backend computes it, else bf16). cache_bytes: the DRAM budget of the disk tier's
    cache (required when the plan leaves experts on disk). layers: only these MoE layers."""
    from ..hardware import load_inventory
    from ..plugins import get_registry
    from ..selection import select_backends

    registry = registry or get_registry()
    inventory = inventory or load_inventory()
    layout = load_layout(model, registry)
    backends: dict[str, ExpertBackend] = {}

    def backend(name: str) -> ExpertBackend:
        if name not in backends:
            backends[name] = registry.backend(name).create(inventory, threads=threads)
        return backends[name]

    if plan is None:
        name = select_backends(registry, inventory).for_device("cpu")
        if name is None:
            raise SettingError("no CPU backend can run here (see `moetier doctor`)")
        plan = SingleTierPlan(layout, "cpu:numa0", name, fmt or default_format(layout, backend(name)))
    elif fmt is not None:
        raise SettingError("give the weight format in the plan, not beside it")
    wanted = tuple(layout.moe_layer_indices if layers is None else layers)
    ckpt = Checkpoint(model)
    cache = prefetcher = disk_ckpt = None
    built: dict[int, TieredExperts] = {}
    try:
        for index in wanted:
            layer = layout.layer(index)
            specs = tuple(plan.shards(index))
            groups: dict[tuple[str, str], list] = {}
            disk_specs = []
            for s in specs:
                (disk_specs if s.tier == DISK else groups.setdefault((s.backend, s.fmt), [])).append(s)
            shards = []
            for (bname, f), members in groups.items():
                b = backend(bname)
                ids = sorted(e for m in members for e in m.experts)
                source = CheckpointExperts(ckpt, layout, layer, progress=progress)
                try:
                    prepared = b.prepare(layer.experts, source, ids, f)
                finally:
                    source.done()
                # The shard can read its experts again from the checkpoint (a large prefill may stream them).
                shards.append(Shard(b, prepared, {e: m.tier for m in members for e in m.experts},
                                    CheckpointExperts(ckpt, layout, layer)))
            disk = None
            if disk_specs:
                if cache_bytes is None:
                    raise SettingError("the plan leaves experts on disk: give the DRAM budget of their cache "
                                       "(cache_bytes)")
                if cache is None:
                    cache = ExpertCache(cache_bytes)
                    prefetcher = Prefetcher(cache) if prefetch else None
                    disk_ckpt = Checkpoint(model, max_mapped_bytes=0, drop_page_cache=True)
                if len({(s.backend, s.fmt) for s in disk_specs}) != 1:
                    raise SettingError(f"layer {index}: the disk tier's experts must share one backend and format")
                d = disk_specs[0]
                disk = DiskShard(index, layer.experts, [e for s in disk_specs for e in s.experts],
                                 CheckpointExperts(disk_ckpt, layout, layer), backend(d.backend), d.fmt, cache,
                                 prefetcher)
            built[index] = TieredExperts(index, layer.experts, shards, disk)
            ckpt.release()  # unmap what this layer read: resident memory stays what the shards keep
        if prefetcher is not None:
            _wire_lookahead(ckpt, layout, built)
    except BaseException:
        if prefetcher is not None:
            prefetcher.close()
        for c in (ckpt, disk_ckpt):
            if c is not None:
                c.close()
        raise
    return ModelExperts(layout, built, (ckpt, disk_ckpt) if disk_ckpt else (ckpt,), backends, cache, prefetcher)


class Lookahead:
    """Guesses the next MoE layer's experts from this layer's hidden state with the next layer's router,
    and reads the guesses that live on disk ahead of time."""

    def __init__(self, layout: MoELayout, index: int, router, disk: DiskShard):
        self.spec, self.router, self.disk = layout.layer(index).router, router, disk

    def __call__(self, hidden: torch.Tensor) -> None:
        ids, _ = route(self.spec, hidden, self.router.weight, self.router.selection_bias, self.router.logit_bias)
        self.disk.prefetch(torch.unique(ids).tolist())


def _wire_lookahead(ckpt: Checkpoint, layout: MoELayout, built: dict[int, TieredExperts]) -> None:
    order = sorted(built)
    for here, nxt in zip(order, order[1:]):
        disk = built[nxt].disk
        if disk is not None:
            built[here].lookahead = Lookahead(layout, nxt, read_router(ckpt, layout.layer(nxt)), disk)
