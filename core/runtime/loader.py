"""Loading a checkpoint's routed experts where a placement plan puts them.

`load_experts(model, plan=...)` opens the checkpoint lazily, creates each backend the plan names once
(through the registry), and for every MoE layer prepares one shard per (backend, format) from memory
tiers and a disk shard for the experts left on disk, reading one expert at a time (peak memory: what
the plan keeps resident plus about one expert). The result maps a layer index to its `TieredExperts`.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
import torch

from ..checkpoint import Checkpoint
from ..checkpoint.experts import CheckpointExperts, read_router
from ..errors import SettingError
from ..experts import ExpertBackend
from ..family import load_layout
from ..layout import MoELayout
from ..placement.plan import DISK, PlacementPlan, single_tier_plan
from ..tiers import Tier, TierLedger
from .deferral import Deferral
from .disk_tier import CacheCounters, DiskShard, ExpertCache, Prefetcher
from .moe_block import default_format
from .routing import route
from .tiered import Recorder, Shard, TieredExperts



class ModelExperts(Mapping):
    """Layer index -> TieredExperts for a whole checkpoint; close() releases the files and the prefetcher."""

    def __init__(self, layout: MoELayout, layers: dict[int, TieredExperts], checkpoints: tuple[Checkpoint, ...],
                 backends: dict[str, ExpertBackend], cache: ExpertCache | None, prefetcher: Prefetcher | None):
        self.layout, self._layers, self._checkpoints = layout, layers, checkpoints
        self.backends, self.cache, self.prefetcher = backends, cache, prefetcher
        self._deferral: Deferral | None = None
        self.ledger: TierLedger | None = None  # a PlacementPlan's bounded tiers: real packed bytes against them
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
    """Prepare the routed experts of checkpoint `model` (a folder, its config.json, or a GGUF file).

    plan: anything with `shards(layer_index) -> [ShardSpec-like]`; a moetier.placement PlacementPlan is
    checked against the model and its budgets before anything is read, and the bytes really packed on
    each tier are accounted against them (BudgetError naming the tier if the packed layout needs more).
    Every tier a plan names must exist on this machine (the registry's tier providers on `inventory`).
    Default: every expert on the CPU backend the selection picks, in `fmt` (default: the checkpoint's
    format, for a GGUF file each layer's own; a backend that lacks it is a FormatError). cache_bytes: the DRAM budget of the disk tier's
    cache (default: the plan's "disk cache" reservation; required when experts stay on disk). layers:
    only these MoE layers."""
    from ..checkpoint.gguf import GGUFFile, is_gguf
    from ..hardware import load_inventory
    from ..plugins import get_registry

    registry = registry or get_registry()
    inventory = inventory or load_inventory()
    gguf = GGUFFile(model) if is_gguf(model) else None
    try:
        return _load_experts(model, gguf, plan=plan, fmt=fmt, registry=registry, inventory=inventory, threads=threads,
                             cache_bytes=cache_bytes, prefetch=prefetch, layers=layers, progress=progress)
    except BaseException:
        if gguf is not None:
            gguf.close()
        raise


def _load_experts(model, gguf, *, plan, fmt, registry, inventory, threads, cache_bytes, prefetch, layers,
                  progress) -> ModelExperts:
    """load_experts, with the GGUF file open when `model` is one (its experts are read in each layer's own
    format: a GGUF file may store them in a different type per layer)."""
    from ..checkpoint.gguf import GGUFExperts, GGUFFile
    from ..selection import select_backends

    layout = gguf.layout(registry) if gguf is not None else load_layout(model, registry)
    backends: dict[str, ExpertBackend] = {}

    def backend(name: str) -> ExpertBackend:
        if name not in backends:
            backends[name] = registry.backend(name).create(inventory, threads=threads)
        return backends[name]

    if plan is None:
        name = select_backends(registry, inventory).for_device("cpu")
        if name is None:
            raise SettingError("no CPU backend can run here (see `moetier doctor`)")
        if gguf is not None:
            from .gguf_model import file_formats
            plan = single_tier_plan(layout, name, file_formats(gguf, layout, backend(name), fmt))
        else:
            plan = single_tier_plan(layout, name, fmt or default_format(layout, backend(name)))
    elif fmt is not None:
        raise SettingError("give the weight format in the plan, not beside it")
    wanted = tuple(layout.moe_layer_indices if layers is None else layers)
    ledger = _check_plan(plan, layout, registry, inventory, wanted)
    if cache_bytes is None and getattr(plan, "disk_cache_bytes", 0):
        cache_bytes = plan.disk_cache_bytes
    ckpt = gguf if gguf is not None else Checkpoint(model)

    def source_of(layer, reader=None, **kw):
        """Layer `layer`'s experts read from `reader` (default: the checkpoint or GGUF file opened for loading)."""
        if gguf is None:
            return CheckpointExperts(reader or ckpt, layout, layer, **kw)
        # A type without a moetier format is read through the gguf dequantizer (the plan converts it).
        return GGUFExperts(reader or gguf, layer, convert=True, **kw)

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
                source = source_of(layer, progress=progress)
                try:
                    prepared = b.prepare(layer.experts, source, ids, f)
                finally:
                    source.done()
                # The shard can read its experts again from the checkpoint (a large prefill may stream them).
                shard = Shard(b, prepared, {e: m.tier for m in members for e in m.experts}, source_of(layer))
                for tier, n in shard.bytes_per_tier().items():
                    if ledger is not None and tier in ledger.tiers:
                        ledger.reserve(tier, n)  # real packed bytes: padding and tables count
                shards.append(shard)
            disk = None
            if disk_specs:
                if cache_bytes is None:
                    raise SettingError("the plan leaves experts on disk: give the DRAM budget of their cache "
                                       "(cache_bytes)")
                if cache is None:
                    cache = ExpertCache(cache_bytes)
                    prefetcher = Prefetcher(cache) if prefetch else None
                    # its own handle, whose reads leave neither mapped pages nor the page cache behind
                    disk_ckpt = (GGUFFile(model, drop_page_cache=True) if gguf is not None else
                                 Checkpoint(model, max_mapped_bytes=0, drop_page_cache=True))
                if len({(s.backend, s.fmt) for s in disk_specs}) != 1:
                    raise SettingError(f"layer {index}: the disk tier's experts must share one backend and format")
                d = disk_specs[0]
                disk = DiskShard(index, layer.experts, [e for s in disk_specs for e in s.experts],
                                 source_of(layer, disk_ckpt), backend(d.backend), d.fmt, cache, prefetcher)
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
    experts = ModelExperts(layout, built, (ckpt, disk_ckpt) if disk_ckpt else (ckpt,), backends, cache, prefetcher)
    experts.ledger = ledger
    return experts


def _check_plan(plan, layout: MoELayout, registry, inventory, wanted) -> TierLedger | None:
    """Refuse, before anything is read, a plan for another model, over its budgets, or naming a tier this
    machine lacks; return the ledger of its bounded tiers' free bytes."""
    here = {t.name for p in registry.tiers.values() for t in p.discover(inventory)} | {DISK}
    named = {s.tier for i in wanted for s in plan.shards(i)}
    missing = sorted(named - here)
    if missing:
        raise SettingError(f"the plan puts experts on {', '.join(missing)}, which this machine lacks "
                           f"(tiers here: {', '.join(sorted(here))}); make a plan for this machine with "
                           "`moetier plan`")
    if not isinstance(plan, PlacementPlan):
        return None
    plan.check_layout(layout)
    plan.check_budgets()
    bounded = [t for t in plan.tiers if t.capacity_bytes is not None and t.name in named]
    # free_bytes: capacity less the plan's reservations (non-expert parts, KV cache, the disk cache)
    return TierLedger([Tier(t.name, t.device, max(0, t.free_bytes)) for t in bounded])


class Lookahead:
    """Guesses the next MoE layer's experts from this layer's hidden state with the next layer's router,
    and reads the guesses that live on disk ahead of time."""

    def __init__(self, layout: MoELayout, index: int, router, disk: DiskShard):
        self.spec, self.router, self.disk = layout.layer(index).router, router, disk

    def __call__(self, hidden: torch.Tensor) -> None:
        ids, _ = route(self.spec, hidden, self.router.weight, self.router.selection_bias, self.router.logit_bias)
        self.disk.prefetch(torch.unique(ids).tolist())


def _wire_lookahead(ckpt, layout: MoELayout, built: dict[int, TieredExperts]) -> None:
    """Each layer guesses the next one's disk experts with the next router (read from `ckpt`: a Checkpoint
    or a GGUFFile)."""
    from ..checkpoint.gguf import GGUFFile, read_router as gguf_router

    routers = gguf_router if isinstance(ckpt, GGUFFile) else read_router
    order = sorted(built)
    for here, nxt in zip(order, order[1:]):
        disk = built[nxt].disk
        if disk is not None:
            built[here].lookahead = Lookahead(layout, nxt, routers(ckpt, layout.layer(nxt)), disk)
