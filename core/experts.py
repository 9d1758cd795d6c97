"""The expert-compute contract every backend implements, and the checks every backend shares.

A backend computes, for T tokens each routed to k experts,

    out[t] = sum_j  topk_weights[t, j] * expert_{topk_ids[t, j]}(hidden[t])
    expert_e(x) = down_e( act(gate_e(x)) * up_e(x) )          (activation "silu")

over the experts it holds; ids it does not hold contribute nothing, which is how placement splits one
layer across tiers. `ExpertBackend` does the validation, the format conversion and the async plumbing
once, so a backend only writes `pack` and `compute`.

A backend computes on one `device` (CPU backends: cpu). Inputs must already live there and the output
is returned there; the caller moves tensors, never the backend behind its back. `submit` returns a
`Pending`: a `FuturePending` for work on a CPU worker thread, an `EventPending` for work enqueued on an
accelerator stream (joined by an event, so a caller on the device never blocks the host).
"""
from __future__ import annotations

import operator
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from .errors import (DeviceError, DTypeError, ExpertIdError, FormatError, MoetierError, NonFiniteError,
                     PreparedExpertsError, SettingError, ShapeError)
from .attention import check_attention_inputs
from .norm import check_rms_norm_inputs
from .rotary import check_rotary_inputs
from .dense import PackedLinear, check_linear_input
from .formats import QuantizedTensor, WeightFormat, computes, convert, get_format, mixed_format

ACTIVATIONS = ("silu", "swiglu_oai")


@dataclass(frozen=True)
class ExpertLayerSpec:
    """The shape of one MoE layer's routed experts.

    activation "silu": down(silu(gate x) * up x). "swiglu_oai" (gpt-oss): gate = min(gate x + bg, limit),
    up = clamp(up x + bu, -limit, limit), down((up + 1) * gate * sigmoid(alpha * gate)) + bd.
    """

    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    activation: str = "silu"
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    has_bias: bool = False

    def __post_init__(self):
        for name in ("num_experts", "top_k", "hidden_size", "intermediate_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ShapeError(f"ExpertLayerSpec.{name} must be a positive int, got {v!r}")
        if self.top_k > self.num_experts:
            raise ShapeError(f"top_k {self.top_k} exceeds num_experts {self.num_experts}")
        if self.activation not in ACTIVATIONS:
            raise FormatError(f"unknown activation {self.activation!r}; known: {', '.join(ACTIVATIONS)}")

    def expert_bytes(self, fmt: str | WeightFormat) -> int:
        """Bytes of one expert's three matrices in `fmt` (mixed: gate/up in its gate/up part, down in its down part)."""
        return get_format(fmt).expert_nbytes(self.hidden_size, self.intermediate_size)


@dataclass(frozen=True, eq=False)
class ExpertTensors:
    """One expert: gate and up are [I, H], down is [H, I]; biases (fp32) only for activation swiglu_oai."""

    gate: QuantizedTensor
    up: QuantizedTensor
    down: QuantizedTensor
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None

    @property
    def fmt(self) -> WeightFormat:
        """The expert's format: the plain one its three matrices share, or the mixed gate/up+down one.
        FormatError when gate and up differ (no layer format describes that)."""
        if self.gate.fmt != self.up.fmt:
            raise FormatError(f"expert gate is {self.gate.fmt} but up is {self.up.fmt}; a layer format keeps gate "
                              "and up in one format (convert them to one)")
        return mixed_format(self.gate.fmt, self.down.fmt)

    def to_format(self, fmt: str | WeightFormat) -> ExpertTensors:
        """The expert in `fmt`: gate and up in fmt.gate_up, down in fmt.down (each converted only if it differs)."""
        fmt = get_format(fmt)
        gu, dn = fmt.gate_up, fmt.down
        if self.gate.fmt == self.up.fmt == gu and self.down.fmt == dn:
            return self
        return ExpertTensors(convert(self.gate, gu), convert(self.up, gu), convert(self.down, dn),
                             self.gate_bias, self.up_bias, self.down_bias)


class ExpertSource(Protocol):
    """Where a backend's `prepare` reads experts from: in memory, or a checkpoint read one expert at a time."""

    def expert(self, expert_id: int) -> ExpertTensors: ...


@dataclass(frozen=True, eq=False)
class ExpertWeights:
    """An in-memory ExpertSource: a mapping from expert id to its tensors."""

    experts: Mapping[int, ExpertTensors]

    def expert(self, expert_id: int) -> ExpertTensors:
        try:
            return self.experts[expert_id]
        except KeyError:
            raise ExpertIdError(f"expert {expert_id} is not in this weight set (have {len(self.experts)} experts)") from None

    @classmethod
    def from_float(cls, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, fmt: str | WeightFormat,
                   biases: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> ExpertWeights:
        """Quantize stacked float weights gate/up [E, I, H], down [E, H, I] (biases [E,I],[E,I],[E,H]); a
        mixed `fmt` quantizes gate/up to its gate/up part and down to its down part."""
        from .formats import quantize

        fmt = get_format(fmt)
        if gate.ndim != 3 or up.shape != gate.shape or down.ndim != 3 or down.shape != (gate.shape[0], gate.shape[2], gate.shape[1]):
            raise ShapeError(f"expected gate/up [E, I, H] and down [E, H, I], got {list(gate.shape)}, {list(up.shape)}, {list(down.shape)}")
        out = {}
        for e in range(gate.shape[0]):
            b = (biases[0][e].float(), biases[1][e].float(), biases[2][e].float()) if biases is not None else (None, None, None)
            out[e] = ExpertTensors(quantize(gate[e], fmt.gate_up), quantize(up[e], fmt.gate_up),
                                   quantize(down[e], fmt.down), *b)
        return cls(out)


@dataclass(eq=False)
class PreparedExperts:
    """Experts packed into one backend's layout on its tier. `payload` is the backend's own business."""

    backend: str
    layer: ExpertLayerSpec
    fmt: WeightFormat
    expert_ids: tuple[int, ...]
    payload: Any = field(repr=False)
    nbytes: int = 0

    def holds(self, expert_id: int) -> bool:
        return expert_id in self._held

    def __post_init__(self):
        self._held = frozenset(self.expert_ids)


@runtime_checkable
class Pending(Protocol):
    """A submitted forward.

    wait(timeout) returns the output [T, H] on the backend's device, or raises the error the work hit;
    done() says, without blocking, whether the work has finished.
    """

    def wait(self, timeout: float | None = None) -> torch.Tensor: ...

    def done(self) -> bool: ...


class FuturePending:
    """CPU work running on a worker thread: wait() blocks the calling thread until it is done."""

    def __init__(self, future: Future):
        self._future = future

    def wait(self, timeout: float | None = None) -> torch.Tensor:
        return self._future.result(timeout)

    def done(self) -> bool:
        return self._future.done()


def device_module(device: torch.device):
    """torch.cuda (CUDA and HIP builds alike), torch.npu (torch_npu), ...: the stream/event API of a device type."""
    mod = getattr(torch, device.type, None)
    if mod is None or not hasattr(mod, "current_stream"):
        raise DeviceError(f"device type {device.type!r} has no stream API in this torch build")
    return mod


class EventPending:
    """Accelerator work enqueued on `stream`, with `event` recorded after it.

    wait() does not block the host: it makes the caller's *current stream* on the output's device wait
    for the event and returns the output, which is then safe to use on that stream (reading it on the
    host, .cpu() or .item(), synchronizes as usual). This is the join the hybrid step uses, and it can be
    captured in a CUDA graph. `timeout` does not apply (the host never waits here); synchronize() is the
    blocking form. done() queries the event without blocking.
    """

    def __init__(self, out: torch.Tensor, event: Any, stream: Any):
        self.out = out
        self.event = event
        self.stream = stream

    def wait(self, timeout: float | None = None) -> torch.Tensor:
        mod = device_module(self.out.device)
        current = mod.current_stream(self.out.device)
        current.wait_event(self.event)
        if current != self.stream:
            # The caching allocator must not hand the output's memory back to `stream` while the
            # caller's stream may still read it.
            self.out.record_stream(current)
        return self.out

    def synchronize(self) -> torch.Tensor:
        self.event.synchronize()
        return self.out

    def done(self) -> bool:
        return bool(self.event.query())


class ReadOnAccess(Mapping):
    """The experts `prepare` hands to `pack`: each read from the source, checked against the layer and
    converted to the format when accessed, never kept."""

    def __init__(self, layer: ExpertLayerSpec, source: ExpertSource, ids: tuple[int, ...], fmt: WeightFormat):
        self._layer, self._source, self._ids, self._fmt = layer, source, ids, fmt
        self._held = frozenset(ids)

    def __getitem__(self, expert_id: int) -> ExpertTensors:
        if expert_id not in self._held:
            raise KeyError(expert_id)
        t = self._source.expert(expert_id)
        check_expert_tensors(self._layer, expert_id, t)
        return t.to_format(self._fmt)

    def __iter__(self):
        return iter(self._ids)

    def __len__(self) -> int:
        return len(self._ids)


NAN_POLICIES = ("raise", "propagate")
_HIDDEN_DTYPES = (torch.float32, torch.bfloat16)
_OUT_DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class ForwardInputs:
    """Validated forward inputs: contiguous, ids int64 in range, weights fp32."""

    hidden: torch.Tensor
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    out_dtype: torch.dtype


class ExpertBackend(ABC):
    """Base of every backend. Subclasses set `name` and `formats` and implement `pack` and `compute`."""

    name: str = "?"
    formats: tuple[str, ...] = ()
    # Where inputs, weights and outputs live; accelerator backends set their own in __init__.
    device: torch.device = torch.device("cpu")
    threads: int | None = None  # CPU threads it computes on (None: not configurable)
    # Whether it computes mixed formats (gate/up in one format, down in another: each projection in its own
    # part) for every pair of formats it declares; `formats` lists plain formats only.
    mixed_formats: bool = False

    def computes(self, fmt: str | WeightFormat) -> bool:
        """Whether this backend computes experts in `fmt`: a plain format it declares, or (mixed_formats) a
        mixed one whose gate/up and down formats it both declares."""
        return computes(self.formats, fmt, mixed=self.mixed_formats)

    def __init__(self, nan_policy: str = "raise"):
        if nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
        self.nan_policy = nan_policy
        self._executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()

    # ---- what a backend implements -------------------------------------------------------------
    @abstractmethod
    def pack(self, layer: ExpertLayerSpec, fmt: WeightFormat, experts: Mapping[int, ExpertTensors]) -> Any:
        """Repack validated experts (all already in `fmt`) into this backend's layout; return the payload.

        `experts` reads each expert from its source when it is accessed (checked and converted then):
        access each once and keep only the packed form, so packing a layer needs the packed bytes plus
        one expert's working set, not a second copy of the layer. Accesses may come from several threads."""

    @abstractmethod
    def compute(self, prepared: PreparedExperts, inputs: ForwardInputs) -> torch.Tensor:
        """Return out [T, H] in inputs.out_dtype for validated inputs. Must be safe to call from two threads."""

    def set_threads(self, threads: int) -> None:
        """Compute on `threads` CPU threads from now on; prepared experts stay valid. A backend that has
        no thread count of its own refuses, rather than ignoring the setting."""
        raise SettingError(f"backend {self.name} does not take a thread count")

    def set_idle_spin_us(self, microseconds: int) -> None:
        """How long this backend's idle workers spin before sleeping. Decode raises it for its duration
        (waking a sleeping worker costs a system call round trip per call, ~50 calls per token); a
        backend without workers of its own has nothing to set."""

    # ---- dense matrices (optional): see moetier.dense ---------------------------------------------
    dense_formats: tuple[str, ...] = ()  # formats of dense matrices this backend computes (none by default)

    def pack_dense(self, weight: QuantizedTensor, bias: torch.Tensor | None) -> Any:
        """Repack one validated matrix (in a format of `dense_formats`); return the payload."""
        raise FormatError(f"backend {self.name} computes no dense matrices")

    def compute_dense(self, packed: PackedLinear, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """Return x W^T + b [T, out_features] in out_dtype for a validated x [T, in_features]."""
        raise FormatError(f"backend {self.name} computes no dense matrices")

    def compute_dense_many(self, packed: Sequence[PackedLinear], x: torch.Tensor,
                           out_dtype: torch.dtype) -> list[torch.Tensor]:
        """compute_dense of several matrices on one x that check_linear_input accepted for each (a layer's
        q, k and v). A backend may do them in one call."""
        return [self.compute_dense(p, x, out_dtype) for p in packed]

    def dense_nbytes(self, payload: Any, weight: QuantizedTensor) -> int:
        return weight.nbytes

    # Whether pack_dense_grouped / compute_dense take block-diagonal matrices (PackedLinear.groups > 1).
    grouped_dense: bool = False

    def pack_dense_grouped(self, weight: QuantizedTensor, bias: torch.Tensor | None, groups: int) -> Any:
        """Repack the stacked blocks [out, in / groups] of a block-diagonal matrix; return the payload
        (compute_dense then gets x [T, in] for it)."""
        raise FormatError(f"backend {self.name} computes no grouped (block-diagonal) dense matrices")

    def pack_linear(self, weight: QuantizedTensor, bias: torch.Tensor | None = None, *,
                    groups: int = 1) -> PackedLinear:
        """A dense matrix (moetier.formats.quantize's output, or any QuantizedTensor) and its bias [out]
        packed for `linear`. groups > 1: `weight` [out, k] holds the blocks of a block-diagonal matrix
        [out, groups * k] stacked (moetier.dense.PackedLinear), each of out / groups rows."""
        if not isinstance(weight, QuantizedTensor):
            raise DTypeError(f"pack_linear takes a moetier.formats.QuantizedTensor (formats.quantize(w, fmt)), "
                             f"got {type(weight).__name__}")
        if weight.fmt.name not in self.dense_formats:
            have = ", ".join(self.dense_formats) or "none"
            raise FormatError(f"backend {self.name} does not compute dense matrices in {weight.fmt}; it computes: {have}")
        out_f, in_f = weight.shape
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or out_f % groups:
            raise ShapeError(f"groups must be a positive integer dividing out_features {out_f}, got {groups!r}")
        if groups > 1 and not self.grouped_dense:
            raise FormatError(f"backend {self.name} computes no grouped (block-diagonal) dense matrices")
        if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (out_f,)):
            raise ShapeError(f"bias must be a tensor of shape [{out_f}], got "
                             f"{list(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
        bias = None if bias is None else bias.detach().to(torch.float32).contiguous()
        payload = self.pack_dense(weight, bias) if groups == 1 else self.pack_dense_grouped(weight, bias, groups)
        return PackedLinear(self.name, weight.fmt, out_f, in_f * groups, bias is not None,
                            self.dense_nbytes(payload, weight), payload, groups)

    def linear(self, packed: PackedLinear, x: torch.Tensor, *, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """x [T, in_features] (float32 or bfloat16) -> x W^T + b [T, out_features] in out_dtype (default:
        x's). No value checks (a NaN propagates): this runs once per dense matrix per token."""
        out_dtype = x.dtype if out_dtype is None and isinstance(x, torch.Tensor) else out_dtype
        x = check_linear_input(self.name, packed, x, out_dtype)
        if x.shape[0] == 0:
            return torch.empty(0, packed.out_features, dtype=out_dtype)
        return self.compute_dense(packed, x, out_dtype)

    # ---- attention over a KV cache (optional): see moetier.attention ----------------------------
    attention_dtypes: tuple[torch.dtype, ...] = ()  # q/k/v dtypes this backend's decode attention takes

    def compute_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                          mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
        """Return [B, T, Hq, Dv] in q's dtype for inputs check_attention_inputs accepted."""
        raise DTypeError(f"backend {self.name} computes no attention")

    def decode_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                         mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        """Attention of q [B, Hq, T, D] (a few new tokens) over k [B, Hkv, S, D] / v [B, Hkv, S, Dv]:
        [B, T, Hq, Dv] in q's dtype (moetier.attention has the conventions). No value checks: this runs
        once per layer per token."""
        mask = check_attention_inputs(self.name, self.attention_dtypes, q, k, v, mask, scale)
        return self.compute_attention(q.detach(), k.detach(), v.detach(), float(scale),
                                      None if mask is None else mask.detach(), bool(causal))

    # ---- RMSNorm (optional): see moetier.norm --------------------------------------------------------
    norm_dtypes: tuple[torch.dtype, ...] = ()  # dtypes this backend's RMSNorm takes

    def compute_rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """Return weight * norm(x) for x [rows, D] (rows contiguous) that check_rms_norm_inputs accepted."""
        raise DTypeError(f"backend {self.name} computes no norms")

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, *, eps: float) -> torch.Tensor:
        """transformers' Llama-family RMSNorm of x [..., D] with weight [D] (moetier.norm has the
        convention), in x's dtype and shape. No value checks: this runs several times per layer per token."""
        check_rms_norm_inputs(self.name, self.norm_dtypes, x, weight, eps)
        rows = x.detach().reshape(-1, x.shape[-1])
        if rows.shape[-1] > 1 and rows.stride(-1) != 1:
            rows = rows.contiguous()
        return self.compute_rms_norm(rows, weight.detach().contiguous(), float(eps)).view(x.shape)

    # ---- rotary embedding of attention heads (optional): see moetier.rotary ---------------------------
    rotary_dtypes: tuple[torch.dtype, ...] = ()  # dtypes this backend's rotary embedding takes

    def compute_rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, norm_weight: torch.Tensor | None,
                       eps: float) -> torch.Tensor:
        """Return [T, H, D] for inputs check_rotary_inputs accepted (heads, cos and sin rows contiguous)."""
        raise DTypeError(f"backend {self.name} computes no rotary embeddings")

    def rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, norm_weight: torch.Tensor | None = None,
               eps: float = 0.0) -> torch.Tensor:
        """Rotary embedding of the heads x [T, H, D] with cos / sin [T, R] (the first R dims of each head),
        after an RMSNorm of each head with norm_weight [D] when given; a new [T, H, D] tensor in x's dtype
        (moetier.rotary has the convention). No value checks: this runs twice per layer per token."""
        check_rotary_inputs(self.name, self.rotary_dtypes, x, cos, sin, norm_weight, eps)
        x, cos, sin = (t.detach() if t.stride(-1) == 1 or t.shape[-1] == 1 else t.detach().contiguous()
                       for t in (x, cos, sin))
        return self.compute_rotary(x, cos, sin, None if norm_weight is None else norm_weight.detach().contiguous(),
                                   float(eps))

    # ---- the contract ---------------------------------------------------------------------------
    def prepare(self, layer: ExpertLayerSpec, weights: ExpertSource, experts: Iterable[int],
                fmt: str | WeightFormat) -> PreparedExperts:
        fmt = get_format(fmt)
        if not self.computes(fmt):
            raise FormatError(f"backend {self.name} does not compute format {fmt}{why_not(self, fmt)}; it computes "
                              f"{', '.join(self.formats)}")
        ids = tuple(_expert_id(e) for e in experts)
        if len(set(ids)) != len(ids):
            raise ExpertIdError(f"expert ids given to prepare repeat: {sorted(ids)}")
        for e in ids:
            if not 0 <= e < layer.num_experts:
                raise ExpertIdError(f"expert id {e} out of range [0, {layer.num_experts})")
        payload = self.pack(layer, fmt, ReadOnAccess(layer, weights, ids, fmt))
        return PreparedExperts(self.name, layer, fmt, ids, payload, nbytes=self.payload_nbytes(payload, layer, fmt, ids))

    def payload_nbytes(self, payload: Any, layer: ExpertLayerSpec, fmt: WeightFormat, ids: tuple[int, ...]) -> int:
        """Bytes the packed experts occupy on the backend's tier; a backend whose layout pads or adds
        tables says so here (the default is the format's own size)."""
        return len(ids) * layer.expert_bytes(fmt)

    def forward(self, prepared: PreparedExperts, hidden: torch.Tensor, topk_ids: torch.Tensor,
                topk_weights: torch.Tensor, *, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        inputs = self.validate(prepared, hidden, topk_ids, topk_weights, out_dtype)
        return self._run(prepared, inputs)

    def submit(self, prepared: PreparedExperts, hidden: torch.Tensor, topk_ids: torch.Tensor,
               topk_weights: torch.Tensor, *, out_dtype: torch.dtype = torch.float32) -> Pending:
        """Start a forward and return at once; the inputs must stay unchanged until `wait()` returns.
        Bad inputs raise here, not at wait()."""
        inputs = self.validate(prepared, hidden, topk_ids, topk_weights, out_dtype)
        return self.submit_validated(prepared, inputs)

    def submit_validated(self, prepared: PreparedExperts, inputs: ForwardInputs) -> Pending:
        """Start a forward on inputs `validate` already accepted (a layer validates once for all its
        shards). The CPU form runs on this backend's worker thread; accelerator backends override it to
        enqueue on a stream and return an EventPending."""
        return FuturePending(self._submit_executor().submit(self._run, prepared, inputs))

    def _run(self, prepared: PreparedExperts, inputs: ForwardInputs) -> torch.Tensor:
        if inputs.hidden.shape[0] == 0 or not prepared.expert_ids:
            return torch.zeros(inputs.hidden.shape, dtype=inputs.out_dtype, device=self.device)
        return self.compute(prepared, inputs)

    def _submit_executor(self) -> ThreadPoolExecutor:
        with self._executor_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"moetier-{self.name}")
            return self._executor

    def validate(self, prepared: PreparedExperts, hidden: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor, out_dtype: torch.dtype) -> ForwardInputs:
        """The typed checks every backend's forward gets; see the conformance suite for each case."""
        check_prepared(self.name, prepared)
        return validate_forward_inputs(prepared.layer, hidden, topk_ids, topk_weights, out_dtype, self.nan_policy,
                                       device=self.device)


def check_prepared(backend: str, prepared: PreparedExperts) -> None:
    """Refuse experts another backend prepared (their payload is that backend's business)."""
    if not isinstance(prepared, PreparedExperts) or prepared.backend != backend:
        got = prepared.backend if isinstance(prepared, PreparedExperts) else type(prepared).__name__
        raise PreparedExpertsError(f"backend {backend} got experts prepared by {got}; prepare them with "
                                   f"this backend's prepare()")


def forward_value_error(layer: ExpertLayerSpec, what: str, bad_id: int = 0) -> MoetierError:
    """The typed error for a forward's bad values: what is "expert_id" (bad_id out of range), "hidden" or
    "topk_weights" (NaN or Inf under nan_policy='raise')."""
    if what == "expert_id":
        return ExpertIdError(f"expert id {bad_id} in topk_ids is out of range [0, {layer.num_experts})")
    return NonFiniteError(f"{what} {'contains' if what == 'hidden' else 'contain'} NaN or Inf (nan_policy='raise')")


def why_not(backend, fmt: WeightFormat) -> str:
    """Why a backend (or BackendSpec) that does not compute the mixed `fmt` refuses it ("" for a plain format)."""
    if fmt.split is None:
        return ""
    if not backend.mixed_formats:
        return " (it computes a layer in one format; a mixed one keeps gate/up and down in two)"
    return f" (it lacks {', '.join(p.name for p in fmt.parts if p.name not in backend.formats)})"


def _expert_id(e) -> int:
    """An expert id as an int; a float or a string is refused, never truncated (1.5 is not expert 1)."""
    try:
        return operator.index(e)
    except TypeError:
        raise ExpertIdError(f"expert id {e!r} given to prepare is not an integer") from None


def validate_forward_inputs(layer: ExpertLayerSpec, hidden: torch.Tensor, topk_ids: torch.Tensor,
                            topk_weights: torch.Tensor, out_dtype: torch.dtype = torch.float32,
                            nan_policy: str = "raise", device: torch.device = torch.device("cpu"),
                            values: bool = True) -> ForwardInputs:
    """The shape, dtype, device and value checks of a forward. The value checks (ids in range, no NaN)
    read the device once: one host synchronisation on an accelerator, none of it per tensor. values=False
    leaves them to a caller that makes them itself (the native kernels' binding does, in one pass)."""
    for name, t in (("hidden", hidden), ("topk_ids", topk_ids), ("topk_weights", topk_weights)):
        if not isinstance(t, torch.Tensor):
            raise DTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not on_device(t, device):
            raise DeviceError(f"{name} is on {t.device}, but this backend computes on {device}: "
                              f"move the inputs there first (tensor.to({str(device)!r}))")
    if hidden.ndim != 2 or hidden.shape[1] != layer.hidden_size:
        raise ShapeError(f"hidden must be [T, {layer.hidden_size}], got {list(hidden.shape)}")
    if hidden.dtype not in _HIDDEN_DTYPES:
        raise DTypeError(f"hidden must be float32 or bfloat16, got {hidden.dtype}")
    if out_dtype not in _OUT_DTYPES:
        raise DTypeError(f"out_dtype must be float32 or bfloat16, got {out_dtype}")
    T = hidden.shape[0]
    if topk_ids.ndim != 2 or topk_ids.shape[0] != T or topk_ids.shape[1] < 1:
        raise ShapeError(f"topk_ids must be [T={T}, k>=1], got {list(topk_ids.shape)}")
    if topk_weights.shape != topk_ids.shape:
        raise ShapeError(f"topk_weights must match topk_ids {list(topk_ids.shape)}, got {list(topk_weights.shape)}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise DTypeError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if not topk_weights.is_floating_point():
        raise DTypeError(f"topk_weights must be floating point, got {topk_weights.dtype}")
    for name, t in (("hidden", hidden), ("topk_ids", topk_ids), ("topk_weights", topk_weights)):
        if t.layout != torch.strided:  # sparse, oneDNN: no strides to read (CSR even refuses is_contiguous)
            raise ShapeError(f"{name} must be a dense tensor, got layout {t.layout} (call .to_dense() first)")
        if not t.is_contiguous():
            raise ShapeError(f"{name} must be contiguous (call .contiguous() first); got strides {t.stride()}")
    # Inference only: the output carries no gradient, and inputs that require grad are read as plain data.
    hidden, topk_ids, topk_weights = hidden.detach(), topk_ids.detach(), topk_weights.detach()
    weights = topk_weights.to(torch.float32).contiguous()
    check_finite = values and nan_policy == "raise" and T > 0
    if values and (topk_ids.numel() or check_finite):
        # Every value check in one tensor, read once (one device synchronisation, not four).
        parts = []
        if topk_ids.numel():
            parts += [topk_ids.min().to(torch.int64), topk_ids.max().to(torch.int64)]
        if check_finite:
            parts += [torch.isfinite(hidden).all().to(torch.int64), torch.isfinite(weights).all().to(torch.int64)]
        vals = torch.stack(parts).tolist()
        if topk_ids.numel():
            lo, hi = vals[0], vals[1]
            if lo < 0 or hi >= layer.num_experts:
                raise forward_value_error(layer, "expert_id", lo if lo < 0 else hi)
        if check_finite:
            finite_hidden, finite_weights = vals[-2], vals[-1]
            if not finite_hidden:
                raise forward_value_error(layer, "hidden")
            if not finite_weights:
                raise forward_value_error(layer, "topk_weights")
    return ForwardInputs(hidden, topk_ids.to(torch.int64).contiguous(), weights, out_dtype)


def on_device(t: torch.Tensor, device: torch.device) -> bool:
    """Whether `t` lives on `device`; a device given without an index ("cuda") matches any of its type."""
    if t.device.type != device.type:
        return False
    if device.index is None or device.type == "cpu":
        return True
    return t.device.index == device.index


def check_static_inputs(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, *,
                        batch_size: int, hidden_size: int, top_k: int, device: torch.device) -> None:
    """The checks a fixed-batch runner (a CUDA-graph step) can make without reading values: types,
    shapes for its batch size, device and dtypes. Value checks would synchronize with the device."""
    B, H, k = batch_size, hidden_size, top_k
    for name, t, shape in (("hidden", hidden, (B, H)), ("topk_ids", topk_ids, (B, k)),
                           ("topk_weights", topk_weights, (B, k))):
        if not isinstance(t, torch.Tensor):
            raise DTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise ShapeError(f"{name} must be {list(shape)} for this runner (batch size {B}), got {list(t.shape)}")
        if not on_device(t, device):
            raise DeviceError(f"{name} is on {t.device}, but this runner computes on {device}")
    if hidden.dtype not in (torch.float32, torch.bfloat16):
        raise DTypeError(f"hidden must be float32 or bfloat16, got {hidden.dtype}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise DTypeError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if not topk_weights.is_floating_point():
        raise DTypeError(f"topk_weights must be floating point, got {topk_weights.dtype}")


def check_expert_tensors(layer: ExpertLayerSpec, expert_id: int, t: ExpertTensors) -> None:
    """Shapes of one expert against its layer; raises ShapeError naming the expert and the matrix."""
    h, i = layer.hidden_size, layer.intermediate_size
    for name, q, want in (("gate", t.gate, (i, h)), ("up", t.up, (i, h)), ("down", t.down, (h, i))):
        if not isinstance(q, QuantizedTensor):
            raise DTypeError(f"expert {expert_id} {name}: expected a QuantizedTensor, got {type(q).__name__}")
        if tuple(q.shape) != want:
            raise ShapeError(f"expert {expert_id} {name} weight must be {list(want)}, got {list(q.shape)}")
    biases = (("gate_bias", t.gate_bias, i), ("up_bias", t.up_bias, i), ("down_bias", t.down_bias, h))
    if layer.has_bias:
        for name, b, n in biases:
            if b is None or tuple(b.shape) != (n,):
                raise ShapeError(f"expert {expert_id} {name} must be [{n}], got {None if b is None else list(b.shape)}")
    elif any(b is not None for _, b, _ in biases):
        raise ShapeError(f"expert {expert_id} carries biases but the layer has has_bias=False")

