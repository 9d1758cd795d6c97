"""MoELayout: what a model family declares about a checkpoint, as plain data.

A family plugin turns an HF `config.json` into an `MoELayout`: the ordered MoE layers (each with its
`ExpertLayerSpec`, `RouterSpec`, optional `SharedExpertSpec` and `TensorNames`), the dense layers, the
shipped quantization and the layers to skip (MTP). The runtime reads only this data; it never asks which
family a model belongs to.

Tensor names are templates over `{layer}`, `{expert}` and `{proj}`. Linear weights are named by their
module ("model.layers.3.mlp.experts.7.gate_proj"), so the checkpoint reader can append ".weight",
".weight_scale_inv" (FP8 blocks) or ".weight_packed"/".weight_scale"/".weight_shape" (compressed-tensors
INT4) as the quantization says.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import FormatError, LayoutError
from .experts import ExpertLayerSpec
from .formats import get_format

SCORINGS = ("softmax", "sigmoid", "softmax_topk")
GROUP_SCORES = ("max", "top2_sum")
QUANT_SCHEMES = ("none", "fp8_block", "int4_pack", "mxfp4", "gguf")
FUSED_STYLES = ("rows", "interleaved_in_out")


@dataclass(frozen=True)
class RouterSpec:
    """How one MoE layer picks its experts; computed in fp32 by `moetier.runtime.routing.route`.

    scoring: "softmax" over all experts, "sigmoid" per expert, or "softmax_topk" (softmax over the k
    selected logits only, gpt-oss). selection_bias: a per-expert bias added to the scores for choosing
    only; the weights use the unbiased scores (DeepSeek-V3 `e_score_correction_bias`). logit_bias: a
    linear bias on the logits (gpt-oss `router.bias`). Groups: the experts split into n_group equal groups,
    each scored by its max ("max", DeepSeek-V2) or the sum of its two best ("top2_sum", DeepSeek-V3); only
    the topk_group best groups stay eligible. renormalize: weights /= (sum + renorm_eps). scaling: the
    weights are multiplied by it last.
    """

    num_experts: int
    top_k: int
    scoring: str = "softmax"
    selection_bias: bool = False
    logit_bias: bool = False
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "max"
    renormalize: bool = False
    renorm_eps: float = 0.0
    scaling: float = 1.0

    def __post_init__(self):
        if self.scoring not in SCORINGS:
            raise LayoutError(f"router scoring {self.scoring!r} is not implemented; known: {', '.join(SCORINGS)}")
        if self.group_score not in GROUP_SCORES:
            raise LayoutError(f"router group score {self.group_score!r} is not implemented; known: {', '.join(GROUP_SCORES)}")
        if not (isinstance(self.top_k, int) and 1 <= self.top_k <= self.num_experts):
            raise LayoutError(f"router top_k must be in [1, num_experts={self.num_experts}], got {self.top_k!r}")
        if self.n_group < 1 or self.num_experts % self.n_group:
            raise LayoutError(f"router n_group {self.n_group} must divide num_experts {self.num_experts}")
        if not 1 <= self.topk_group <= self.n_group:
            raise LayoutError(f"router topk_group {self.topk_group} must be in [1, n_group={self.n_group}]")
        if self.n_group > 1:
            per_group = self.num_experts // self.n_group
            if self.topk_group * per_group < self.top_k:
                raise LayoutError(f"router keeps {self.topk_group} groups of {per_group} experts, fewer than top_k {self.top_k}")
            if self.group_score == "top2_sum" and per_group < 2:
                raise LayoutError("router group score top2_sum needs at least 2 experts per group")
        if self.scoring == "softmax_topk" and (self.n_group > 1 or self.selection_bias):
            raise LayoutError("router scoring softmax_topk takes no groups and no selection bias")


@dataclass(frozen=True)
class SharedExpertSpec:
    """The always-on expert of a layer: one SwiGLU MLP of `intermediate_size`; `gated`: its output is
    multiplied by sigmoid(x . shared_gate) (Qwen), otherwise added as is (DeepSeek)."""

    intermediate_size: int
    gated: bool = False

    def __post_init__(self):
        if not isinstance(self.intermediate_size, int) or self.intermediate_size < 1:
            raise LayoutError(f"shared expert intermediate_size must be a positive int, got {self.intermediate_size!r}")


@dataclass(frozen=True)
class TensorNames:
    """Where one MoE layer's tensors sit in the checkpoint (templates over {layer}, {expert}, {proj}).

    block: the MoE block's module ("model.layers.{layer}.mlp"); the others are relative to it. router:
    the gate's linear module. selection_bias / router_bias: full tensor names. Routed experts are either
    per expert (`expert` with `projections` = the gate, up and down module names) or fused, in one of
    two styles: "rows" (`fused_gate_up` [E, 2I, H] with gate rows first, `fused_down` [E, H, I]; Qwen3.5)
    or "interleaved_in_out" (`fused_gate_up` [E, H, 2I] with gate/up in even/odd columns, `fused_down`
    [E, I, H]; gpt-oss). Fused expert biases (gpt-oss): `fused_gate_up_bias` [E, 2I] (same order as the
    weight's gate/up), `fused_down_bias` [E, H]. shared: the shared expert's modules (`{proj}` from
    `projections`), shared_gate its sigmoid gate (a linear H -> 1).
    """

    block: str
    router: str = "gate"
    selection_bias: str | None = None
    router_bias: str | None = None
    expert: str = "experts.{expert}.{proj}"
    projections: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    fused_gate_up: str | None = None
    fused_down: str | None = None
    shared: str | None = None
    shared_projections: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    shared_gate: str | None = None
    fused_style: str = "rows"
    fused_gate_up_bias: str | None = None
    fused_down_bias: str | None = None

    def __post_init__(self):
        if (self.fused_gate_up is None) != (self.fused_down is None):
            raise LayoutError("fused experts need both fused_gate_up and fused_down names")
        if self.fused_style not in FUSED_STYLES:
            raise LayoutError(f"fused style {self.fused_style!r} unknown; known: {', '.join(FUSED_STYLES)}")
        if (self.fused_gate_up_bias is None) != (self.fused_down_bias is None):
            raise LayoutError("fused expert biases need both fused_gate_up_bias and fused_down_bias names")
        if self.fused_gate_up_bias is not None and not self.fused:
            raise LayoutError("expert biases are only supported with fused experts")

    @property
    def fused(self) -> bool:
        return self.fused_gate_up is not None

    def _full(self, layer: int, rel: str, **kw) -> str:
        return (self.block + "." + rel).format(layer=layer, **kw)

    def block_prefix(self, layer: int) -> str:
        return self.block.format(layer=layer) + "."

    def router_module(self, layer: int) -> str:
        return self._full(layer, self.router)

    def selection_bias_name(self, layer: int) -> str | None:
        return None if self.selection_bias is None else self._full(layer, self.selection_bias)

    def router_bias_name(self, layer: int) -> str | None:
        return None if self.router_bias is None else self._full(layer, self.router_bias)

    def expert_module(self, layer: int, expert: int, which: str) -> str:
        """which: "gate", "up" or "down"; the per-expert linear module name."""
        return self._full(layer, self.expert, expert=expert, proj=self.projections[_WHICH[which]])

    def fused_names(self, layer: int) -> tuple[str, str]:
        if not self.fused:
            raise LayoutError(f"layer {layer} stores its experts per expert, not fused")
        return self._full(layer, self.fused_gate_up), self._full(layer, self.fused_down)

    def fused_bias_names(self, layer: int) -> tuple[str, str]:
        if self.fused_gate_up_bias is None:
            raise LayoutError(f"layer {layer} has no expert biases")
        return self._full(layer, self.fused_gate_up_bias), self._full(layer, self.fused_down_bias)

    def shared_module(self, layer: int, which: str) -> str:
        if self.shared is None:
            raise LayoutError(f"layer {layer} has no shared expert")
        return self._full(layer, self.shared, proj=self.shared_projections[_WHICH[which]])

    def shared_gate_module(self, layer: int) -> str | None:
        return None if self.shared_gate is None else self._full(layer, self.shared_gate)


_WHICH = {"gate": 0, "up": 1, "down": 2}


@dataclass(frozen=True)
class Quantization:
    """How the checkpoint stores its linear weights.

    scheme "none": plain `<module>.weight` in `fmt` (bf16/fp16/fp32). "fp8_block": float8_e4m3fn
    `<module>.weight` plus fp32 `<module>.weight_scale_inv` in 128x128 blocks. "int4_pack":
    compressed-tensors pack-quantized `<module>.weight_packed`/`weight_scale`/`weight_shape`. "mxfp4":
    gpt-oss's fused experts as `<name>_blocks`/`<name>_scales` (see moetier.checkpoint.matrices). "gguf": a
    GGUF file, each tensor in its own GGML type (moetier.checkpoint.gguf).
    scope: "all" linear weights but the router, or only the "experts" (routed experts; Kimi INT4).
    fmt: the moetier WeightFormat the routed experts are read as (for a file whose MoE layers differ, the
    one most of them store). layers: (MoE layer index, its format) where a file's layers differ (a GGUF
    Q4_K_M keeps some layers' down in Q6_K: "q4_k+q6_k"); None for a layer stored in types moetier has no
    format for. Read a layer's format with `fmt_of`.
    """

    scheme: str = "none"
    fmt: str = "bf16"
    scope: str = "all"
    layers: tuple[tuple[int, str | None], ...] = ()

    def __post_init__(self):
        if self.scheme not in QUANT_SCHEMES:
            raise LayoutError(f"quantization scheme {self.scheme!r} unknown; known: {', '.join(QUANT_SCHEMES)}")
        get_format(self.fmt)
        if self.scope not in ("all", "experts"):
            raise LayoutError(f"quantization scope must be 'all' or 'experts', got {self.scope!r}")
        layers = tuple((int(i), None if f is None else get_format(f).name) for i, f in self.layers)
        object.__setattr__(self, "layers", layers)

    def fmt_of(self, layer: int) -> str:
        """The format MoE layer `layer` stores its routed experts in (see `stored_format`)."""
        return stored_format(self.fmt, self.layers, layer)

    def applies_to_shared(self) -> bool:
        return self.scheme != "none" and self.scope == "all"


def stored_format(fmt: str, layers: tuple[tuple[int, str | None], ...], layer: int) -> str:
    """MoE layer `layer`'s format: its entry in `layers`, else `fmt`; FormatError for a layer stored in types
    moetier has no format for (they can only be converted on load)."""
    for i, f in layers:
        if i == layer:
            if f is None:
                raise FormatError(f"MoE layer {layer} stores its routed experts in no format moetier computes as "
                                  "stored (a GGML type it does not read, or gate and up in different types; `moetier "
                                  "zoo show FILE` lists them): they can only be converted on load; give a format to "
                                  "convert them to (--cpu-format / --format)")
            return f
    return fmt


@dataclass(frozen=True)
class SkippedLayer:
    """Tensors under `prefix` belong to a layer moetier does not run (`reason`, e.g. "MTP")."""

    prefix: str
    reason: str


@dataclass(frozen=True)
class MoELayerLayout:
    index: int
    experts: ExpertLayerSpec
    router: RouterSpec
    names: TensorNames
    shared: SharedExpertSpec | None = None

    def __post_init__(self):
        if self.router.num_experts != self.experts.num_experts or self.router.top_k != self.experts.top_k:
            raise LayoutError(f"layer {self.index}: router ({self.router.num_experts} experts, top {self.router.top_k}) "
                              f"disagrees with experts ({self.experts.num_experts}, top {self.experts.top_k})")
        if self.shared is not None and self.names.shared is None:
            raise LayoutError(f"layer {self.index} has a shared expert but no tensor names for it")
        if self.shared is not None and self.shared.gated and self.names.shared_gate is None:
            raise LayoutError(f"layer {self.index} has a gated shared expert but no name for its gate")
        if self.router.selection_bias and self.names.selection_bias is None:
            raise LayoutError(f"layer {self.index} uses a selection bias but names no tensor for it")
        if self.router.logit_bias and self.names.router_bias is None:
            raise LayoutError(f"layer {self.index} uses a router bias but names no tensor for it")
        if self.experts.has_bias != (self.names.fused_gate_up_bias is not None):
            raise LayoutError(f"layer {self.index}: experts {'have' if self.experts.has_bias else 'have no'} biases "
                              f"but the tensor names {'lack' if self.experts.has_bias else 'name'} them")


@dataclass(frozen=True)
class MoELayout:
    """A whole checkpoint as moetier sees it. `moe_layers` are in layer order; `dense_layers` run a plain
    MLP of `dense_intermediate_size`; `skipped` lists tensor prefixes of layers not run (MTP)."""

    family: str
    version: str
    num_hidden_layers: int
    hidden_size: int
    moe_layers: tuple[MoELayerLayout, ...]
    dense_layers: tuple[int, ...] = ()
    dense_intermediate_size: int | None = None
    skipped: tuple[SkippedLayer, ...] = ()
    quantization: Quantization = Quantization()
    dtype: str = "bfloat16"

    def __post_init__(self):
        seen = [m.index for m in self.moe_layers] + list(self.dense_layers)
        if sorted(seen) != list(range(self.num_hidden_layers)):
            raise LayoutError(f"MoE layers {[m.index for m in self.moe_layers]} and dense layers "
                              f"{list(self.dense_layers)} must cover layers 0..{self.num_hidden_layers - 1} once each")
        for m in self.moe_layers:
            if m.experts.hidden_size != self.hidden_size:
                raise LayoutError(f"layer {m.index}: expert hidden size {m.experts.hidden_size} != model {self.hidden_size}")

    @property
    def moe_layer_indices(self) -> tuple[int, ...]:
        return tuple(m.index for m in self.moe_layers)

    def layer(self, index: int) -> MoELayerLayout:
        for m in self.moe_layers:
            if m.index == index:
                return m
        kind = "dense" if index in self.dense_layers else "not a decoder layer"
        raise LayoutError(f"layer {index} is not an MoE layer ({kind}); MoE layers: {list(self.moe_layer_indices)}")

    def is_skipped(self, tensor_name: str) -> bool:
        return any(tensor_name.startswith(s.prefix) for s in self.skipped)

    def to_dict(self) -> dict:
        """Plain JSON-able data; `MoELayout.from_dict` rebuilds an equal layout."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> MoELayout:
        def layer(m):
            names = dict(m["names"])
            for key in ("projections", "shared_projections"):
                names[key] = tuple(names[key])
            return MoELayerLayout(m["index"], ExpertLayerSpec(**m["experts"]), RouterSpec(**m["router"]),
                                  TensorNames(**names), None if m["shared"] is None else SharedExpertSpec(**m["shared"]))

        try:
            return cls(family=d["family"], version=d["version"], num_hidden_layers=d["num_hidden_layers"],
                       hidden_size=d["hidden_size"], moe_layers=tuple(layer(m) for m in d["moe_layers"]),
                       dense_layers=tuple(d["dense_layers"]), dense_intermediate_size=d["dense_intermediate_size"],
                       skipped=tuple(SkippedLayer(**s) for s in d["skipped"]),
                       quantization=Quantization(**d["quantization"]), dtype=d["dtype"])
        except (KeyError, TypeError) as exc:
            raise LayoutError(f"not a serialized MoELayout: {type(exc).__name__}: {exc}") from None

    def summary(self) -> dict:
        """A short JSON-able description (CLI and docs)."""
        first = self.moe_layers[0] if self.moe_layers else None
        out = {"family": self.family, "version": self.version, "layers": self.num_hidden_layers,
               "hidden": self.hidden_size, "moe_layers": len(self.moe_layers), "dense_layers": list(self.dense_layers),
               "quantization": f"{self.quantization.scheme}:{self.quantization.fmt}",
               "skipped": [f"{s.prefix}* ({s.reason})" for s in self.skipped]}
        if first is not None:
            r = first.router
            out.update(experts=r.num_experts, top_k=r.top_k, expert_intermediate=first.experts.intermediate_size,
                       router=f"{r.scoring}{'+bias' if r.selection_bias else ''}, groups {r.n_group}/{r.topk_group} "
                              f"({r.group_score}), renorm={r.renormalize}, x{r.scaling:g}",
                       shared=None if first.shared is None else
                       f"{first.shared.intermediate_size}{' gated' if first.shared.gated else ''}",
                       fused=first.names.fused)
        return out
