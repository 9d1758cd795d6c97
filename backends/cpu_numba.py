"""cpu.numba: a portable backend written with numba, for every weight format.

It runs where no native kernel variant fits (ARM, x86 without AVX2) and is an independent second
implementation to check the native kernels against. Weights stay in their packed format: `pack` only
re-lays them out as raw bytes per row plus per-row scales, and the kernels in `numba_kernels` decode each
row in registers/L1 while streaming it. numba is an optional extra (`moetier[numba]`): this module imports
without it, and the probe then says why the backend cannot run.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch

from moetier import BackendSpec, BackendUnavailable, ExpertBackend, Probe, hookimpl
from moetier.errors import SettingError
from moetier.formats import FORMATS, FP8_BLOCK, unpack_int4

NAME = "cpu.numba"
SCORE = 20
TOKENS_PER_LAUNCH = 1024

# WeightFormat.name -> kernel kind code (the numbers of numba_kernels.KIND_*; kept here so the plugin
# module can describe itself without importing numba).
_KINDS = {"fp32": 0, "bf16": 1, "fp16": 2, "int8": 3, "int4_g32": 4, "int4_g64": 4, "int4_g128": 4, "fp8_e4m3": 5,
          "q8_0": 6, "q4_0": 7, "q4_k": 8, "q5_k": 9, "q6_k": 10, "mxfp4": 11, "q4_1": 12, "q5_0": 13, "q5_1": 14,
          "iq4_nl": 15, "iq4_xs": 16, "q2_k": 17, "q3_k": 18}
_ACTS = {"silu": 0, "swiglu_oai": 1}
# A format the core gains later is simply not declared until a kernel kind computes it (a test flags it).
COMPUTED_FORMATS = tuple(f for f in FORMATS if f in _KINDS)


def numba_status() -> tuple[bool, str]:
    """(importable, version or the import error)."""
    try:
        import numba
    except Exception as exc:  # ImportError, or a broken install raising something else
        return False, f"{type(exc).__name__}: {exc}"
    return True, numba.__version__


def _kernels():
    from . import numba_kernels  # noqa: PLC0415 - numba is optional, import it only when computing
    return numba_kernels


@dataclass(frozen=True, eq=False)
class PackedMatrix:
    """One matrix of every held expert: the packed row bytes [E, rows, row_bytes] seen through the typed
    view the format's kernel reads (u16 for bf16/fp16, i8 for int8, f32 for fp32, u8 for int4/fp8; the
    other views are 1-element placeholders so every format calls the kernel with the same argument
    types), plus fp32 per-row scales [E, rows, n_groups] (n_groups 0 for float formats)."""

    u8: np.ndarray
    u16: np.ndarray
    i8: np.ndarray
    f32: np.ndarray
    scales: np.ndarray

    @classmethod
    def from_rows(cls, raw: np.ndarray, scales: np.ndarray, kind: int) -> PackedMatrix:
        views = {np.uint8: _PLACEHOLDER[np.uint8], np.uint16: _PLACEHOLDER[np.uint16],
                 np.int8: _PLACEHOLDER[np.int8], np.float32: _PLACEHOLDER[np.float32]}
        dtype = _VIEW_OF_KIND[kind]
        views[dtype] = raw.view(dtype)
        return cls(views[np.uint8], views[np.uint16], views[np.int8], views[np.float32], scales)

    def args(self) -> tuple[np.ndarray, ...]:
        return self.u8, self.u16, self.i8, self.f32, self.scales

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.args())


_PLACEHOLDER = {t: np.zeros((1, 1, 1), t) for t in (np.uint8, np.uint16, np.int8, np.float32)}
_VIEW_OF_KIND = {0: np.float32, 1: np.uint16, 2: np.uint16, 3: np.int8, 4: np.uint8, 5: np.uint8,
                 **{k: np.uint8 for k in range(6, max(_KINDS.values()) + 1)}}  # the block formats


@dataclass(frozen=True, eq=False)
class NumbaPayload:
    kind: int  # gate/up's kernel kind (and down's: `down_kind`, which differs in a mixed format)
    group: int  # columns per scale: int4 group size, 128 for fp8 (1, unused, otherwise)
    down_kind: int
    down_group: int
    slot_of: np.ndarray  # [num_experts] int64: global expert id -> index into the stacked arrays, -1 if not held
    gate: PackedMatrix
    up: PackedMatrix
    down: PackedMatrix
    gate_bias: np.ndarray  # [E, I] fp32 (zeros when the layer has no biases)
    up_bias: np.ndarray
    down_bias: np.ndarray  # [E, H]


def _row_bytes(q) -> np.ndarray:
    """The packed data of one QuantizedTensor as uint8 [rows, row_bytes] in the kernel's layout."""
    if q.fmt.kind == "int4":
        return _repack_int4(q)
    if q.fmt.kind == "mxfp4":
        # The row's e8m0 scale bytes follow its codes, so one byte stream carries the whole row (4.25 bits
        # a weight, as shipped) and the kernel turns each scale into 2^(e-127) as it decodes.
        return torch.cat([q.data, q.scales], dim=1).contiguous().numpy()
    data = q.data.contiguous()
    if data.dtype == torch.float8_e4m3fn:
        data = data.view(torch.uint8)
    elif data.dtype in (torch.bfloat16, torch.float16):
        data = data.view(torch.int16)  # numpy has no bf16: move the bits as int16
    return data.numpy().view(np.uint8).reshape(q.shape[0], -1)


def _repack_int4(q) -> np.ndarray:
    """int4 rows re-laid in chunks of 128 values stored in 64 bytes: byte j of a chunk holds value j in its
    low nibble and value 64 + j in its high one (codes q + 8; the last chunk is padded with zero codes).
    The reference layout's bytes plus at most 63 pad bytes a row, and the kernel decodes and scales a
    chunk in one vectorisable pass."""
    rows, cols = q.shape
    chunks = -(-cols // 128)
    codes = torch.zeros(rows, chunks * 128, dtype=torch.int16)
    codes[:, :cols] = unpack_int4(q.data, cols).to(torch.int16)
    u = (codes + 8).to(torch.uint8).view(rows, chunks, 2, 64)
    return (u[:, :, 0, :] | (u[:, :, 1, :] << 4)).reshape(rows, chunks * 64).contiguous().numpy()


def _row_scales(q) -> np.ndarray:
    """Scales of one QuantizedTensor laid out per row: [rows, n_groups]."""
    fmt, rows = q.fmt, q.shape[0]
    if fmt.kind in ("float", "gguf", "mxfp4"):  # block formats carry their scales in the row bytes
        return np.zeros((rows, 0), np.float32)
    s = q.scales.numpy()
    if fmt.kind == "int8":
        return s.reshape(rows, 1)
    if fmt.kind == "int4":
        return s
    # fp8: block row r // 128 serves row r. Repeating it per row adds 4 bytes per 128 weights (3% of the
    # fp8 bytes) and keeps the kernel's scale lookup identical for every format.
    return np.repeat(s, FP8_BLOCK, axis=0)[:rows]


def _group(fmt) -> int:
    """Columns per scale the kernels take: the int4 group size, 128 for fp8 (1, unused, otherwise)."""
    return {"int4": fmt.group_size, "fp8": FP8_BLOCK}.get(fmt.kind, 1)


def _stack(mats, kind: int) -> PackedMatrix:
    raw = np.ascontiguousarray(np.stack([_row_bytes(q) for q in mats]))
    scales = np.ascontiguousarray(np.stack([_row_scales(q) for q in mats]), dtype=np.float32)
    return PackedMatrix.from_rows(raw, scales, kind)


# The workqueue threading layer (numba's fallback when neither OpenMP nor TBB is present) aborts the
# process if two threads launch parallel kernels at once, so calls are serialised unless we know the layer
# in use is thread-safe. The layer is only known after the first parallel launch, which is therefore locked.
_launch_lock = threading.Lock()
_layer_is_threadsafe: bool | None = None


class NumbaBackend(ExpertBackend):
    name = NAME
    formats = COMPUTED_FORMATS
    mixed_formats = True  # a kernel kind per projection

    def __init__(self, num_threads: int | None = None, nan_policy: str = "raise"):
        super().__init__(nan_policy=nan_policy)
        ok, why = numba_status()
        if not ok:
            raise BackendUnavailable(f"{NAME}: numba not importable: {why}")
        self.threads = None
        if num_threads is not None:
            self.set_threads(num_threads)

    def set_threads(self, threads: int) -> None:
        import numba
        if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= numba.config.NUMBA_NUM_THREADS:
            raise SettingError(f"{NAME}: threads must be an integer in [1, {numba.config.NUMBA_NUM_THREADS}], "
                               f"got {threads!r}")
        self.threads = threads

    def pack(self, layer, fmt, experts):
        if not experts:
            return None  # holds nothing: the base class answers every forward with zeros, no kernel runs
        ids = sorted(experts)
        slot_of = np.full(layer.num_experts, -1, np.int64)
        slot_of[ids] = np.arange(len(ids))
        ts = [experts[e] for e in ids]
        E, H, I = len(ids), layer.hidden_size, layer.intermediate_size

        def bias(name, n):
            if not layer.has_bias:
                return np.zeros((E, n), np.float32)
            return np.ascontiguousarray(np.stack([getattr(t, name).to(torch.float32).numpy() for t in ts]))

        # The kernels dispatch on the format per projection: a mixed format's gate/up and down each run
        # their own decoder.
        gu, dn = fmt.gate_up, fmt.down
        kind, down_kind = _KINDS[gu.name], _KINDS[dn.name]
        return NumbaPayload(
            kind=kind, group=_group(gu), down_kind=down_kind, down_group=_group(dn), slot_of=slot_of,
            gate=_stack([t.gate for t in ts], kind), up=_stack([t.up for t in ts], kind),
            down=_stack([t.down for t in ts], down_kind),
            gate_bias=bias("gate_bias", I), up_bias=bias("up_bias", I), down_bias=bias("down_bias", H))

    def compute(self, prepared, inputs):
        k = _kernels()
        x = inputs.hidden.to(torch.float32).contiguous().numpy()
        ids, w = inputs.topk_ids.numpy(), inputs.topk_weights.numpy()
        out = np.zeros((x.shape[0], prepared.layer.hidden_size), np.float32)
        # Bounded chunks keep the [pairs, I] fp32 intermediate small on long prompts; weights are then
        # streamed once per chunk, which a chunk this long amortises (the work is compute-bound by then).
        for t0 in range(0, x.shape[0], TOKENS_PER_LAUNCH):
            t1 = min(t0 + TOKENS_PER_LAUNCH, x.shape[0])
            self._launch(k, prepared, x[t0:t1], ids[t0:t1], w[t0:t1], out[t0:t1])
        return torch.from_numpy(out).to(inputs.out_dtype)

    def _launch(self, k, prepared, x, ids, w, out):
        global _layer_is_threadsafe
        if _layer_is_threadsafe:
            return self._run_kernels(k, prepared, x, ids, w, out)
        with _launch_lock:
            self._run_kernels(k, prepared, x, ids, w, out)
            if _layer_is_threadsafe is None:
                import numba
                try:
                    _layer_is_threadsafe = numba.threading_layer() in ("omp", "tbb")
                except ValueError:  # no parallel kernel has run yet (nothing was routed here)
                    pass

    def _run_kernels(self, k, prepared, x, ids, w, out):
        import numba
        layer, pl = prepared.layer, prepared.payload
        H, I = layer.hidden_size, layer.intermediate_size
        # Thread-local in numba: set on every call, since another backend may have changed it on this thread.
        numba.set_num_threads(self.threads or numba.config.NUMBA_NUM_THREADS)
        offsets, pair_tok, pair_w, active = k.group_pairs(ids, w, pl.slot_of)
        if active.shape[0] == 0:
            return
        h = np.empty((pair_tok.shape[0], I), np.float32)
        act = _ACTS[layer.activation]
        alpha, limit = np.float32(layer.swiglu_alpha), np.float32(layer.swiglu_limit)
        k.gate_up(pl.kind, pl.group, act, alpha, limit, H, I, x, offsets, pair_tok, active,
                  *pl.gate.args(), *pl.up.args(), pl.gate_bias, pl.up_bias, h)
        k.down_accumulate(pl.down_kind, pl.down_group, H, I, offsets, pair_tok, pair_w, active,
                          *pl.down.args(), pl.down_bias, h, out)


def _probe(inv) -> Probe:
    ok, why = numba_status()
    if not ok:
        return Probe(0, f"numba not importable: {why}", downgrade=True)
    return Probe(SCORE, f"portable numba kernels (numba {why}); JIT-compiled on first use")


def _factory(inv) -> NumbaBackend:
    # One thread per physical core: the decode kernels are bandwidth-bound, SMT siblings only add contention.
    import numba
    cores = getattr(getattr(inv, "cpu", None), "physical_cores", 0) or None
    return NumbaBackend(num_threads=None if cores is None else min(cores, numba.config.NUMBA_NUM_THREADS))


@hookimpl
def moetier_register_backends(register):
    register(BackendSpec(name=NAME, device="cpu", formats=COMPUTED_FORMATS, mixed_formats=True, probe=_probe,
                         factory=_factory,
                         description="portable numba kernels, all formats, fp32 accumulation"))
