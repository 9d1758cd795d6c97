"""Making a plan: a model (layout and parts), tier budgets, a strategy -> a checked PlacementPlan.

Formats per tier: accelerator experts stay as shipped (the checkpoint's own format); CPU experts are in
`cpu_format` when asked (converted on load), else as shipped; a CPU backend that does not compute the
shipped format is an error naming the choices (converting silently, e.g. mxfp4 to bf16, is four times
the memory: never a default); experts left on disk are read in the shipped format and computed by the CPU backend in the CPU
format. An accelerator-resident expert has no CPU copy unless `cpu_copies` asks for one.

"As shipped" is per MoE layer (`layout.quantization.fmt_of`): a GGUF file's layers may each store their
experts in another type (Q4_K_M keeps some layers' down in Q6_K), and a tier computing them as shipped
holds each layer in its own (TierCompute.fmt None). The accelerator backends compute no GGML type, so a
GGUF file's experts are placed on the CPU and disk tiers only: an accelerator tier holds its other parts
(TierCompute.experts False), and the plan says so.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import SettingError
from ..formats import computes, get_format
from ..layout import MoELayout
from .budgets import Budgets
from .model_parts import PARTS, ModelParts
from .plan import DISK, CopySpec, LayerPlacement, ModelRef, PlacementPlan, ShardSpec
from .sizes import format_size
from .stats import ActivationStats
from .strategy import ExpertTier, PlacementProblem, PlacementStrategy


@dataclass(frozen=True)
class TierCompute:
    """Who computes the experts of a tier, in which format (None: each MoE layer in the one it ships in);
    experts False: the tier holds none (its backend cannot compute them as shipped)."""

    backend: str
    fmt: str | None
    experts: bool = True


def tier_compute(layout: MoELayout, budgets: Budgets, *, cpu_backend: str, cpu_formats: tuple[str, ...],
                 accelerator_backends: Mapping[str, str], cpu_format: str | None = None,
                 cpu_mixed: bool = False) -> dict[str, TierCompute]:
    """tier -> (backend, format) by the rules of the module docstring. accelerator_backends: device kind
    -> backend name ("cuda" -> "cuda"). cpu_mixed: the CPU backend computes mixed formats (q4_k+q6_k)."""
    q = layout.quantization
    shipped = q.fmt
    if cpu_format is not None:
        get_format(cpu_format)
        if cpu_format not in cpu_formats:
            raise SettingError(f"--cpu-format {cpu_format}: backend {cpu_backend} does not compute it; it computes "
                               f"{', '.join(cpu_formats)}")
        cpu_fmt = cpu_format
    elif q.layers:  # each layer as the file stores it
        for i in layout.moe_layer_indices:
            f = q.fmt_of(i)
            if not computes(cpu_formats, f, mixed=cpu_mixed):
                raise SettingError(f"backend {cpu_backend} does not compute {f}, the format MoE layer {i}'s experts "
                                   f"are stored in; give --cpu-format (one of {', '.join(cpu_formats)}) or --backend "
                                   f"with one that computes it")
        cpu_fmt = None
    elif shipped in cpu_formats:
        cpu_fmt = shipped
    else:
        raise SettingError(f"backend {cpu_backend} does not compute {shipped}, the format this model's experts are "
                           f"shipped in; give --cpu-format (one of {', '.join(cpu_formats)}) or --backend with one "
                           f"that computes {shipped}")
    out = {}
    for t in budgets.tiers:
        if t.kind == "accelerator":
            backend = accelerator_backends.get(t.device)
            if backend is None:
                raise SettingError(f"no backend is registered for {t.device} devices (tier {t.name})")
            out[t.name] = TierCompute(backend, shipped, experts=q.scheme != "gguf")
        else:  # CPU nodes, and the disk tier, computed by the CPU after a read
            out[t.name] = TierCompute(cpu_backend, cpu_fmt)
    return out


def make_plan(layout: MoELayout, parts: ModelParts, budgets: Budgets, strategy: PlacementStrategy,
              compute: Mapping[str, TierCompute], *, stats: ActivationStats | None = None, speeds=None,
              options: Mapping[str, Any] | None = None, cpu_copies: bool = False, check: bool = True,
              notes: tuple[str, ...] = ()) -> PlacementPlan:
    """Run `strategy` on the budgets' free bytes and freeze the result. check: raise PlanBudgetError
    (with the numbers and what would fit instead) when a tier overflows; with check=False the plan is
    returned as is, for printing."""
    options = {k: v for k, v in dict(options or {}).items() if v is not None}
    if stats is not None:
        stats.check_layout(layout.moe_layer_indices, layout.moe_layers[0].experts.num_experts, layout.version)
    elif strategy.needs_stats:
        raise SettingError(f"strategy {strategy.name!r} ranks experts by recorded activations: give --stats FILE "
                           "(moetier statistics or an SGLang expert-distribution dump), or use --strategy uniform")
    cpu_tiers = budgets.of_kind("cpu")
    copy = None
    if cpu_copies:
        if not cpu_tiers or not budgets.of_kind("accelerator"):
            raise SettingError("--cpu-copies keeps CPU copies of accelerator experts: it needs both tiers")
        fmt = compute[cpu_tiers[0].name].fmt
        if fmt is None:
            raise SettingError("--cpu-copies holds the CPU copies of accelerator experts in one format: give --cpu-format")
        copy = CopySpec(cpu_tiers[0].name, fmt)
    tiers = tuple(ExpertTier(t.name, t.kind, t.free_bytes if compute[t.name].experts else 0, compute[t.name].fmt)
                  for t in budgets.tiers)
    without = [t.name for t in budgets.tiers if not compute[t.name].experts]
    if without:
        notes = tuple(notes) + (f"{', '.join(without)}: no routed experts (no backend there computes the GGML types "
                                "the file stores them in; they stay on the CPU and disk tiers)",)
    problem = PlacementProblem(layout, tiers, stats, options, speeds, budgets.context, budgets.batch,
                               copy.tier if copy else None, copy.fmt if copy else None)
    assignment = strategy.place(problem)
    layers = []
    names = set(budgets.names)
    for m in layout.moe_layers:
        tiers_of = assignment.get(m.index) if isinstance(assignment, Mapping) else None
        if tiers_of is None or len(tiers_of) != m.experts.num_experts:
            raise SettingError(f"strategy {strategy.name!r} did not place every expert of layer {m.index}")
        groups: dict[str, list[int]] = {}
        for e, tier in enumerate(tiers_of):
            if tier not in names:
                raise SettingError(f"strategy {strategy.name!r} put expert {e} of layer {m.index} on tier {tier!r}, "
                                   f"which is not one of {', '.join(budgets.names)}")
            groups.setdefault(tier, []).append(e)
        order = {t: k for k, t in enumerate(budgets.names)}
        shards = tuple(ShardSpec(t, compute[t].backend, problem.compute_format(m.index, t), tuple(ids))
                       for t, ids in sorted(groups.items(), key=lambda kv: order[kv[0]]))
        layers.append(LayerPlacement(m.index, shards))
    shown = {k: list(v) if k == "rules" else v for k, v in options.items()}  # JSON-able
    plan = PlacementPlan(ModelRef.of(layout), tuple(layers), tuple((p, budgets.parts_tier) for p in PARTS),
                         budgets.tiers, copy, budgets.context, budgets.batch, strategy.name,
                         tuple(sorted(shown.items())), tuple(budgets.assumptions) + tuple(notes))
    if check:
        plan.check_budgets(hint=fit_hint(layout, parts, budgets, compute))
    return plan


def fit_hint(layout: MoELayout, parts: ModelParts, budgets: Budgets, compute: Mapping[str, TierCompute]) -> str:
    """What would make the model fit: a smaller CPU format, the disk tier, or less context."""
    free_total = sum(t.free_bytes for t in budgets.tiers if t.free_bytes is not None and t.kind != "disk")
    have = [t.name for t in budgets.tiers]
    cpu = [t for t in budgets.tiers if t.kind == "cpu"]
    hints = []
    for fmt in ("int8", "int4_g64"):
        if cpu and compute[cpu[0].name].fmt in (fmt, "int4_g32", "int4_g64", "int4_g128"):
            continue
        need = sum(m.experts.num_experts * m.experts.expert_bytes(fmt) for m in layout.moe_layers)
        if need <= free_total:
            hints.append(f"--cpu-format {fmt} (all experts: {format_size(need)})")
            break
    if DISK not in have:
        hints.append("--disk (leave the experts that do not fit in their files)")
    parts_tier = budgets.tier(budgets.parts_tier)
    if parts_tier.free_bytes is not None and parts_tier.free_bytes < 0:
        hints.append("a smaller --context, or --gpu-mem 0 to keep the non-expert parts in DRAM")
    return ("It would fit with " + " or ".join(hints)) if hints else ""
