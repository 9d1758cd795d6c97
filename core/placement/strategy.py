"""What a placement strategy plugin registers, what it is given, and the helpers most strategies need.

A strategy decides only which tier each routed expert lives on; formats and backends per tier, the
non-expert parts and the budgets are the planner's. It gets a `PlacementProblem` (the layout, the tiers
with the bytes each has left for experts, fastest first, the activation statistics if any, the tier
speeds, its options) and returns `{layer: [tier name per expert id]}`. Most strategies only rank the
experts and let `problem.fill(order)` place them greedily: each expert in rank order into the fastest
tier with room (each layer split evenly over the tiers of one kind, e.g. NUMA nodes), with per-layer bounds on
the fastest kind.

Example (a whole out-of-tree strategy: the most recently added experts first)::

    import moetier
    from moetier.placement import PlacementStrategy

    def newest_first(problem):
        order = [(m.index, e) for m in problem.layout.moe_layers
                 for e in reversed(range(m.experts.num_experts))]
        return problem.fill(order)

    @moetier.hookimpl
    def moetier_register_placements(register):
        register(PlacementStrategy("newest-first", "highest expert ids on the fast tier", newest_first))
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import BudgetError, FormatError, SettingError
from ..layout import MoELayout
from .stats import ActivationStats

Assignment = Mapping[int, list[str]]  # MoE layer index -> tier name per expert id
KIND_ORDER = ("accelerator", "cpu", "disk")


@dataclass(frozen=True)
class PlacementStrategy:
    """name: what --strategy takes; place(problem) -> {layer: [tier per expert]}; needs_stats: refuse to
    run without activation statistics (never fall back silently); options: the option names it reads
    from `problem.options` (the CLI refuses the others)."""

    name: str
    description: str
    place: Callable[[PlacementProblem], Assignment]
    needs_stats: bool = False
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExpertTier:
    """A tier experts may go to: `free_bytes` left for experts (None: unbounded), the format they are
    computed in there (None: each MoE layer in the one it ships in), and the tier kind ("accelerator",
    "cpu", "disk")."""

    name: str
    kind: str
    free_bytes: int | None
    fmt: str | None


@dataclass(frozen=True)
class PlacementProblem:
    layout: MoELayout
    tiers: tuple[ExpertTier, ...]
    stats: ActivationStats | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    speeds: Any = None  # moetier.placement.speeds.Speeds, when known
    context: int = 4096
    batch: int = 1
    copy_tier: str | None = None  # CPU copies of accelerator experts are held here (in copy_fmt)
    copy_fmt: str | None = None

    # ---- what strategies read --------------------------------------------------------------------------
    @property
    def moe_layers(self) -> tuple[int, ...]:
        return self.layout.moe_layer_indices

    def num_experts(self, layer: int) -> int:
        return self.layout.layer(layer).experts.num_experts

    def compute_format(self, layer: int, tier: str) -> str:
        """The format `tier` computes MoE layer `layer`'s experts in."""
        fmt = self.tier(tier).fmt
        return self.layout.quantization.fmt_of(layer) if fmt is None else fmt

    def expert_bytes(self, layer: int, tier: str) -> int:
        """Bytes one expert of `layer` takes on `tier` (disk: as shipped, what a read brings in)."""
        t = self.tier(tier)
        if t.kind != "disk":
            return self.layout.layer(layer).experts.expert_bytes(self.compute_format(layer, tier))
        try:
            return self.layout.layer(layer).experts.expert_bytes(self.layout.quantization.fmt_of(layer))
        except FormatError:
            raise SettingError(f"MoE layer {layer}'s experts cannot be left on disk: the file stores them in no format "
                               "moetier computes as stored (`moetier zoo show FILE` lists the types), so they are read "
                               "only converted, on load; give them room in memory (a larger --cpu-mem) or leave out "
                               "--disk") from None

    def tier(self, name: str) -> ExpertTier:
        for t in self.tiers:
            if t.name == name:
                return t
        raise SettingError(f"no tier named {name!r}; tiers: {', '.join(t.name for t in self.tiers)}")

    @property
    def classes(self) -> tuple[tuple[ExpertTier, ...], ...]:
        """The tiers grouped by kind, fastest kind first."""
        return tuple(tuple(t for t in self.tiers if t.kind == k) for k in KIND_ORDER
                     if any(t.kind == k for t in self.tiers))

    def require_stats(self, strategy: str) -> ActivationStats:
        if self.stats is None:
            raise SettingError(f"strategy {strategy!r} ranks experts by recorded activations: give --stats FILE "
                               "(moetier statistics or an SGLang expert-distribution dump), or use "
                               "--strategy uniform")
        return self.stats

    def counts(self, layer: int) -> torch.Tensor | None:
        if self.stats is None:
            return None
        return self.stats.row(layer)

    def ranked(self, layer: int) -> list[int]:
        """A layer's experts, hottest first when statistics exist (ties by id), else spread over the ids
        (`spread_order`), never simply 0..n-1."""
        c = self.counts(layer)
        n = self.num_experts(layer)
        if c is None or int(c.sum()) == 0:
            return spread_order(n)
        return sorted(range(n), key=lambda e: (-int(c[e]), e))

    # ---- the common placement -----------------------------------------------------------------------------
    def fill(self, order: Iterable[tuple[int, int]], *, pinned: Mapping[tuple[int, int], str] | None = None,
             min_fast: int | None = None, max_fast: int | None = None) -> dict[int, list[str]]:
        """Place experts in `order` ((layer, expert) pairs, best first; any left out follow in
        `round_robin` order): each into the fastest kind of tier with room for it; within a kind, the tier
        holding fewest of that layer's experts (then the one with most room), so each layer is split
        evenly over NUMA nodes or devices. `pinned` experts go first to the tier (or kind: "accelerator", "cpu",
        "disk") named. min_fast / max_fast: bounds on the experts per layer on the fastest kind (only
        when there is a slower kind). An expert no tier has room for goes to the slowest tier, where the
        plan's budget check reports it with the numbers."""
        classes = self.classes
        if not classes:
            raise SettingError("no tier to place experts on")
        bounded = len(classes) > 1
        if min_fast is not None and max_fast is not None and min_fast > max_fast:
            raise SettingError(f"--min-per-layer {min_fast} exceeds --max-per-layer {max_fast}")
        free = {t.name: t.free_bytes for t in self.tiers}
        if self.copy_tier is not None and self.copy_tier not in free:
            raise SettingError(f"copy tier {self.copy_tier!r} is not a tier")
        out = {i: [None] * self.num_experts(i) for i in self.moe_layers}
        fast_count = dict.fromkeys(self.moe_layers, 0)
        per_layer = {i: dict.fromkeys(free, 0) for i in self.moe_layers}  # experts of each layer per tier
        fast = {t.name for t in classes[0]}

        def room(tier: str, nbytes: int) -> bool:
            return free[tier] is None or free[tier] >= nbytes

        def put(layer: int, e: int, tier: str) -> None:
            out[layer][e] = tier
            per_layer[layer][tier] += 1
            if free[tier] is not None:
                free[tier] -= self.expert_bytes(layer, tier)
            if tier in fast:
                fast_count[layer] += 1
            if self.copy_tier is not None and self.tier(tier).kind == "accelerator":
                free[self.copy_tier] -= self.layout.layer(layer).experts.expert_bytes(self.copy_fmt)

        def fits(layer: int, tier: str) -> bool:
            need = self.expert_bytes(layer, tier)
            if not room(tier, need):
                return False
            if self.copy_tier is not None and self.tier(tier).kind == "accelerator":
                return room(self.copy_tier, self.layout.layer(layer).experts.expert_bytes(self.copy_fmt))
            return True

        def best_in(cls, layer: int) -> str | None:
            # Split every layer evenly over the tiers of a kind (each NUMA node then streams its part of
            # every layer, so all nodes' bandwidth serves each layer), then the one with the most room.
            ok = [t for t in cls if fits(layer, t.name)]
            if not ok:
                return None
            return min(ok, key=lambda t: (per_layer[layer][t.name],
                                          -(float("inf") if free[t.name] is None else free[t.name]))).name

        names = {t.name for t in self.tiers}
        for (layer, e), target in (pinned or {}).items():
            if target in names:
                tier = target
            else:
                cls = [t for t in self.tiers if t.kind == target]
                if not cls:
                    raise SettingError(f"no {target} tier here; tiers: {', '.join(sorted(names))}")
                tier = best_in(cls, layer) or cls[-1].name
            put(layer, e, tier)

        order = list(order)
        seen = set(order)
        order += [p for p in round_robin({i: spread_order(self.num_experts(i)) for i in self.moe_layers})
                  if p not in seen]
        if bounded and min_fast:
            for layer in self.moe_layers:
                for (l_, e) in (p for p in order if p[0] == layer):
                    if fast_count[layer] >= min_fast:
                        break
                    if out[layer][e] is not None:
                        continue
                    tier = best_in(classes[0], layer)
                    if tier is None:
                        need = min_fast * len(self.moe_layers)
                        raise BudgetError(f"--min-per-layer {min_fast}: {need} experts must fit on the "
                                          f"{classes[0][0].kind} tiers, but they are full after "
                                          f"{sum(fast_count.values())}")
                    put(layer, e, tier)
        for layer, e in order:
            if out[layer][e] is not None:
                continue
            for k, cls in enumerate(classes):
                if k == 0 and bounded and max_fast is not None and fast_count[layer] >= max_fast:
                    continue
                tier = best_in(cls, layer)
                if tier is not None:
                    put(layer, e, tier)
                    break
            else:
                put(layer, e, classes[-1][-1].name)
        return out


def spread_order(n: int) -> list[int]:
    """0..n-1 in bit-reversed (van der Corput) order: every prefix is spread evenly over the ids, so a
    placement without statistics never means "experts 0..k-1", whose ids carry no meaning."""
    bits = max(1, (n - 1).bit_length())
    out = []
    for i in range(1 << bits):
        r = int(format(i, f"0{bits}b")[::-1], 2)
        if r < n:
            out.append(r)
    return out


def round_robin(per_layer: Mapping[int, list[int]]) -> list[tuple[int, int]]:
    """(layer, expert) pairs: each layer's first, then each layer's second, ... (layers in order)."""
    out, depth = [], max((len(v) for v in per_layer.values()), default=0)
    for r in range(depth):
        for layer, ranked in per_layer.items():
            if r < len(ranked):
                out.append((layer, ranked[r]))
    return out
