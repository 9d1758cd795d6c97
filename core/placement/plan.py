"""PlacementPlan: where every part of a model lives, as frozen data with a versioned JSON form.

Every routed expert of every MoE layer is in exactly one shard; a shard is one (tier, backend, format)
of a layer with its sorted expert ids (`plan.shards(layer)`, what the tiered MoE layer builds itself
from). The disk tier is a shard with tier "disk" whose backend and format are the CPU backend and format
that compute an expert after it is read. The non-expert parts (attention, dense MLPs, shared experts,
routers, embeddings, LM head; the KV cache goes with attention) each name a tier. The plan carries the
tier budgets it was made for, so it can be checked (and printed) without the machine: `validate(layout,
budgets)` refuses a plan made for another model, and an overflow with a `PlanBudgetError` (a
`BudgetError`) naming the tier, the bytes needed and free and the biggest contributors, before anything
is read.

JSON (schema_version 1)::

    {"schema": "moetier.placement_plan", "schema_version": 1,
     "model": {"family", "version", "num_hidden_layers", "hidden_size", "shipped_format",
               "shipped_formats" (only where the layers differ, a GGUF file's: {"3": "q4_k+q6_k", ...}),
               "moe_layers": [{"index", "num_experts", "top_k", "intermediate_size"}, ...]},
     "context": 4096, "batch": 1,
     "tiers": [{"name", "device", "capacity_bytes" (null: unbounded), "reserved": {what: bytes}, "source"}],
     "parts": {"attention": "cuda:0", "embeddings": ..., ...},
     "experts": [{"layer": 3, "shards": [{"tier", "backend", "format", "experts": [ids]}, ...]}, ...],
     "cpu_copies": null | {"tier": "cpu:numa0", "format": "int4_g64"},
     "strategy": {"name": "cost", "options": {...}}, "notes": [...]}
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BudgetError, FormatError, LayoutError, SettingError
from ..experts import ExpertLayerSpec
from ..formats import get_format
from ..layout import MoELayout, stored_format
from .budgets import Budgets, TierBudget
from .model_parts import PARTS
from .sizes import format_size

SCHEMA = "moetier.placement_plan"
SCHEMA_VERSION = 1
DISK = "disk"


@dataclass(frozen=True)
class ShardSpec:
    """One (tier, backend, format) of an MoE layer and the experts it holds (sorted, unique)."""

    tier: str
    backend: str
    fmt: str
    experts: tuple[int, ...]

    def __post_init__(self):
        ids = tuple(int(e) for e in self.experts)
        if list(ids) != sorted(set(ids)):
            raise SettingError(f"shard {self.tier}/{self.backend}/{self.fmt}: expert ids must be sorted and unique")
        object.__setattr__(self, "experts", ids)


@dataclass(frozen=True)
class LayerShape:
    """What the plan knows of one MoE layer's experts (enough to size them in any format)."""

    index: int
    num_experts: int
    top_k: int
    intermediate_size: int

    def spec(self, hidden_size: int) -> ExpertLayerSpec:
        return ExpertLayerSpec(self.num_experts, self.top_k, hidden_size, self.intermediate_size)


@dataclass(frozen=True)
class ModelRef:
    family: str
    version: str
    num_hidden_layers: int
    hidden_size: int
    shipped_format: str
    layers: tuple[LayerShape, ...]
    # (MoE layer, format) where the checkpoint's layers differ (a GGUF file); None: a type moetier has no format for
    shipped_layers: tuple[tuple[int, str | None], ...] = ()

    @classmethod
    def of(cls, layout: MoELayout) -> ModelRef:
        return cls(layout.family, layout.version, layout.num_hidden_layers, layout.hidden_size,
                   layout.quantization.fmt,
                   tuple(LayerShape(m.index, m.experts.num_experts, m.experts.top_k, m.experts.intermediate_size)
                         for m in layout.moe_layers), layout.quantization.layers)

    def shipped(self, layer_index: int) -> str:
        """The format MoE layer `layer_index` ships its routed experts in (what the disk tier reads)."""
        return stored_format(self.shipped_format, self.shipped_layers, layer_index)

    def layer(self, index: int) -> LayerShape:
        for s in self.layers:
            if s.index == index:
                return s
        raise LayoutError(f"layer {index} is not an MoE layer of {self.version} (MoE layers "
                          f"{self.layers[0].index}..{self.layers[-1].index})" if self.layers else
                          f"{self.version} has no MoE layer")


@dataclass(frozen=True)
class LayerPlacement:
    index: int
    shards: tuple[ShardSpec, ...]


@dataclass(frozen=True)
class CopySpec:
    """CPU copies of the accelerator-resident experts (hot-swap headroom), on `tier` in `fmt`."""

    tier: str
    fmt: str


@dataclass(frozen=True)
class Overflow:
    tier: str
    needed: int
    free: int
    capacity: int
    contributors: tuple[tuple[str, int], ...]

    def describe(self) -> str:
        top = "; ".join(f"{what} {format_size(b)}" for what, b in self.contributors[:5])
        return (f"tier {self.tier} does not fit: needs {format_size(self.needed)} ({self.needed:,} bytes), has "
                f"{format_size(max(self.free, 0))} ({max(self.free, 0):,} bytes) free of {format_size(self.capacity)}; "
                f"biggest contributors: {top}")


class PlanBudgetError(BudgetError):
    """A plan does not fit its tiers; `overflows` holds the numbers per tier."""

    def __init__(self, overflows: Sequence[Overflow], hint: str = ""):
        self.overflows = tuple(overflows)
        super().__init__(" | ".join(o.describe() for o in self.overflows) + (f". {hint}" if hint else ""))


@dataclass(frozen=True)
class PlacementPlan:
    """Frozen placement of one model. See the module docstring; build one with `moetier.placement.make_plan`
    (budgets and a strategy) or `single_tier_plan` (every expert on one tier)."""

    model: ModelRef
    experts: tuple[LayerPlacement, ...]
    parts: tuple[tuple[str, str], ...] = ()
    tiers: tuple[TierBudget, ...] = ()
    cpu_copies: CopySpec | None = None
    context: int | None = None
    batch: int | None = None
    strategy: str = ""
    options: tuple[tuple[str, object], ...] = ()
    notes: tuple[str, ...] = field(default=())

    def __post_init__(self):
        shapes = {s.index: s for s in self.model.layers}
        seen = [p.index for p in self.experts]
        if seen != [s.index for s in self.model.layers]:
            raise SettingError(f"plan: its layers {seen[:8]}{'...' if len(seen) > 8 else ''} must be the model's MoE "
                               f"layers in order ({[s.index for s in self.model.layers][:8]}...)")
        tier_names = {t.name for t in self.tiers}
        for p in self.experts:
            n = shapes[p.index].num_experts
            keys = [(s.tier, s.backend, s.fmt) for s in p.shards]
            if len(set(keys)) != len(keys):
                raise SettingError(f"plan: layer {p.index} has two shards on the same tier, backend and format")
            ids = sorted(e for s in p.shards for e in s.experts)
            if ids != list(range(n)):
                missing = sorted(set(range(n)) - set(ids))
                extra = sorted({e for e in ids if not 0 <= e < n} | {e for e in ids if ids.count(e) > 1})
                raise SettingError(f"plan: layer {p.index} must hold each of its {n} experts in exactly one shard "
                                   f"(missing {compact_ids(missing)}; repeated or out of range {compact_ids(extra)})")
            for s in p.shards:
                try:
                    get_format(s.fmt)
                except FormatError as exc:
                    raise SettingError(f"plan: layer {p.index}: {exc}") from None
                if tier_names and s.tier not in tier_names:
                    raise SettingError(f"plan: layer {p.index} names tier {s.tier!r}, which the plan's tiers "
                                       f"({', '.join(sorted(tier_names))}) lack")
        for i, f in self.model.shipped_layers:
            try:
                f is None or get_format(f)
            except FormatError as exc:
                raise SettingError(f"plan: MoE layer {i}'s shipped format: {exc}") from None
        for part, tier in self.parts:
            if part not in PARTS:
                raise SettingError(f"plan: unknown part {part!r}; parts: {', '.join(PARTS)}")
            if tier_names and tier not in tier_names:
                raise SettingError(f"plan: part {part} is on tier {tier!r}, which the plan's tiers lack")
        object.__setattr__(self, "_by_layer", {p.index: p.shards for p in self.experts})

    # ---- what the runtime reads ---------------------------------------------------------------------
    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(p.index for p in self.experts)

    def shards(self, layer_index: int) -> tuple[ShardSpec, ...]:
        """The shards of MoE layer `layer_index`: one per distinct (tier, backend, format), experts sorted,
        every expert of the layer in exactly one."""
        try:
            return self._by_layer[layer_index]
        except KeyError:
            raise LayoutError(f"layer {layer_index} is not an MoE layer of this plan; MoE layers: "
                              f"{compact_ids(self.moe_layers)}") from None

    def shard_of(self, layer_index: int, expert: int) -> ShardSpec:
        for s in self.shards(layer_index):
            if expert in s.experts:
                return s
        raise LayoutError(f"layer {layer_index} has no expert {expert}")

    @property
    def part_tiers(self) -> dict[str, str]:
        return dict(self.parts)

    @property
    def tier_names(self) -> tuple[str, ...]:
        """Tiers in the plan's order (its budgets' order), then any tier a shard names that they lack."""
        names = [t.name for t in self.tiers]
        for p in self.experts:
            for s in p.shards:
                if s.tier not in names:
                    names.append(s.tier)
        return tuple(names)

    def tier(self, name: str) -> TierBudget:
        for t in self.tiers:
            if t.name == name:
                return t
        raise SettingError(f"plan has no tier {name!r}")

    def expert_count(self, tier: str) -> int:
        return sum(len(s.experts) for p in self.experts for s in p.shards if s.tier == tier)

    # ---- accounting ---------------------------------------------------------------------------------
    def layer_bytes(self, layer_index: int) -> dict[str, int]:
        """tier -> bytes of this layer's experts there (disk: as read from the files, in the shipped format)."""
        shape = self.model.layer(layer_index).spec(self.model.hidden_size)
        out: dict[str, int] = {}
        for s in self.shards(layer_index):
            fmt = self.model.shipped(layer_index) if s.tier == DISK else s.fmt
            out[s.tier] = out.get(s.tier, 0) + len(s.experts) * shape.expert_bytes(fmt)
        return out

    def usage(self, tiers: Iterable[TierBudget] | None = None) -> dict[str, list[tuple[str, int]]]:
        """tier -> (what, bytes) it holds: the reservations of `tiers` (default: the plan's own budgets),
        the routed experts per format, and CPU copies."""
        tiers = self.tiers if tiers is None else tuple(tiers)
        out: dict[str, list[tuple[str, int]]] = {t.name: list(t.reserved) for t in tiers}
        for t in self.tier_names:
            out.setdefault(t, [])
        groups: dict[tuple[str, str], list[int]] = {}  # (tier, fmt) -> [count, bytes, first, last]
        for p in self.experts:
            spec = self.model.layer(p.index).spec(self.model.hidden_size)
            for s in p.shards:
                if not s.experts:
                    continue
                fmt = self.model.shipped(p.index) if s.tier == DISK else s.fmt
                g = groups.setdefault((s.tier, fmt), [0, 0, p.index, p.index])
                g[0] += len(s.experts)
                g[1] += len(s.experts) * spec.expert_bytes(fmt)
                g[3] = p.index
        for (tier, fmt), (count, nbytes, first, last) in groups.items():
            where = f"layer {first}" if first == last else f"layers {first}-{last}"
            what = "left on disk" if tier == DISK else "routed experts"
            out[tier].append((f"{what} ({count:,} in {fmt}, {where})", nbytes))
        if self.cpu_copies is not None:
            n, nbytes = 0, 0
            for p in self.experts:
                spec = self.model.layer(p.index).spec(self.model.hidden_size)
                for s in p.shards:
                    if _device_kind(self, s.tier) == "accelerator":
                        n += len(s.experts)
                        nbytes += len(s.experts) * spec.expert_bytes(self.cpu_copies.fmt)
            out.setdefault(self.cpu_copies.tier, []).append(
                (f"CPU copies of {n:,} accelerator experts ({self.cpu_copies.fmt})", nbytes))
        return out

    def used_bytes(self, tier: str) -> int:
        return sum(b for _, b in self.usage().get(tier, ()))

    @property
    def disk_cache_bytes(self) -> int:
        return sum(b for t in self.tiers for what, b in t.reserved if what == "disk cache")

    # ---- checks ---------------------------------------------------------------------------------------
    def check_layout(self, layout: MoELayout) -> None:
        """Refuse a plan made for another model (other MoE layers, expert counts or widths), or for a file
        storing its layers in other formats (a GGUF of another quantization mix: its shards would convert)."""
        mine = ModelRef.of(layout)
        planned, given = dict(self.model.shipped_layers), dict(mine.shipped_layers)
        if planned != given:
            differ = [i for i in self.moe_layers if planned.get(i) != given.get(i)] or [self.moe_layers[0]]
            i = differ[0]
            raise LayoutError(f"this plan was made for a file storing MoE layer {i}'s experts as "
                              f"{planned.get(i, self.model.shipped_format)}; the model given stores them as "
                              f"{given.get(i, mine.shipped_format)} ({len(differ)} layer(s) differ); make a plan for "
                              "it with `moetier plan`")
        if (mine.hidden_size, mine.layers) != (self.model.hidden_size, self.model.layers):
            raise LayoutError(f"this plan was made for {self.model.version} ({len(self.model.layers)} MoE layers x "
                              f"{self.model.layers[0].num_experts if self.model.layers else 0} experts, hidden "
                              f"{self.model.hidden_size}); the model given is {layout.version} "
                              f"({len(mine.layers)} MoE layers x {mine.layers[0].num_experts if mine.layers else 0} "
                              f"experts, hidden {mine.hidden_size}); make a plan for it with `moetier plan`")

    def check_budgets(self, budgets: Budgets | Iterable[TierBudget] | None = None, hint: str = "") -> None:
        """PlanBudgetError when a tier holds more than its capacity (the plan's own tiers by default)."""
        tiers = self.tiers if budgets is None else (budgets.tiers if isinstance(budgets, Budgets) else tuple(budgets))
        by_name = {t.name: t for t in tiers}
        if tiers:
            for name in self.tier_names:
                if name not in by_name:
                    raise BudgetError(f"the plan puts experts on tier {name!r}, which is not here; tiers: "
                                      f"{', '.join(by_name)}")
        usage = self.usage(tiers)
        overflows = []
        for t in tiers:
            if t.capacity_bytes is None:
                continue
            items = sorted(usage.get(t.name, ()), key=lambda c: -c[1])
            needed = sum(b for _, b in items)
            if needed > t.capacity_bytes:
                overflows.append(Overflow(t.name, needed, t.capacity_bytes - t.reserved_bytes, t.capacity_bytes,
                                          tuple(items)))
        if overflows:
            raise PlanBudgetError(overflows, hint)

    def validate(self, layout: MoELayout, budgets: Budgets | Iterable[TierBudget] | None = None) -> None:
        """Everything that can be checked before anything is read: the plan matches `layout`, and every
        tier holds at most its capacity (`budgets`, or the plan's own)."""
        self.check_layout(layout)
        self.check_budgets(budgets)

    # ---- JSON -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        m = self.model
        return {
            "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
            "model": {"family": m.family, "version": m.version, "num_hidden_layers": m.num_hidden_layers,
                      "hidden_size": m.hidden_size, "shipped_format": m.shipped_format,
                      **({"shipped_formats": {str(i): f for i, f in m.shipped_layers}} if m.shipped_layers else {}),
                      "moe_layers": [{"index": s.index, "num_experts": s.num_experts, "top_k": s.top_k,
                                      "intermediate_size": s.intermediate_size} for s in m.layers]},
            "context": self.context, "batch": self.batch,
            "tiers": [t.to_dict() for t in self.tiers],
            "parts": dict(self.parts),
            "experts": [{"layer": p.index, "shards": [{"tier": s.tier, "backend": s.backend, "format": s.fmt,
                                                       "experts": list(s.experts)} for s in p.shards]}
                        for p in self.experts],
            "cpu_copies": None if self.cpu_copies is None else {"tier": self.cpu_copies.tier,
                                                                 "format": self.cpu_copies.fmt},
            "strategy": {"name": self.strategy, "options": dict(self.options)},
            "notes": list(self.notes),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1) + "\n"

    @classmethod
    def from_dict(cls, d: Mapping, source: str = "plan") -> PlacementPlan:
        if not isinstance(d, Mapping) or d.get("schema") != SCHEMA:
            raise SettingError(f"{source}: not a moetier placement plan (no \"schema\": \"{SCHEMA}\")")
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise SettingError(f"{source}: placement plan schema_version {version!r} is not supported; this moetier "
                               f"reads version {SCHEMA_VERSION} (make the plan again with this moetier's "
                               "`moetier plan`)")
        try:
            m = d["model"]
            model = ModelRef(str(m["family"]), str(m["version"]), int(m["num_hidden_layers"]), int(m["hidden_size"]),
                             str(m["shipped_format"]),
                             tuple(LayerShape(int(x["index"]), int(x["num_experts"]), int(x["top_k"]),
                                              int(x["intermediate_size"])) for x in m["moe_layers"]),
                             tuple((int(i), None if f is None else str(f))
                                   for i, f in dict(m.get("shipped_formats") or {}).items()))
            experts = tuple(LayerPlacement(int(p["layer"]), tuple(
                ShardSpec(str(s["tier"]), str(s["backend"]), str(s["format"]), tuple(int(e) for e in s["experts"]))
                for s in p["shards"])) for p in d["experts"])
            copies = d.get("cpu_copies")
            strategy = d.get("strategy") or {}
            return cls(model, experts, tuple((str(k), str(v)) for k, v in dict(d.get("parts") or {}).items()),
                       tuple(TierBudget.from_dict(t) for t in d.get("tiers") or ()),
                       None if copies is None else CopySpec(str(copies["tier"]), str(copies["format"])),
                       d.get("context"), d.get("batch"), str(strategy.get("name", "")),
                       tuple(dict(strategy.get("options") or {}).items()), tuple(d.get("notes") or ()))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SettingError(f"{source}: malformed placement plan ({type(exc).__name__}: {exc})") from None

    @classmethod
    def from_json(cls, text: str, source: str = "plan") -> PlacementPlan:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SettingError(f"{source}: not JSON ({exc})") from None
        return cls.from_dict(d, source)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> PlacementPlan:
        p = Path(path)
        try:
            text = p.read_text()
        except FileNotFoundError:
            raise SettingError(f"placement plan {path}: no such file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise SettingError(f"placement plan {path}: cannot read it ({exc})") from None
        return cls.from_json(text, str(path))


def _device_kind(plan: PlacementPlan, tier: str) -> str:
    for t in plan.tiers:
        if t.name == tier:
            return t.kind
    return "disk" if tier == DISK else ("cpu" if tier.startswith("cpu") else "accelerator")


def compact_ids(ids: Sequence[int]) -> str:
    """Compact id list: "0-5, 9, 12-13"."""
    ids = sorted(ids)
    if not ids:
        return "none"
    runs, start, prev = [], ids[0], ids[0]
    for e in ids[1:]:
        if e == prev + 1:
            prev = e
            continue
        runs.append((start, prev))
        start = prev = e
    runs.append((start, prev))
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


def single_tier_plan(layout: MoELayout, backend: str, fmt: str | Mapping[int, str],
                     tier: str = "cpu:numa0") -> PlacementPlan:
    """The trivial plan: every expert of every MoE layer on one tier and backend, in `fmt` (or in
    fmt[layer], for a file whose layers store their experts in different formats); every other part on
    that tier too. No budgets: `validate(layout, budgets)` checks it against a machine when wanted."""
    model = ModelRef.of(layout)
    by_layer = fmt if isinstance(fmt, Mapping) else {s.index: fmt for s in model.layers}
    missing = [s.index for s in model.layers if s.index not in by_layer]
    if missing:
        raise SettingError(f"single_tier_plan: no format for MoE layers {missing}")
    for f in set(by_layer.values()):
        get_format(f)
    experts = tuple(LayerPlacement(s.index, (ShardSpec(tier, backend, by_layer[s.index],
                                                       tuple(range(s.num_experts))),))
                    for s in model.layers)
    return PlacementPlan(model, experts, tuple((p, tier) for p in PARTS), strategy="single-tier")
