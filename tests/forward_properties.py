"""Property-based check of one backend's public forward API (prepare / forward / submit), run as a script.

    python tests/forward_properties.py --backend cpu.avx2 [--examples 300] [--seed 0] [--pinned] [--survey]
    python tests/forward_properties.py --backend cpu.avx2 --replay "Example(...)"

Every example is a random layer (odd sizes and 128-block edges, every format the backend declares, silu,
biased silu, gpt-oss swiglu), a random held subset (empty included) and a random call: 0 to 40 tokens
(now and then 1200), ids repeated within a token, negative, out of range, not held; weights NaN, Inf,
negative, 1e30, 1e-30, beyond fp32; every dtype a caller might pass (hidden fp32/bf16/fp16/fp64/int, ids
int64/int32/int16/bool/float, weights float/int/complex, out_dtype of any kind); offset, strided,
transposed, sparse, oneDNN, meta, numpy and list inputs; wrong ranks and sizes; inputs that require grad;
both nan_policy values; forward and submit; faults at prepare (repeated, out-of-range, float or missing
expert ids, unknown format, biases missing or extra, a wrong matrix shape); experts another backend
prepared. Each example must either

  * raise one of the typed errors `expected_errors` predicts for it, with a message naming the argument
    (the order in which a backend checks several faults is its own business: any predicted one will do),
  * or, when no fault is predicted, return [T, H] in out_dtype without a gradient, leave its inputs
    unchanged, and agree with the float64 reference (`moetier.reference.moe_forward`) as `check_output`
    says: non-finite rows where the reference has them, exact zeros where every contribution is zero,
    and the format's conformance bound (tolerances.py) on the rest.

The semantics this pins down, all of them what the reference does:
  * a duplicate id within one token counts once per slot (its weights add up);
  * an id that the prepared subset does not hold contributes nothing, whatever its weight (NaN included);
  * topk_weights are read as float32 (a float64 weight is rounded first, 1e300 becomes Inf), hidden as
    given (fp32 or bf16);
  * nan_policy="raise" refuses any NaN/Inf in hidden or topk_weights (T > 0), even in a row routed only
    to experts held elsewhere; nan_policy="propagate" gives a non-finite output row exactly where the
    reference has one (a NaN/Inf hidden row or weight that meets a held expert; the swiglu clamps keep a
    NaN, as torch.clamp does), and finite rows stay correct: a NaN never leaks into another token's row;
  * a row whose every contribution is exactly zero (nothing held routed, zero weights, a zero hidden row
    through a bias-free layer, an all-zero expert) is exactly zero;
  * finite inputs never give a non-finite output.
PINNED holds one hand-written example per point, which --pinned runs first.

The script prints each example before running it, so when the process dies (a segfault, an abort) the
last example printed is the one that killed it; `--replay` runs that one example again.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import math
import sys
import time
import traceback
from dataclasses import dataclass

import torch
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from moetier.conformance.tolerances import tolerance
from moetier.errors import (
    DTypeError,
    ExpertIdError,
    FormatError,
    MoetierError,
    NonFiniteError,
    PreparedExpertsError,
    ShapeError,
)
from moetier.experts import ExpertLayerSpec, ExpertTensors, ExpertWeights
from moetier.formats import FORMATS, quantize
from moetier.hardware import load_inventory
from moetier.plugins import load_registry
from moetier.reference import DenseExpert, expert_mlp, moe_forward, oracle

nan, inf = math.nan, math.inf  # for eval() of a printed Example

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64, "int64": torch.int64, "int32": torch.int32, "int16": torch.int16,
          "bool": torch.bool, "complex64": torch.complex64, "str": "float32"}
HIDDEN_DTYPES = ("float32", "bfloat16", "float16", "float64", "int32")
ID_DTYPES = ("int64", "int32", "float32", "int16", "bool")
WEIGHT_DTYPES = ("float32", "bfloat16", "float16", "float64", "int64", "complex64")
OUT_DTYPES = ("float32", "bfloat16", "float16", "float64", "int32", "str")
LAYOUTS = ("contiguous", "offset", "strided", "transposed", "numpy", "list", "sparse", "sparse_csr", "mkldnn", "meta")
VALID_HIDDEN_DTYPES = ("float32", "bfloat16")
VALID_ID_DTYPES = ("int64", "int32")
VALID_WEIGHT_DTYPES = ("float32", "float32", "bfloat16", "float16", "float64")
VALID_OUT_DTYPES = ("float32", "bfloat16")
VALID_LAYOUTS = ("contiguous", "contiguous", "offset")
ACTIVATIONS = ("silu", "silu+bias", "swiglu_oai+bias")
# Hidden magnitudes: the tolerances hold for O(1) intermediates (tolerances.py). Rounding errors are
# relative, so a smaller scale changes nothing for silu; a larger one does not hold them: swiglu_oai clamps
# gate/up at 0.75, so an O(100) pre-activation's rounding error (bf16: 100 * 2^-9) lands on an O(1) output
# (measured 1.1-4% at scale 100), and silu(g) for g < -88 needs exp(88) beyond fp32 (the true 1e-35 comes
# out as 0). Neither is a backend fault.
HIDDEN_SCALES = (1.0, 1e-2)
WEIGHT_KINDS = ("router", "signed", "mixed")
# 1e300 is finite only as float64: read as fp32 it is Inf (then the nan policy applies).
SPECIAL_WEIGHTS = (nan, inf, -inf, 0.0, -0.0, 1e30, -1e30, 1e-30, 1e300)
SPECIAL_HIDDEN = (nan, inf, -inf, 0.0)
SHAPE_FAULTS = {
    "hidden": ("0d", "1d", "3d", "wide", "narrow"),
    "topk_ids": ("0d", "1d", "3d", "rows+1", "rows-1", "k0"),
    "topk_weights": ("0d", "1d", "3d", "k+1", "k-1"),
}
# Faults of prepare (the call stops there): each with the error it calls for and a word of its message.
PREPARE_FAULTS = {
    "duplicate-id": (ExpertIdError, "repeat"),
    "id-out-of-range": (ExpertIdError, "out of range"),
    "float-id": (ExpertIdError, "expert id"),
    "missing-expert": (ExpertIdError, "not in this weight set"),
    "unknown-format": (FormatError, "int3_g7"),
    "bias-missing": (ShapeError, "bias"),
    "bias-extra": (ShapeError, "bias"),
    "gate-shape": (ShapeError, "gate"),
}
FAULT_KINDS = ("ids", "dtype", "layout", "shape", "prepare", "foreign")


@dataclass(frozen=True)
class Example:
    """One forward call, in plain data (its repr is a reproducer: see --replay)."""

    backend_fmt: str
    activation: str
    E: int
    H: int
    I: int
    held: tuple[int, ...]
    zero_expert: tuple[int, str] | None  # (held id, "gate" | "up" | "down" | "all") stored as zeros
    ids: tuple[tuple[int, ...], ...]  # [T / tile][k]
    tile: int  # the ids rows repeat this many times: T = len(ids) * tile (long prompts, few draws)
    k: int
    weight_kind: str
    weight_specials: tuple[tuple[int, int, float], ...]  # (t, j, value)
    hidden_scale: float
    hidden_specials: tuple[tuple[int, int, float], ...]  # (t, h, value)
    zero_rows: tuple[int, ...]
    hidden_dtype: str
    ids_dtype: str
    weights_dtype: str
    out_dtype: str
    layouts: tuple[str, str, str]  # hidden, topk_ids, topk_weights
    shape_fault: tuple[str, str] | None  # (argument, fault)
    prepare_fault: str | None  # a key of PREPARE_FAULTS
    foreign: bool  # pass experts another backend (the reference) prepared
    hidden_grad: str  # "no" | "requires_grad" | "parameter"
    weights_grad: bool
    nan_policy: str
    mode: str  # "forward" | "submit"
    seed: int

    @property
    def T(self) -> int:
        return len(self.ids) * self.tile


def make_example(**kw) -> Example:
    """A hand-written example: a valid fp32 call on a small layer, with `kw` changed."""
    base = {"backend_fmt": "fp32", "activation": "silu", "E": 3, "H": 16, "I": 8, "held": (0, 1, 2),
            "zero_expert": None, "ids": ((0, 1), (1, 2), (2, 0), (0, 0)), "tile": 1, "k": 2,
            "weight_kind": "router", "weight_specials": (), "hidden_scale": 1.0, "hidden_specials": (),
            "zero_rows": (), "hidden_dtype": "float32", "ids_dtype": "int64", "weights_dtype": "float32",
            "out_dtype": "float32", "layouts": ("contiguous",) * 3, "shape_fault": None, "prepare_fault": None,
            "foreign": False, "hidden_grad": "no", "weights_grad": False, "nan_policy": "raise",
            "mode": "forward", "seed": 3}
    base.update(kw)
    return Example(**base)


# Examples every run checks first, by name: the semantics above, each pinned on the paths that compute it
# (8 tokens on one expert: more than DECODE_MAX_TOKENS, the native prefill kernels), and the faults the
# property found.
PINNED = {
    # Both slots of a repeated id count: token 0 gets 0.75 y - 0.75 y (= 0), token 1 twice expert 1.
    "duplicate-id-counts-per-slot": make_example(
        ids=((1, 1), (1, 1), (2, 0)), weight_kind="signed", weight_specials=((0, 0, 0.75), (0, 1, -0.75))),
    # NaN weight on an expert held elsewhere: nothing (row 0 finite); on a held one: a NaN row (row 1).
    "nan-weight-of-an-expert-not-held": make_example(
        held=(0, 1), ids=((2, 0), (0, 1), (1, 0)), nan_policy="propagate",
        weight_specials=((0, 0, nan), (1, 1, nan))),
    # topk_weights are read as fp32: a float64 1e300 is Inf.
    "float64-weight-read-as-fp32": make_example(
        weights_dtype="float64", nan_policy="propagate", weight_specials=((0, 0, 1e300),)),
    # A NaN stays in its token's row on the int8-activation prefill path.
    "nan-stays-in-its-row": make_example(
        backend_fmt="int8", E=1, H=64, I=64, held=(0,), ids=((0,),) * 8, k=1, nan_policy="propagate",
        hidden_specials=((2, 5, nan),)),
    # Zero in, zero out, bit for bit: a zero hidden row, and an expert whose gate is all zero.
    "zero-hidden-row-int4": make_example(
        backend_fmt="int4_g32", E=1, H=64, I=64, held=(0,), ids=((0,),) * 8, k=1, zero_rows=(0, 5)),
    "zero-gate-expert-int4": make_example(
        backend_fmt="int4_g32", E=2, H=64, I=64, held=(0, 1), zero_expert=(1, "gate"), ids=((1,),) * 8, k=1),
    # swiglu_oai's clamps keep a NaN (torch.clamp does): the row is NaN under nan_policy="propagate".
    "swiglu-clamp-keeps-nan": make_example(
        activation="swiglu_oai+bias", E=1, held=(0,), ids=((0,),) * 2, k=1, nan_policy="propagate",
        hidden_specials=((0, 3, nan),)),
}


# ---- strategies ---------------------------------------------------------------------------------------

_SMALL = st.integers(1, 40)
_EDGE = st.sampled_from((64, 127, 128, 129, 255, 256, 257))  # fp8/int4 block edges, int8-decode row length


@st.composite
def examples(draw, formats: tuple[str, ...]) -> Example:
    fmt = draw(st.sampled_from(formats))
    E = draw(st.integers(1, 8))
    H = draw(st.one_of(_SMALL, _SMALL, _SMALL, _EDGE))
    I = draw(st.one_of(_SMALL, _SMALL, _SMALL, _EDGE))
    m = FORMATS[fmt].block_size or 1  # block formats (GGUF, mxfp4) store whole blocks of inputs: round up
    H, I = -(-H // m) * m, -(-I // m) * m
    held_kind = draw(st.sampled_from(("all",) * 4 + ("subset",) * 3 + ("none",)))
    if held_kind == "all":
        held = tuple(range(E))
    elif held_kind == "subset":  # the rest are held by another tier: they contribute nothing here
        held = tuple(sorted(draw(st.sets(st.integers(0, E - 1), min_size=1, max_size=E))))
    else:
        held = ()
    zero_expert = None
    if held and draw(st.integers(0, 7)) == 0:
        zero_expert = (draw(st.sampled_from(held)), draw(st.sampled_from(("gate", "up", "down", "all"))))
    # Up to 40 tokens on at most 8 experts: several experts get more than four tokens, which moves the
    # native kernels from their decode to their prefill paths.
    T = draw(st.sampled_from((0, 1, 2, 3, 4, 5, 8, 13, 21, 34, 40)))
    # Now and then a long prompt (over cpu.numba's 1024 tokens per launch) on a narrow layer.
    tile = 1
    if T == 40 and H <= 40 and I <= 40 and draw(st.integers(0, 4)) == 0:
        tile = 30
    k = draw(st.integers(1, E + 2))  # k > E forces duplicates; k need not equal the layer's top_k
    # A quarter of the examples carry faults of one or two kinds; the rest are valid calls (apart from
    # NaN/Inf under nan_policy="raise"), so that most examples compare numbers.
    faults = set()
    if draw(st.integers(0, 3)) == 0:
        faults = draw(st.sets(st.sampled_from(FAULT_KINDS), min_size=1, max_size=2))

    # A dtype or layout fault hits one argument (a few may hit several): one cause per error, mostly.
    dtype_target = draw(st.sampled_from(("hidden", "topk_ids", "topk_weights", "out", "all"))) if "dtype" in faults else None
    layout_target = draw(st.sampled_from(("hidden", "topk_ids", "topk_weights", "all"))) if "layout" in faults else None

    def pick(target, name, valid, all_values):
        return draw(st.sampled_from(all_values if target in (name, "all") else valid))

    ids_dtype = pick(dtype_target, "topk_ids", VALID_ID_DTYPES, ID_DTYPES)
    ids = []
    for _ in range(T):  # T rows drawn; repeated `tile` times below
        if k <= E and draw(st.booleans()):  # a router's answer: distinct ids
            ids.append(tuple(draw(st.permutations(range(E)))[:k]))
        else:
            ids.append(tuple(draw(st.lists(st.integers(0, E - 1), min_size=k, max_size=k))))
    n_rows = T
    T = n_rows * tile
    if n_rows and "ids" in faults:
        big = {"int64": 2 ** 40, "int32": 2 ** 31 - 1, "int16": 2 ** 15 - 1, "float32": 2 ** 20, "bool": 1}[ids_dtype]
        bad = draw(st.sampled_from((-1, E, E + 1, -big, big)))
        t, j = draw(st.integers(0, n_rows - 1)), draw(st.integers(0, k - 1))
        row = list(ids[t])
        row[j] = bad
        ids[t] = tuple(row)
    weight_specials = ()
    hidden_specials = ()
    zero_rows = ()
    if T:
        if draw(st.integers(0, 3)) == 0:
            weight_specials = tuple(draw(st.lists(
                st.tuples(st.integers(0, T - 1), st.integers(0, k - 1), st.sampled_from(SPECIAL_WEIGHTS)),
                min_size=1, max_size=3)))
        if draw(st.integers(0, 4)) == 0:
            hidden_specials = tuple(draw(st.lists(
                st.tuples(st.integers(0, T - 1), st.integers(0, H - 1), st.sampled_from(SPECIAL_HIDDEN)),
                min_size=1, max_size=3)))
        if draw(st.integers(0, 5)) == 0:
            zero_rows = tuple(sorted(draw(st.sets(st.integers(0, T - 1), min_size=1, max_size=T))))
    prepare_fault = draw(st.sampled_from(tuple(PREPARE_FAULTS))) if "prepare" in faults else None
    shape_fault = None
    if "shape" in faults:
        arg = draw(st.sampled_from(tuple(SHAPE_FAULTS)))
        shape_fault = (arg, draw(st.sampled_from(SHAPE_FAULTS[arg])))
    return Example(
        backend_fmt=fmt, activation=draw(st.sampled_from(ACTIVATIONS)), E=E, H=H, I=I, held=held,
        zero_expert=zero_expert, ids=tuple(ids), tile=tile, k=k, weight_kind=draw(st.sampled_from(WEIGHT_KINDS)),
        weight_specials=weight_specials, hidden_scale=draw(st.sampled_from(HIDDEN_SCALES)),
        hidden_specials=hidden_specials, zero_rows=zero_rows,
        hidden_dtype=pick(dtype_target, "hidden", VALID_HIDDEN_DTYPES, HIDDEN_DTYPES), ids_dtype=ids_dtype,
        weights_dtype=pick(dtype_target, "topk_weights", VALID_WEIGHT_DTYPES, WEIGHT_DTYPES),
        out_dtype=pick(dtype_target, "out", VALID_OUT_DTYPES, OUT_DTYPES),
        layouts=tuple(pick(layout_target, name, VALID_LAYOUTS, LAYOUTS) for name in ("hidden", "topk_ids", "topk_weights")),
        shape_fault=shape_fault, prepare_fault=prepare_fault, foreign="foreign" in faults,
        hidden_grad=draw(st.sampled_from(("no", "no", "requires_grad", "parameter"))),
        weights_grad=draw(st.booleans()),
        nan_policy=draw(st.sampled_from(("raise", "propagate"))),
        mode=draw(st.sampled_from(("forward", "submit"))),
        seed=draw(st.integers(0, 2 ** 31 - 1)),
    )


# ---- building the call --------------------------------------------------------------------------------

def build_layer(ex: Example) -> tuple[ExpertLayerSpec, ExpertWeights]:
    g = torch.Generator().manual_seed(ex.seed)
    E, H, I = ex.E, ex.H, ex.I
    gate = torch.randn(E, I, H, generator=g) / H ** 0.5
    up = torch.randn(E, I, H, generator=g) / H ** 0.5
    down = torch.randn(E, H, I, generator=g) / I ** 0.5
    if ex.zero_expert is not None:
        e, part = ex.zero_expert
        for name, m in (("gate", gate), ("up", up), ("down", down)):
            if part in (name, "all"):
                m[e] = 0
    biases = None
    act = ex.activation.removesuffix("+bias")
    has_bias = ex.activation.endswith("+bias")
    if has_bias:
        biases = (torch.randn(E, I, generator=g), torch.randn(E, I, generator=g), torch.randn(E, H, generator=g))
    # swiglu_oai with a low limit so that both clamps really cut values (as the conformance suite does).
    layer = ExpertLayerSpec(E, min(ex.k, E), H, I, activation=act, has_bias=has_bias,
                            swiglu_limit=0.75 if act == "swiglu_oai" else 7.0)
    return layer, ExpertWeights.from_float(gate, up, down, ex.backend_fmt, biases=biases)


def _values(ex: Example) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [T, H] fp32, topk_ids [T, k] int64 (as a float64 tensor when ids_dtype is float), weights
    [T, k] float64, before dtype, layout and shape faults."""
    g = torch.Generator().manual_seed(ex.seed + 1)
    T, k = ex.T, ex.k
    hidden = torch.randn(T, ex.H, generator=g) * ex.hidden_scale
    for t in ex.zero_rows:
        hidden[t] = 0
    for t, h, v in ex.hidden_specials:
        hidden[t, h] = v
    if ex.weight_kind == "router":
        w = torch.softmax(torch.randn(T, k, generator=g, dtype=torch.float64), dim=-1)
    elif ex.weight_kind == "signed":
        w = torch.randn(T, k, generator=g, dtype=torch.float64)
    else:  # magnitudes from 1e-3 to 1e3, either sign
        w = torch.randn(T, k, generator=g, dtype=torch.float64).sign() * 10.0 ** (
            torch.rand(T, k, generator=g, dtype=torch.float64) * 6 - 3)
    for t, j, v in ex.weight_specials:
        w[t, j] = v
    ids = torch.tensor(ex.ids, dtype=torch.int64).repeat(ex.tile, 1) if T else torch.empty(0, k, dtype=torch.int64)
    return hidden, ids, w


def _layout(t: torch.Tensor, how: str):
    if how == "contiguous":
        return t
    if how == "offset":  # contiguous, but not at the start of its storage
        buf = torch.zeros(t.numel() + 3, dtype=t.dtype)
        buf[3:] = t.reshape(-1)
        return buf[3:].view(t.shape)
    if how == "strided":  # every other column of a wider tensor
        if t.ndim != 2:
            return t
        wide = torch.zeros(t.shape[0], 2 * t.shape[1], dtype=t.dtype)
        wide[:, ::2] = t
        return wide[:, ::2]
    if how == "transposed":  # column-major storage of the same values
        return t.T.contiguous().T if t.ndim == 2 else t
    if how == "sparse":
        return t.to_sparse()
    if how == "sparse_csr":
        return t.to_sparse_csr() if t.ndim == 2 else t.to_sparse()
    if how == "mkldnn":  # oneDNN's opaque layout (float32 only)
        return t.to_mkldnn() if t.dtype == torch.float32 else t.to_sparse()
    if how == "meta":  # a tensor without data, on the meta device
        return t.to("meta")
    if how == "numpy":  # numpy has no bf16
        return (t.float() if t.dtype == torch.bfloat16 else t).numpy()
    if how == "list":
        return t.tolist()
    raise ValueError(how)


def _shape_fault(t: torch.Tensor, fault: str, H: int) -> torch.Tensor:
    if fault == "0d":
        return t.reshape(-1)[0].clone() if t.numel() else torch.zeros((), dtype=t.dtype)
    if fault == "1d":
        return t.reshape(-1)
    if fault == "3d":
        return t.unsqueeze(0)
    if fault in ("wide", "k+1"):
        return torch.cat([t, t[:, :1] if t.shape[1] else torch.zeros(t.shape[0], 1, dtype=t.dtype)], dim=1)
    if fault in ("narrow", "k-1", "k0"):
        return t[:, : 0 if fault == "k0" else t.shape[1] - 1].contiguous()
    if fault == "rows+1":
        return torch.cat([t, torch.zeros(1, t.shape[1], dtype=t.dtype)])
    if fault == "rows-1":
        return t[: max(t.shape[0] - 1, 0)].contiguous() if t.shape[0] else torch.zeros(1, t.shape[1], dtype=t.dtype)
    raise ValueError(fault)


def build_inputs(ex: Example):
    """(hidden, topk_ids, topk_weights, out_dtype) exactly as the caller passes them."""
    hidden, ids, w = _values(ex)
    hidden = hidden.to(DTYPES[ex.hidden_dtype])
    ids = ids.to(DTYPES[ex.ids_dtype])
    w = w.to(DTYPES[ex.weights_dtype])
    tensors = {"hidden": hidden, "topk_ids": ids, "topk_weights": w}
    if ex.shape_fault is not None:
        name, fault = ex.shape_fault
        tensors[name] = _shape_fault(tensors[name], fault, ex.H)
    out = {}
    for (name, t), how in zip(tensors.items(), ex.layouts):
        t = _layout(t, how)
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            if name == "hidden" and ex.hidden_grad == "parameter":
                t = torch.nn.Parameter(t)
            elif (name == "hidden" and ex.hidden_grad == "requires_grad") or (name == "topk_weights" and ex.weights_grad):
                t = t.requires_grad_(True) if t.is_leaf else t.detach().requires_grad_(True)
        out[name] = t
    return out["hidden"], out["topk_ids"], out["topk_weights"], DTYPES[ex.out_dtype]


# ---- what must happen ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Expected:
    """One fault of a call: the typed error it calls for and words its message must contain (any one)."""

    error: type
    words: tuple[str, ...]


def expected_errors(layer: ExpertLayerSpec, hidden, ids, w, out_dtype, nan_policy: str) -> list[Expected]:
    """Every fault of a forward call, judged on the tensors as passed (after any dtype conversion the
    caller did). An empty list: the call is valid and must compute."""
    faults: list[Expected] = []
    args = (("hidden", hidden), ("topk_ids", ids), ("topk_weights", w))
    is_t = {name: isinstance(t, torch.Tensor) for name, t in args}
    # Dense: a strided CPU tensor, the only kind whose values (and contiguity) are read below.
    dense = {name: is_t[name] and t.layout == torch.strided and t.device.type == "cpu" for name, t in args}
    for name, t in args:
        if not is_t[name]:
            faults.append(Expected(DTypeError, (name,)))
        elif t.device.type != "cpu":
            faults.append(Expected(DTypeError, (name,)))  # DeviceError, a DTypeError, once devices are checked
        elif t.layout != torch.strided:
            faults.append(Expected(ShapeError, (name,)))
    T = None
    if is_t["hidden"]:
        if hidden.ndim != 2 or hidden.shape[1] != layer.hidden_size:
            faults.append(Expected(ShapeError, ("hidden",)))
        else:
            T = hidden.shape[0]
        if hidden.dtype not in (torch.float32, torch.bfloat16):
            faults.append(Expected(DTypeError, ("hidden",)))
        if dense["hidden"] and not hidden.is_contiguous():
            faults.append(Expected(ShapeError, ("hidden",)))
    if is_t["topk_ids"]:
        if ids.ndim != 2 or (T is not None and ids.shape[0] != T) or ids.shape[1] < 1:
            faults.append(Expected(ShapeError, ("topk_ids",)))
        if ids.dtype not in (torch.int32, torch.int64):
            faults.append(Expected(DTypeError, ("topk_ids",)))
        if dense["topk_ids"] and not ids.is_contiguous():
            faults.append(Expected(ShapeError, ("topk_ids",)))
        if dense["topk_ids"] and ids.numel():
            v = ids.detach().to(torch.float64).reshape(-1)
            bad = v[(v < 0) | (v >= layer.num_experts)]
            if bad.numel():
                faults.append(Expected(ExpertIdError, tuple(str(int(b)) for b in bad.unique().tolist())))
    if is_t["topk_weights"]:
        if is_t["topk_ids"] and w.shape != ids.shape:
            faults.append(Expected(ShapeError, ("topk_weights",)))
        if not w.is_floating_point():
            faults.append(Expected(DTypeError, ("topk_weights",)))
        if dense["topk_weights"] and not w.is_contiguous():
            faults.append(Expected(ShapeError, ("topk_weights",)))
    if not isinstance(out_dtype, torch.dtype) or out_dtype not in (torch.float32, torch.bfloat16):
        faults.append(Expected(DTypeError, ("out_dtype",)))
    if nan_policy == "raise" and T:
        if dense["hidden"] and hidden.is_floating_point() and not torch.isfinite(hidden.detach()).all():
            faults.append(Expected(NonFiniteError, ("hidden",)))
        if dense["topk_weights"] and w.is_floating_point() and not torch.isfinite(w.detach().float()).all():
            faults.append(Expected(NonFiniteError, ("topk_weights",)))
    return faults


class PropertyFailure(AssertionError):
    pass


def check_error(exc: BaseException, faults: list[Expected]) -> None:
    if not isinstance(exc, MoetierError):
        raise PropertyFailure(f"untyped {type(exc).__name__}: {exc}; expected one of "
                              f"{sorted({f.error.__name__ for f in faults})}") from exc
    msg = str(exc)
    for f in faults:
        if isinstance(exc, f.error) and any(word in msg for word in f.words):
            return
    raise PropertyFailure(f"{type(exc).__name__}({msg!r}) matches none of the expected "
                          f"{[(f.error.__name__, f.words) for f in faults]}") from exc


def reference(ex: Example, layer: ExpertLayerSpec, weights: ExpertWeights, hidden: torch.Tensor,
              ids: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, scale) in float64: out is the reference forward on the inputs as the contract reads them
    (ids int64, weights rounded to fp32); scale[t, h] = sqrt(sum_j (w_tj * y_tj[h])^2), the root sum of
    squares of the slot contributions."""
    dense = {e: DenseExpert.from_tensors(weights.expert(e), torch.float64) for e in ex.held}
    ids = ids.detach().to(torch.int64)
    w32 = w.detach().to(torch.float32)
    out = moe_forward(layer, dense, hidden.detach(), ids, w32, torch.float64)
    sq = torch.zeros(hidden.shape, dtype=torch.float64)
    x = hidden.detach().to(torch.float64)
    for e, d in dense.items():
        tok, slot = (ids == e).nonzero(as_tuple=True)
        y = expert_mlp(layer, d, x[tok]) * w32[tok, slot, None].to(torch.float64)
        sq.index_add_(0, tok, y * y)
    return out, sq.sqrt()


def check_output(ex: Example, out, hidden, ids, w, out_dtype, layer, weights) -> str:
    """The numbers a valid call returned, against the float64 reference. Returns a one-line summary."""
    T, H = hidden.shape
    if not isinstance(out, torch.Tensor):
        raise PropertyFailure(f"returned {type(out).__name__}, not a tensor")
    if tuple(out.shape) != (T, H) or out.dtype != out_dtype:
        raise PropertyFailure(f"returned {list(out.shape)} {out.dtype}, expected {[T, H]} {out_dtype}")
    if out.requires_grad:
        raise PropertyFailure("the output requires grad (it must carry no gradient)")
    ref, scale = reference(ex, layer, weights, hidden, ids, w)
    o = out.detach().to(torch.float64)
    ref_bad = ~torch.isfinite(ref).all(dim=1)
    out_bad = ~torch.isfinite(o).all(dim=1)
    if not torch.equal(ref_bad, out_bad):
        rows = torch.nonzero(ref_bad != out_bad).flatten().tolist()
        raise PropertyFailure(f"non-finite rows differ from the reference at rows {rows}: reference "
                              f"{ref_bad.nonzero().flatten().tolist()}, backend {out_bad.nonzero().flatten().tolist()}")
    good = ~ref_bad
    zero = good & (scale == 0).all(dim=1) & (ref == 0).all(dim=1)
    if zero.any() and (o[zero] != 0).any():
        rows = zero.nonzero().flatten().tolist()
        worst = float(o[zero].abs().max())
        raise PropertyFailure(f"rows {rows} must be exactly zero (every contribution is zero), max |out| {worst:.3g}")
    # Bound: the format's conformance bound (tolerances.py), relative to max(||ref||, ||scale||). The second
    # norm is what the bound means when weights are signed or an id repeats: a backend's error is relative
    # to each slot's contribution, and w*y - w*y cancels in the sum but not in the error.
    r, o_, s = ref[good], o[good], scale[good]
    den = max(float(r.norm()), float(s.norm()))
    err = float((o_ - r).norm())
    tol = tolerance(ex.backend_fmt)
    if out_dtype == torch.bfloat16:
        tol = max(tol, 1e-2)  # the bf16 output rounding alone: up to 2^-8 per element (as check_close)
    if den == 0.0:
        return "zero (exact)"
    if not err <= tol * den:
        raise PropertyFailure(f"relative error {err / den:.3g} exceeds the {ex.backend_fmt} bound {tol:g}")
    return f"compared rel {err / den:.2e}"


def prepare_args(ex: Example, layer: ExpertLayerSpec, weights: ExpertWeights):
    """(layer, source, experts, fmt) for prepare, with the example's prepare fault applied."""
    fault, fmt = ex.prepare_fault, ex.backend_fmt
    held = list(ex.held)
    if fault is None:
        return layer, weights, held, fmt
    held = held or [0]  # the faults below need an expert to be asked for
    victim = held[0]
    experts = dict(weights.experts)
    if fault == "duplicate-id":
        held.append(victim)
    elif fault == "id-out-of-range":
        held.append(ex.E if ex.seed % 2 else -1)
    elif fault == "float-id":  # never truncated to an int behind the caller's back
        held.append(victim + 0.5)
    elif fault == "missing-expert":
        del experts[victim]
    elif fault == "unknown-format":
        fmt = "int3_g7"
    elif fault == "bias-missing":  # a biased layer, experts without biases
        layer = dataclasses.replace(layer, has_bias=True)
        experts = {e: ExpertTensors(t.gate, t.up, t.down) for e, t in experts.items()}
    elif fault == "bias-extra":  # a bias-free layer, experts with biases
        layer = dataclasses.replace(layer, has_bias=False)
        z = torch.zeros
        experts = {e: ExpertTensors(t.gate, t.up, t.down, z(ex.I), z(ex.I), z(ex.H)) for e, t in experts.items()}
    elif fault == "gate-shape":
        t = experts[victim]
        experts[victim] = ExpertTensors(quantize(torch.randn(ex.I + 1, ex.H), fmt), t.up, t.down,
                                        t.gate_bias, t.up_bias, t.down_bias)
    else:
        raise ValueError(fault)
    return layer, ExpertWeights(experts), held, fmt


def run_example(backends: dict, ex: Example) -> str:
    """Run one example on the backend; raise PropertyFailure when it breaks the contract."""
    backend = backends[ex.nan_policy]
    layer, weights = build_layer(ex)
    args = prepare_args(ex, layer, weights)
    if ex.prepare_fault is not None:
        error, word = PREPARE_FAULTS[ex.prepare_fault]
        try:
            backend.prepare(*args)
        except Exception as exc:  # noqa: BLE001 - any exception is judged by check_error
            check_error(exc, [Expected(error, (word,))])
            return f"prepare-raised {type(exc).__name__}"
        raise PropertyFailure(f"prepare raised nothing; expected {error.__name__}")
    try:
        prepared = (oracle() if ex.foreign else backend).prepare(*args)
    except Exception as exc:
        raise PropertyFailure(f"valid prepare raised {type(exc).__name__}: {exc}") from exc
    hidden, ids, w, out_dtype = build_inputs(ex)
    faults = expected_errors(layer, hidden, ids, w, out_dtype, ex.nan_policy)
    if ex.foreign:
        faults.append(Expected(PreparedExpertsError, ("prepared by",)))
    before = [t.detach().clone() if isinstance(t, torch.Tensor) else None for t in (hidden, ids, w)]
    try:
        if ex.mode == "submit":
            out = backend.submit(prepared, hidden, ids, w, out_dtype=out_dtype).wait(timeout=120)
        else:
            out = backend.forward(prepared, hidden, ids, w, out_dtype=out_dtype)
    except Exception as exc:
        if not faults:
            raise PropertyFailure(f"valid call raised {type(exc).__name__}: {exc}") from exc
        check_error(exc, faults)
        return f"raised {type(exc).__name__}"
    if faults:
        raise PropertyFailure(f"no error raised; expected {[(f.error.__name__, f.words) for f in faults]}")
    after = [t.detach() for t in (hidden, ids, w)]  # a valid call got three dense tensors
    if not all(torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                     and torch.equal(a.nan_to_num(0), b.nan_to_num(0)))
               for a, b in zip(before, after)):
        raise PropertyFailure("the call modified its inputs")
    return check_output(ex, out, hidden, ids, w, out_dtype, layer, weights)


# ---- the driver ---------------------------------------------------------------------------------------

def make_backends(name: str) -> dict:
    spec = load_registry(no_plugins=True).backend(name)
    inventory = load_inventory()
    backends = {}
    for policy in ("raise", "propagate"):
        b = spec.create(inventory)
        # create() takes no nan_policy; it is the instance's setting, read by every forward's validation.
        b.nan_policy = policy
        backends[policy] = b
    return backends


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", required=True)
    ap.add_argument("--examples", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--survey", action="store_true", help="record failures and go on (no shrinking)")
    ap.add_argument("--replay", help="run one printed Example(...) and show the outcome")
    ap.add_argument("--pinned", action="store_true", help="first run the PINNED examples, one line each")
    args = ap.parse_args(argv)
    # Tiny tensors: one intra-op thread avoids OpenMP hand-offs that cost more than the work on a busy CI
    # machine (the backends under test keep their own thread pools).
    torch.set_num_threads(1)
    backends = make_backends(args.backend)
    formats = tuple(backends["raise"].formats)
    variant = getattr(backends["raise"], "variant", "-")
    print(f"backend {args.backend} variant {variant} formats {','.join(formats)} seed {args.seed} "
          f"examples {args.examples}", flush=True)

    if args.replay:
        ex = eval(args.replay, {"Example": Example, "nan": nan, "inf": inf})  # our own repr, typed by the user
        print(f"EXAMPLE {ex!r}", flush=True)
        try:
            print("OK", run_example(backends, ex))
        except PropertyFailure as exc:
            traceback.print_exc()
            print(f"FAIL {exc}")
            return 1
        return 0

    if args.pinned:  # reported one line each; they do not change the exit status
        for name, ex in PINNED.items():
            if ex.backend_fmt not in formats:
                print(f"PINNED {name} skipped: {ex.backend_fmt} not computed", flush=True)
                continue
            print(f"EXAMPLE pinned {ex!r}", flush=True)
            try:
                print(f"PINNED {name} ok {run_example(backends, ex)}", flush=True)
            except PropertyFailure as exc:
                print(f"PINNED {name} FAIL {exc}", flush=True)

    outcomes: collections.Counter = collections.Counter()
    failures: list[tuple[Example, str]] = []
    last_failure: list[Example] = []
    start = time.perf_counter()

    @seed(args.seed)
    @settings(max_examples=args.examples, deadline=None, database=None, print_blob=False,
              phases=(Phase.generate,) if args.survey else (Phase.generate, Phase.shrink),
              suppress_health_check=list(HealthCheck))
    @given(ex=examples(formats))
    def prop(ex):
        n = sum(outcomes.values()) + 1
        print(f"EXAMPLE {n} {ex!r}", flush=True)  # before running: a crash leaves it as the last line
        t0 = time.perf_counter()
        try:
            result = run_example(backends, ex)
        except PropertyFailure as exc:
            outcomes["failed"] += 1
            print(f"FAIL {exc}", flush=True)
            if args.survey:
                failures.append((ex, str(exc)))
                return
            last_failure[:] = [ex]
            raise
        outcomes[result.split(" ")[0]] += 1
        print(f"ok {result} ({time.perf_counter() - t0:.2f} s)", flush=True)

    try:
        prop()
    except PropertyFailure as exc:
        print(f"PROPERTY FAILED on {args.backend} (seed {args.seed}): {exc}\nreplay: python {__file__} "
              f"--backend {args.backend} --replay \"{last_failure[0]!r}\"", flush=True)
        return 1
    print(f"RAN {sum(outcomes.values())} examples on {args.backend} in {time.perf_counter() - start:.1f} s: "
          + " ".join(f"{k}={v}" for k, v in sorted(outcomes.items())), flush=True)
    for ex, why in failures:
        print(f"FAILURE {why}\n  {ex!r}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
