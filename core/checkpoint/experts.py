"""Experts over a checkpoint: the ExpertSource a backend's `prepare` reads from, the shared expert, and
the header-only check of every MoE tensor a layout names.

All knowledge of how a family stores its routed experts on disk lives here, driven by the layout's
`TensorNames`: per expert, fused "rows" ([E, 2I, H] gate rows then up rows, [E, H, I]; Qwen3.5) or fused
"interleaved_in_out" ([E, H, 2I] with gate/up in even/odd columns, [E, I, H]; gpt-oss; or as gpt-oss ships
it, MXFP4 `_blocks`/`_scales` rows of [E, 2I, H] and [E, H, I], see matrices.py), with optional fused
biases. Each read touches one expert's bytes only.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from ..errors import CheckpointError, ExpertIdError
from ..experts import ExpertTensors
from ..formats import QuantizedTensor, WeightFormat, get_format
from ..layout import MoELayerLayout, MoELayout
from .matrices import check_fused_mxfp4, convert_to, fused_is_mxfp4, read_fused_mxfp4
from .progress import track
from .reader import Checkpoint

FLOAT_FORMATS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
FLOAT_DTYPES = tuple(FLOAT_FORMATS)
FLOAT_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}  # config/torch dtype names -> formats


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


def read_fused_expert(ckpt: Checkpoint, layer: MoELayerLayout, expert_id: int,
                      to: torch.dtype | str | WeightFormat | None = None) -> ExpertTensors:
    """Expert `expert_id` of a fused layer, in either fused style, with its biases where the layer has them."""
    names, i, I = layer.names, layer.index, layer.experts.intermediate_size
    gu, dn = names.fused_names(i)
    if names.fused_style == "interleaved_in_out" and fused_is_mxfp4(ckpt, gu):  # gate/up: even/odd rows
        gate, up = (read_fused_mxfp4(ckpt, gu, expert_id, slice(k, None, 2), to=to) for k in (0, 1))
        down = read_fused_mxfp4(ckpt, dn, expert_id, to=to)
    elif names.fused_style == "interleaved_in_out":
        t = ckpt.read_slice(gu, (expert_id,))  # [H, 2I], x @ W: gate/up in even/odd columns
        d = ckpt.read_slice(dn, (expert_id,))  # [I, H]
        gate, up, down = (_float_matrix(gu, t[:, 0::2].T, to), _float_matrix(gu, t[:, 1::2].T, to),
                          _float_matrix(dn, d.T, to))
    else:
        gate, up = ckpt.read_fused_gate_up(gu, expert_id, to=to)
        down = ckpt.read_fused_matrix(dn, expert_id, to=to)
    if not layer.experts.has_bias:
        return ExpertTensors(gate, up, down)
    gub, dnb = names.fused_bias_names(i)
    b = ckpt.read_slice(gub, (expert_id,)).to(torch.float32)
    gate_b, up_b = (b[0::2], b[1::2]) if names.fused_style == "interleaved_in_out" else (b[:I], b[I:])
    down_b = ckpt.read_slice(dnb, (expert_id,)).to(torch.float32)
    return ExpertTensors(gate, up, down, gate_b.contiguous(), up_b.contiguous(), down_b.contiguous())


def _float_matrix(name: str, w: torch.Tensor, to) -> QuantizedTensor:
    """A float slice of a fused tensor as a QuantizedTensor in its own dtype, converted as asked."""
    fmt = FLOAT_FORMATS.get(w.dtype)
    if fmt is None:
        raise CheckpointError(f"tensor {name!r} has dtype {w.dtype}; fused experts are read as bf16/fp16/fp32 only")
    return convert_to(QuantizedTensor(get_format(fmt), tuple(w.shape), w.contiguous()), to)


class CheckpointExperts:
    """ExpertSource over a checkpoint for one MoE layer. `to`: None keeps each matrix's native format;
    a float dtype dequantizes; a format name converts with the core's reference quantizer."""

    def __init__(self, ckpt: Checkpoint, layout: MoELayout, layer: MoELayerLayout,
                 to: torch.dtype | str | WeightFormat | None = None, *, progress: bool | None = False):
        self.ckpt, self.layer, self.to = ckpt, layer, to
        # One tick per expert read (a transient bar on a terminal; see moetier.checkpoint.track).
        self._ticks = track(range(layer.experts.num_experts), description=f"layer {layer.index} experts",
                            enabled=progress)
        self._tick_lock = threading.Lock()  # backends may read experts from several threads
        fmt = get_format(layout.quantization.fmt)
        self.group_size = fmt.group_size if fmt.kind == "int4" else None
        self.fused = stored_fused(ckpt, layer)
        if self.fused:
            check_fused(ckpt, layer)

    def expert(self, expert_id: int) -> ExpertTensors:
        spec, names, i = self.layer.experts, self.layer.names, self.layer.index
        if not 0 <= expert_id < spec.num_experts:
            raise ExpertIdError(f"layer {i}: expert id {expert_id} out of range [0, {spec.num_experts})")
        with self._tick_lock:
            next(self._ticks, None)
        if self.fused:
            return read_fused_expert(self.ckpt, self.layer, expert_id, self.to)
        H, I, gs = spec.hidden_size, spec.intermediate_size, self.group_size
        read = self.ckpt.read_matrix
        return ExpertTensors(
            read(names.expert_module(i, expert_id, "gate"), shape=(I, H), to=self.to, group_size=gs),
            read(names.expert_module(i, expert_id, "up"), shape=(I, H), to=self.to, group_size=gs),
            read(names.expert_module(i, expert_id, "down"), shape=(H, I), to=self.to, group_size=gs))

    def done(self) -> None:
        """Finish the progress bar."""
        for _ in self._ticks:
            pass


@dataclass(frozen=True)
class RouterTensors:
    """A layer's router in fp32: weight [E, H], the selection bias [E] and the logit bias [E] where used."""

    weight: torch.Tensor
    selection_bias: torch.Tensor | None = None
    logit_bias: torch.Tensor | None = None


def read_router(ckpt: Checkpoint, layer: MoELayerLayout) -> RouterTensors:
    E, H = layer.experts.num_experts, layer.experts.hidden_size
    names, i = layer.names, layer.index

    def read(name, shape):
        return ckpt.read(name, shape=shape, dtype=FLOAT_DTYPES).to(torch.float32)

    return RouterTensors(read(names.router_module(i) + ".weight", (E, H)),
                         read(names.selection_bias_name(i), (E,)) if layer.router.selection_bias else None,
                         read(names.router_bias_name(i), (E,)) if layer.router.logit_bias else None)


@dataclass(frozen=True)
class SharedTensors:
    """The always-on SwiGLU expert in fp32: gate/up [S, H], down [H, S]; gate_weight [1, H] when gated."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    gate_weight: torch.Tensor | None = None


def read_shared(ckpt: Checkpoint, layer: MoELayerLayout) -> SharedTensors | None:
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
                           dtype=FLOAT_DTYPES).to(torch.float32)
    return SharedTensors(read(m(i, "gate"), (S, H)), read(m(i, "up"), (S, H)), read(m(i, "down"), (H, S)), gate_w)


@dataclass(frozen=True)
class DtypeDiffers:
    """A MoE matrix stored in another format than the checkpoint declares (it is converted on load)."""

    name: str
    stored: str
    declared: str


@dataclass(frozen=True)
class VerifyReport:
    matrices: int
    differs: tuple[DtypeDiffers, ...]


def verify_checkpoint(ckpt: Checkpoint, layout: MoELayout) -> VerifyReport:
    """Check, from the headers only, that every MoE tensor the layout names exists with its shape, and
    list the matrices stored in another format than declared. A missing tensor or a wrong shape raises
    the checkpoint's typed error naming the file and tensor."""
    q = layout.quantization
    routed_fmt = q.fmt
    shared_fmt = q.fmt if q.applies_to_shared() else FLOAT_NAMES.get(layout.dtype, "bf16")
    n, differs = 0, []

    def matrix(base, want, what, declared):
        nonlocal n
        got = ckpt.matrix_shape(base)
        if tuple(got) != want:
            raise CheckpointError(f"tensor {base!r} ({what}) has shape {list(got)}; the config says {list(want)}")
        stored = ckpt.matrix_format(base).name
        if stored != declared:
            differs.append(DtypeDiffers(base, stored, declared))
        n += 1

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
            for name in names.fused_names(i):
                if fused_is_mxfp4(ckpt, name):
                    stored = "mxfp4"
                else:
                    dtype = ckpt.info(name).dtype
                    stored = FLOAT_FORMATS.get(dtype, str(dtype).removeprefix("torch."))
                if stored != routed_fmt:
                    differs.append(DtypeDiffers(name, stored, routed_fmt))
        else:
            for e in range(E):
                for which, want in (("gate", (I, H)), ("up", (I, H)), ("down", (H, I))):
                    matrix(names.expert_module(i, e, which), want, f"layer {i}, expert {e} {which}", routed_fmt)
        if layer.shared is not None:
            S = layer.shared.intermediate_size
            for which, want in (("gate", (S, H)), ("up", (S, H)), ("down", (H, S))):
                matrix(names.shared_module(i, which), want, f"layer {i} shared expert {which}", shared_fmt)
            if layer.shared.gated:
                ckpt.check(names.shared_gate_module(i) + ".weight", shape=(1, H))
    return VerifyReport(n, tuple(differs))
