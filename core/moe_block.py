"""One MoE layer end to end: moe_block(hidden) = routed(hidden) + shared(hidden), on any backend.

`CheckpointExperts` is the ExpertSource a backend's `prepare` reads from: it finds each expert's
tensors through the layout's `TensorNames` (per expert or fused, any prefix) and reads them one at a
time through `moetier.checkpoint`, in their native format (bf16, fp8 blocks, int4) or converted on
request. `MoEBlock` holds the router tensors (fp32), the shared expert and the prepared experts.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .checkpoint import Checkpoint, convert_to, track
from .checkpoint.matrices import check_fused_mxfp4, fused_is_mxfp4, read_fused_mxfp4
from .errors import CheckpointError, ExpertIdError
from .experts import ExpertBackend, ExpertTensors, PreparedExperts
from .formats import QuantizedTensor, WeightFormat, get_format
from .layout import MoELayerLayout, MoELayout
from .routing import route


_FLOAT_FORMATS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_FLOAT_DTYPES = tuple(_FLOAT_FORMATS)


def check_fused(ckpt: Checkpoint, layer: MoELayerLayout) -> int:
    """Shapes of a layer's fused expert tensors (and biases) against the layout, from the headers."""
    E, H, I = layer.experts.num_experts, layer.experts.hidden_size, layer.experts.intermediate_size
    names, i = layer.names, layer.index
    gu, dn = names.fused_names(i)
    if names.fused_style == "interleaved_in_out" and fused_is_mxfp4(ckpt, gu):  # [out, in] rows, as shipped
        check_fused_mxfp4(ckpt, gu, (E, 2 * I, H))
        check_fused_mxfp4(ckpt, dn, (E, H, I))
    elif names.fused_style == "interleaved_in_out":
        ckpt.check(gu, shape=(E, H, 2 * I))
        ckpt.check(dn, shape=(E, I, H))
    else:
        ckpt.check(gu, shape=(E, 2 * I, H))
        ckpt.check(dn, shape=(E, H, I))
    if layer.experts.has_bias:
        gub, dnb = names.fused_bias_names(i)
        ckpt.check(gub, shape=(E, 2 * I))
        ckpt.check(dnb, shape=(E, H))
    return 2


def stored_fused(ckpt: Checkpoint, layer: MoELayerLayout) -> bool:
    """Whether this checkpoint stores the layer's routed experts fused. A layout that says fused (Qwen3.5)
    still reads a checkpoint written per expert under the same block, as transformers' save_pretrained
    writes it by default; rows-style fused layouts only, and only when the fused tensor is absent."""
    names, i = layer.names, layer.index
    if not names.fused:
        return False
    if names.fused_style != "rows" or names.fused_names(i)[0] in ckpt:
        return True
    return names.expert_module(i, 0, "gate") + ".weight" not in ckpt


class CheckpointExperts:
    """ExpertSource over a checkpoint for one MoE layer. `to`: None keeps each matrix's native format;
    a float dtype dequantizes; a format name converts with the core's reference quantizer."""

    def __init__(self, ckpt: Checkpoint, layout: MoELayout, layer: MoELayerLayout,
                 to: torch.dtype | str | WeightFormat | None = None, *, progress: bool | None = False):
        self.ckpt, self.layer, self.to = ckpt, layer, to
        # One tick per expert read (a transient bar on a terminal; see moetier.checkpoint.track).
        self._ticks = track(range(layer.experts.num_experts), description=f"layer {layer.index} experts",
                            enabled=progress)
        fmt = get_format(layout.quantization.fmt)
        self.group_size = fmt.group_size if fmt.kind == "int4" else None
        self.fused = stored_fused(ckpt, layer)
        if self.fused:
            check_fused(ckpt, layer)

    def expert(self, expert_id: int) -> ExpertTensors:
        spec, names, i = self.layer.experts, self.layer.names, self.layer.index
        if not 0 <= expert_id < spec.num_experts:
            raise ExpertIdError(f"layer {i}: expert id {expert_id} out of range [0, {spec.num_experts})")
        H, I = spec.hidden_size, spec.intermediate_size
        next(self._ticks, None)
        if self.fused and names.fused_style == "interleaved_in_out" and fused_is_mxfp4(self.ckpt, names.fused_names(i)[0]):
            gu, dn = names.fused_names(i)  # gpt-oss MXFP4: gate/up are the even/odd rows of gate_up
            gate, up = (read_fused_mxfp4(self.ckpt, gu, expert_id, slice(k, None, 2), to=self.to) for k in (0, 1))
            down = read_fused_mxfp4(self.ckpt, dn, expert_id, to=self.to)
        elif self.fused and names.fused_style == "interleaved_in_out":
            gu, dn = names.fused_names(i)
            t = self.ckpt.read_slice(gu, (expert_id,))  # [H, 2I], x @ W: gate/up in even/odd columns
            d = self.ckpt.read_slice(dn, (expert_id,))  # [I, H]
            gate, up, down = (self._matrix(gu, t[:, 0::2].T), self._matrix(gu, t[:, 1::2].T), self._matrix(dn, d.T))
        elif self.fused:
            gu, dn = names.fused_names(i)
            gate, up = self.ckpt.read_fused_gate_up(gu, expert_id, to=self.to)
            down = self.ckpt.read_fused_matrix(dn, expert_id, to=self.to)
        else:
            read = self.ckpt.read_matrix
            gs = self.group_size
            gate = read(names.expert_module(i, expert_id, "gate"), shape=(I, H), to=self.to, group_size=gs)
            up = read(names.expert_module(i, expert_id, "up"), shape=(I, H), to=self.to, group_size=gs)
            down = read(names.expert_module(i, expert_id, "down"), shape=(H, I), to=self.to, group_size=gs)
        if not spec.has_bias:
            return ExpertTensors(gate, up, down)
        gub, dnb = names.fused_bias_names(i)
        b = self.ckpt.read_slice(gub, (expert_id,)).to(torch.float32)
        gate_b, up_b = (b[0::2], b[1::2]) if names.fused_style == "interleaved_in_out" else (b[:I], b[I:])
        down_b = self.ckpt.read_slice(dnb, (expert_id,)).to(torch.float32)
        return ExpertTensors(gate, up, down, gate_b.contiguous(), up_b.contiguous(), down_b.contiguous())

    def _matrix(self, name: str, w: torch.Tensor) -> QuantizedTensor:
        """A float slice of a fused tensor as a QuantizedTensor in its own dtype, converted as asked."""
        fmt = _FLOAT_FORMATS.get(w.dtype)
        if fmt is None:
            raise CheckpointError(f"tensor {name!r} has dtype {w.dtype}; fused experts are read as bf16/fp16/fp32 only")
        return convert_to(QuantizedTensor(get_format(fmt), tuple(w.shape), w.contiguous()), self.to)

    def done(self) -> None:
        """Finish the progress bar."""
        for _ in self._ticks:
            pass


@dataclass(frozen=True, eq=False)
class SharedExpert:
    """The always-on SwiGLU expert (fp32): gate/up [S, H], down [H, S]; gate_weight [1, H] when gated."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    gate_weight: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32)
        y = F.linear(F.silu(F.linear(x, self.gate)) * F.linear(x, self.up), self.down)
        if self.gate_weight is not None:
            y = torch.sigmoid(F.linear(x, self.gate_weight)) * y
        return y


class MoEBlock:
    """One MoE layer: router (fp32) + routed experts on a backend + shared expert. Call it on hidden
    [T, H] (fp32 or bf16); it returns fp32 [T, H]."""

    def __init__(self, layer: MoELayerLayout, router_weight: torch.Tensor, backend: ExpertBackend,
                 prepared: PreparedExperts, *, selection_bias: torch.Tensor | None = None,
                 logit_bias: torch.Tensor | None = None, shared: SharedExpert | None = None):
        if (shared is None) != (layer.shared is None):
            raise CheckpointError(f"layer {layer.index}: the layout {'has' if layer.shared else 'has no'} shared expert "
                                  f"but one was {'not ' if shared is None else ''}given")
        self.layer = layer
        self.router_weight = router_weight.to(torch.float32)
        self.selection_bias = None if selection_bias is None else selection_bias.to(torch.float32)
        self.logit_bias = None if logit_bias is None else logit_bias.to(torch.float32)
        self.backend, self.prepared, self.shared_expert = backend, prepared, shared

    def route(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return route(self.layer.router, hidden, self.router_weight, self.selection_bias, self.logit_bias)

    def routed(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        return self.backend.forward(self.prepared, hidden.contiguous(), topk_ids.contiguous(),
                                    topk_weights.contiguous(), out_dtype=torch.float32)

    def shared(self, hidden: torch.Tensor) -> torch.Tensor | None:
        return None if self.shared_expert is None else self.shared_expert(hidden)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        ids, weights = self.route(hidden)
        out = self.routed(hidden, ids, weights)
        s = self.shared(hidden)
        return out if s is None else out + s

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, layout: MoELayout, layer_index: int, backend: ExpertBackend, *,
                        fmt: str | WeightFormat | None = None, experts: Iterable[int] | None = None,
                        read_as: torch.dtype | str | WeightFormat | None = None,
                        progress: bool | None = None) -> MoEBlock:
        """Read layer `layer_index` of `ckpt` (router, shared expert, routed experts one at a time) and
        prepare its experts on `backend` in `fmt` (default: the checkpoint's own format when the backend
        computes it, else bf16). `experts`: the ids this backend holds (default all). `progress`: a bar
        per layer (default: on a terminal, unless MOETIER_PROGRESS=0)."""
        layer = layout.layer(layer_index)
        E, H = layer.experts.num_experts, layer.experts.hidden_size
        names, i = layer.names, layer.index
        w = ckpt.read(names.router_module(i) + ".weight", shape=(E, H), dtype=_FLOAT_DTYPES)
        sel = ckpt.read(names.selection_bias_name(i), shape=(E,), dtype=_FLOAT_DTYPES) \
            if layer.router.selection_bias else None
        lb = ckpt.read(names.router_bias_name(i), shape=(E,), dtype=_FLOAT_DTYPES) if layer.router.logit_bias else None
        shared = read_shared(ckpt, layer)
        if fmt is None:
            native = layout.quantization.fmt
            fmt = native if native in backend.formats else "bf16"
        source = CheckpointExperts(ckpt, layout, layer, to=read_as, progress=progress)
        ids = range(E) if experts is None else experts
        try:
            prepared = backend.prepare(layer.experts, source, ids, fmt)
        finally:
            source.done()
        return cls(layer, w, backend, prepared, selection_bias=sel, logit_bias=lb, shared=shared)


def read_shared(ckpt: Checkpoint, layer: MoELayerLayout) -> SharedExpert | None:
    """The layer's shared expert dequantized to fp32, or None."""
    if layer.shared is None:
        return None
    H, S, i = layer.experts.hidden_size, layer.shared.intermediate_size, layer.index
    m = layer.names.shared_module

    def read(base, shape):
        return ckpt.read_matrix(base, shape=shape, to=torch.float32).data

    gate_w = None
    if layer.shared.gated:
        gate_w = ckpt.read(layer.names.shared_gate_module(i) + ".weight", shape=(1, H),
                           dtype=_FLOAT_DTYPES).to(torch.float32)
    return SharedExpert(read(m(i, "gate"), (S, H)), read(m(i, "up"), (S, H)), read(m(i, "down"), (H, S)), gate_w)


def verify_checkpoint(ckpt: Checkpoint, layout: MoELayout) -> int:
    """Check, from the headers only, that every MoE tensor the layout names exists with its shape.
    Raises the checkpoint's typed error naming the file and tensor; returns the number of matrices checked."""
    n = 0
    for layer in layout.moe_layers:
        E, H, I, i = layer.experts.num_experts, layer.experts.hidden_size, layer.experts.intermediate_size, layer.index
        names = layer.names
        ckpt.check(names.router_module(i) + ".weight", shape=(E, H))
        if layer.router.selection_bias:
            ckpt.check(names.selection_bias_name(i), shape=(E,))
        if layer.router.logit_bias:
            ckpt.check(names.router_bias_name(i), shape=(E,))
        if stored_fused(ckpt, layer):
            n += check_fused(ckpt, layer)
        else:
            for e in range(E):
                for which, want in (("gate", (I, H)), ("up", (I, H)), ("down", (H, I))):
                    base = names.expert_module(i, e, which)
                    got = ckpt.matrix_shape(base)
                    if tuple(got) != want:
                        raise CheckpointError(f"tensor {base!r} (layer {i}, expert {e} {which}) has shape {list(got)}; "
                                              f"the config says {list(want)}")
                    n += 1
        if layer.shared is not None:
            S = layer.shared.intermediate_size
            for which, want in (("gate", (S, H)), ("up", (S, H)), ("down", (H, S))):
                base = names.shared_module(i, which)
                got = ckpt.matrix_shape(base)
                if tuple(got) != want:
                    raise CheckpointError(f"tensor {base!r} (layer {i} shared expert {which}) has shape {list(got)}; "
                                          f"the config says {list(want)}")
                n += 1
            if layer.shared.gated:
                ckpt.check(names.shared_gate_module(i) + ".weight", shape=(1, H))
    return n
