"""NativeBackend: an ExpertBackend over one compiled ISA variant of the C++ kernels.

`pack` hands each expert's reference storage (numpy views of the torch tensors: bf16 as uint16 bits, fp8
as bytes) to the extension, which repacks it into its panel layout; `compute` calls the fused forward,
which runs in the extension's own pinned thread pool with the GIL released.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from moetier.errors import DeviceError, DTypeError, ExpertIdError, FormatError, MoetierError, PreparedExpertsError, \
    SettingError, ShapeError
from moetier.experts import ExpertBackend, ExpertLayerSpec, ExpertTensors, ForwardInputs, PreparedExperts, \
    check_prepared, forward_value_error, validate_forward_inputs
from moetier.runtime.hybrid import HostFunction
from moetier import ggml_blocks, mxfp4
from moetier.attention import ATTENTION_DTYPES
from moetier.norm import NORM_DTYPES
from moetier.rotary import ROTARY_DTYPES
from moetier.formats import QuantizedTensor, WeightFormat, pack_int4

from . import load_variant

NATIVE_FORMATS = ("fp32", "fp16", "bf16", "int8", "int4_g32", "int4_g64", "int4_g128", "fp8_e4m3",
                  "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_nl", "iq4_xs",
                  "mxfp4")
# GGUF block formats -> the kernels' layout that holds their values exactly: the blocks decode into
# integer codes with a scale (and min) per sub-block (ggml_blocks.affine_parts), which the packed panels
# keep per row and group as the file stores them (q8_0 / q4_0 / q5_0: fp16 d; q4_1 / q5_1: fp16 d and m;
# q4_k / q5_k: fp16 d and dmin per 256 with 6-bit sc and m per 32; q6_k: fp16 d per 256, int8 sc per 16;
# q2_k: d and dmin per 256, 4-bit sc and m per 16; q3_k: d per 256, sc - 32 per 16),
# so the kernels multiply the GGUF values; 2-, 3-, 5- and 6-bit codes keep their bits (2-bit lines plus third
# bits, nibbles plus top bits), not a byte each.
GGUF_LAYOUTS = {"q8_0": "int8_g32_f16", "q6_k": "int6_g16_kscales", "q5_k": "int5_g32_kscales", "q4_k": "int4_g32_kscales",
                "q4_0": "int4_g32_f16", "q4_1": "int4_g32_f16_mins", "q5_0": "int5_g32_f16",
                "q5_1": "int5_g32_f16_mins", "iq4_nl": "iq4_g32_f16", "iq4_xs": "iq4_g32_kscales",
                "q2_k": "int2_g16_kscales", "q3_k": "int3_g16_kscales"}


def _bytes(t: torch.Tensor) -> np.ndarray:
    """A contiguous tensor's storage as a numpy array of its raw bytes (no copy when already contiguous)."""
    return t.detach().contiguous().view(torch.uint8).numpy()


def _floats(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().to(torch.float32).contiguous().numpy()


def _core_siblings(cpu: int) -> str:
    try:
        return Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip()
    except OSError:
        return str(cpu)


def worker_cpus(inventory, threads: int) -> tuple[list[int], list[int]]:
    """CPUs to pin `threads` workers to (one per physical core, spread over NUMA nodes) and their nodes.

    Returns empty lists (no pinning) when there are fewer allowed physical cores than threads."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    per_node: list[list[int]] = []
    node_ids: list[int] = []
    seen_cores = set()
    for node in inventory.numa_nodes:
        cpus = []
        for c in sorted(node.cpus):
            core = _core_siblings(c)
            if c in allowed and core not in seen_cores:
                seen_cores.add(core)
                cpus.append(c)
        if cpus:
            per_node.append(cpus)
            node_ids.append(node.id)
    if not per_node:
        return [], []
    cpus, nodes = [], []
    i = 0
    while len(cpus) < threads and any(per_node):
        k = i % len(per_node)
        if per_node[k]:
            cpus.append(per_node[k].pop(0))
            nodes.append(k)  # dense node index 0..n-1, the pool's numbering
        i += 1
    if len(cpus) < threads:
        return [], []
    return cpus, nodes


class NativeBackend(ExpertBackend):
    """Experts computed by the native kernels of one ISA variant (see moetier.backends.native)."""

    formats = NATIVE_FORMATS
    dense_formats = NATIVE_FORMATS
    mixed_formats = True  # gate/up and down each packed in its own layout (MoELayer's down_fmt)

    def __init__(self, name: str, variant: str, inventory, *, threads: int | None = None,
                 nan_policy: str = "raise", int8_activations: bool = True, fp8_vbmi: bool = True,
                 extension: ModuleType | None = None):
        super().__init__(nan_policy=nan_policy)
        if threads is None:
            threads = max(1, inventory.cpu.physical_cores)
        self.name = name
        self.variant = variant
        self.int8_activations = bool(int8_activations)
        # fp8 on the VBMI kernels where the build and the CPU have them (False: the e4m3 -> fp16 path, which
        # CPUs without VBMI run; tests use it to cover that path here).
        self.fp8_vbmi = bool(fp8_vbmi)
        # `extension`: an already loaded kernel module of `variant` (the caller vouches that this CPU runs
        # it; the tests use it for a build over the software tile unit). Otherwise the guarded loader.
        self._ext = extension if extension is not None else load_variant(variant, inventory)
        self._inventory = inventory
        self._kernel_pool = None
        self._idle_spin_us = None  # None: the pool's default
        self._host_worker = None
        self._host_lock = threading.Lock()
        self.set_threads(threads)

    def set_threads(self, threads: int) -> None:
        """Compute on `threads` pinned workers from now on. Prepared experts stay valid: the packed layout
        never depends on the thread count (a forward already running keeps its old pool)."""
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            raise SettingError(f"{self.name}: threads must be a positive integer, got {threads!r}")
        cpus, nodes = worker_cpus(self._inventory, threads)
        self._kernel_pool = self._ext.ThreadPool(threads, cpus, nodes)
        if self._idle_spin_us is not None:  # a new pool keeps the setting
            self._kernel_pool.idle_spin_us = self._idle_spin_us
        self.threads = threads
        self.num_nodes = self._kernel_pool.num_nodes

    def set_idle_spin_us(self, microseconds: int) -> None:
        self._idle_spin_us = int(microseconds)
        self._kernel_pool.idle_spin_us = self._idle_spin_us

    def __repr__(self) -> str:
        return f"NativeBackend({self.name}, variant={self.variant}, threads={self.threads})"

    def pack(self, layer: ExpertLayerSpec, fmt: WeightFormat, experts: Mapping[int, ExpertTensors]):
        if not self.computes(fmt):
            raise FormatError(f"backend {self.name} does not compute format {fmt}")
        gu, dn = fmt.gate_up, fmt.down  # a mixed format packs each projection in its own layout
        gu.check_in_features(layer.hidden_size)  # block formats: rows of whole blocks (gate/up rows are H
        dn.check_in_features(layer.intermediate_size)  # long, down rows I)
        ids = sorted(experts)
        packed = self._ext.MoELayer(layer.num_experts, layer.hidden_size, layer.intermediate_size,
                                    _layout(gu), layer.activation,
                                    float(layer.swiglu_alpha), float(layer.swiglu_limit), bool(layer.has_bias),
                                    self.int8_activations, self.fp8_vbmi, down_fmt=_layout(dn), capacity=len(ids))

        def add(i_e):
            i, e = i_e
            t = experts[e]  # one expert at a time: a lazy source keeps one expert's working set
            (g, gs), (u, us), (d, ds) = (_panel_source(m) for m in (t.gate, t.up, t.down))
            packed.add_expert(e, g, gs, u, us, d, ds, _floats(t.gate_bias), _floats(t.up_bias), _floats(t.down_bias),
                              node=i % self.num_nodes, num_nodes=self.num_nodes)

        # add_expert repacks with the GIL released, so large layers pack on every core.
        if len(ids) > 1 and self.threads > 1:
            with ThreadPoolExecutor(max_workers=self.threads) as ex:
                list(ex.map(add, enumerate(ids)))
        else:
            for item in enumerate(ids):
                add(item)
        return packed

    def payload_nbytes(self, payload, layer: ExpertLayerSpec, fmt: WeightFormat, ids) -> int:
        return payload.num_slots * payload.expert_bytes  # panels padded to 16 rows, scales beside them

    def forward(self, prepared: PreparedExperts, hidden: torch.Tensor, topk_ids: torch.Tensor,
                topk_weights: torch.Tensor, *, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """ExpertBackend.forward with the value checks (ids in range, no NaN) made by the kernels' binding,
        in one pass before any work, instead of four torch reductions: 50 us of a decode call's 70."""
        check_prepared(self.name, prepared)
        # Experts of which this shard holds none never reach the kernels: checked here then.
        inputs = validate_forward_inputs(prepared.layer, hidden, topk_ids, topk_weights, out_dtype, self.nan_policy,
                                         values=not prepared.expert_ids)
        return self._run(prepared, inputs)

    def compute(self, prepared: PreparedExperts, inputs: ForwardInputs) -> torch.Tensor:
        hidden = inputs.hidden.detach()
        T, H = hidden.shape
        out = torch.empty(T, H, dtype=inputs.out_dtype)
        problem = prepared.payload.forward(self._kernel_pool, _storage(hidden), hidden.dtype == torch.bfloat16,
                                           inputs.topk_ids.numpy(), inputs.topk_weights.numpy(), _storage(out),
                                           inputs.out_dtype == torch.bfloat16, self.nan_policy == "raise")
        if problem is not None:
            raise forward_value_error(prepared.layer, *problem)
        return out

    # ---- dense matrices (moetier.dense): the same kernels and pool as the experts ---------------------
    def pack_dense(self, weight, bias):
        out_f, in_f = weight.shape
        packed = self._ext.DenseLinear(out_f, in_f, _layout(weight.fmt),
                                       bias is not None, self.int8_activations, self.fp8_vbmi)
        packed.pack(*_panel_source(weight), _floats(bias))
        return packed

    grouped_dense = True

    def pack_dense_grouped(self, weight, bias, groups):
        out_f, in_f = weight.shape
        if (out_f // groups) % 16:
            raise ShapeError(f"backend {self.name} packs grouped matrices of whole 16-row panels per group: "
                             f"{out_f} rows in {groups} groups are {out_f / groups:g} per group")
        packed = self._ext.DenseLinear(out_f, in_f, _layout(weight.fmt), bias is not None, self.int8_activations,
                                       self.fp8_vbmi, groups)
        packed.pack(*_panel_source(weight), _floats(bias))
        return packed

    def dense_nbytes(self, payload, weight) -> int:
        return payload.nbytes  # panels padded to 16 rows, scales beside them

    def compute_dense(self, packed, x, out_dtype):
        out = torch.empty(x.shape[0], packed.out_features, dtype=out_dtype)
        packed.payload.forward(self._kernel_pool, _storage(x), x.dtype == torch.bfloat16, _storage(out),
                               out_dtype == torch.bfloat16)
        return out

    def compute_dense_many(self, packed, x, out_dtype):
        # One kernel call for matrices of one format and width (a layer's q, k, v): x converted once, one
        # pool dispatch instead of one per matrix.
        if len(packed) < 2 or any(p.fmt != packed[0].fmt or p.in_features != packed[0].in_features or p.groups > 1
                                  for p in packed):
            return super().compute_dense_many(packed, x, out_dtype)
        outs = [torch.empty(x.shape[0], p.out_features, dtype=out_dtype) for p in packed]
        self._ext.dense_forward_many(self._kernel_pool, [p.payload for p in packed], _storage(x),
                                     x.dtype == torch.bfloat16, [_storage(o) for o in outs],
                                     out_dtype == torch.bfloat16)
        return outs

    # ---- attention over a KV cache for decode steps (moetier.attention) ------------------------------
    attention_dtypes = ATTENTION_DTYPES

    def compute_attention(self, q, k, v, scale, mask, causal):
        B, Hq, T, _ = q.shape
        out = torch.empty(B, T, Hq, v.shape[-1], dtype=q.dtype)
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(torch.float32)
        # Strided views, no copies: a cache's keys are read where they lie (rows must be contiguous).
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        if mask is not None and mask.stride(-1) != 1:
            mask = mask.contiguous()
        self._ext.decode_attention(self._kernel_pool, _storage(q), _storage(k), _storage(v), _storage(out),
                                   q.dtype == torch.bfloat16, scale, None if mask is None else mask.numpy(), causal)
        return out

    # ---- RMSNorm (moetier.norm): a decode step's rows in the calling thread, more on the pool ----------
    norm_dtypes = NORM_DTYPES

    def compute_rms_norm(self, x, weight, eps):
        out = torch.empty(x.shape, dtype=x.dtype)
        self._ext.rms_norm(self._kernel_pool, _storage(x), _storage(weight), _storage(out),
                           x.dtype == torch.bfloat16, eps)
        return out

    # ---- rotary embedding of attention heads (moetier.rotary), in the calling thread --------------------
    rotary_dtypes = ROTARY_DTYPES

    def compute_rotary(self, x, cos, sin, norm_weight, eps):
        out = torch.empty(x.shape, dtype=x.dtype)
        self._ext.rotary(_storage(x), _storage(cos), _storage(sin), _storage(out), x.dtype == torch.bfloat16,
                         None if norm_weight is None else _storage(norm_weight), eps)
        return out

    # ---- host tasks: the CPU half of the hybrid step (moetier.runtime.hybrid) -----------------------
    def host_task(self, prepared: PreparedExperts, hidden: torch.Tensor, topk_ids: torch.Tensor,
                  topk_weights: torch.Tensor, out: torch.Tensor) -> NativeHostTask:
        """A forward over fixed host buffers (hidden [T, H] fp32/bf16, ids [T, k] int64, weights [T, k]
        fp32, out [T, H] fp32/bf16), run on this backend's host worker thread each time its `enqueue`
        host function runs. The buffers' values are read when it runs, not now (nothing is validated
        but shapes and dtypes: the caller validated the values, or reads `error()` afterwards)."""
        if not isinstance(prepared, PreparedExperts) or prepared.backend != self.name:
            raise PreparedExpertsError(f"backend {self.name} got experts prepared by "
                                       f"{getattr(prepared, 'backend', type(prepared).__name__)}")
        H = prepared.layer.hidden_size
        for name, t in (("hidden", hidden), ("topk_ids", topk_ids), ("topk_weights", topk_weights), ("out", out)):
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                raise DeviceError(f"host task {name} must be a CPU tensor (pinned host memory), got "
                                  f"{getattr(t, 'device', type(t).__name__)}")
            if not t.is_contiguous():
                raise ShapeError(f"host task {name} must be contiguous")
        T = hidden.shape[0]
        if hidden.ndim != 2 or hidden.shape[1] != H or out.shape != hidden.shape:
            raise ShapeError(f"host task hidden and out must be [T, {H}], got {list(hidden.shape)}, {list(out.shape)}")
        if topk_ids.ndim != 2 or topk_ids.shape[0] != T or topk_weights.shape != topk_ids.shape:
            raise ShapeError(f"host task topk_ids and topk_weights must be [{T}, k], got {list(topk_ids.shape)}, "
                             f"{list(topk_weights.shape)}")
        if topk_ids.dtype != torch.int64 or topk_weights.dtype != torch.float32:
            raise DTypeError(f"host task ids must be int64 and weights float32, got {topk_ids.dtype}, "
                             f"{topk_weights.dtype}")
        for name, t in (("hidden", hidden), ("out", out)):
            if t.dtype not in (torch.float32, torch.bfloat16):
                raise DTypeError(f"host task {name} must be float32 or bfloat16, got {t.dtype}")
        task = self._ext.HostTask(prepared.payload, self._kernel_pool, self._worker(), _storage(hidden),
                                  hidden.dtype == torch.bfloat16, topk_ids.numpy(), topk_weights.numpy(),
                                  _storage(out), out.dtype == torch.bfloat16)
        fns = self._ext.host_function_addresses()
        return NativeHostTask(task, HostFunction(fns["enqueue"], task.address), HostFunction(fns["sync"], task.address))

    def host_callback_thread(self):
        """A native thread that runs host functions in launch order (launch(fn, data), launched,
        executed, wait_executed(n)): the CPU stand-in of a device stream's host functions."""
        return self._ext.HostCallbackThread()

    def _worker(self):
        with self._host_lock:
            if self._host_worker is None:
                self._host_worker = self._ext.HostWorker()
            return self._host_worker


def _layout(fmt: WeightFormat) -> str:
    """The kernels' packed layout of a plain format (GGUF_LAYOUTS for the block formats)."""
    return GGUF_LAYOUTS.get(fmt.name, fmt.name)


def _panel_source(q: QuantizedTensor) -> tuple[np.ndarray, np.ndarray | None]:
    """What add_expert takes for one matrix: its data bytes and fp32 scales; GGUF blocks decoded to the
    codes and scales of their kernel layout (GGUF_LAYOUTS; int4 nibbles as pack_int4 lays them, with mins
    the codes 0..15 themselves; the K-quants' d, dmin, sc and m, or scales then mins, in one array)."""
    if q.fmt.name == "mxfp4":
        return _bytes(q.data), _mxfp4_scales(q.scales)
    if q.fmt.name not in GGUF_LAYOUTS:
        return _bytes(q.data), _floats(q.scales)
    p = ggml_blocks.affine_parts(q.fmt.name, q.data, q.shape[1])
    codes = p.codes
    if q.fmt.name in ggml_blocks.IQ4_TYPES:  # the file's grid indices as the nibbles
        codes = pack_int4(ggml_blocks.iq4_indices(q.fmt.name, q.data, q.shape[1]).to(torch.int8) - 8)
    elif GGUF_LAYOUTS[q.fmt.name].startswith("int4"):
        codes = pack_int4(codes if p.mins is None else codes - 8)  # pack_int4 stores q + 8
    if GGUF_LAYOUTS[q.fmt.name].endswith("_kscales"):  # the two levels as stored: d, dmin, sc, m
        k = ggml_blocks.k_scales(q.fmt.name, q.data, q.shape[1])
        parts = [k.d, k.dmin, k.sc, k.m] if k.m is not None else [k.d, k.sc]
        scales = torch.cat([t.flatten().float() for t in parts])
    else:
        scales = p.scales if p.mins is None else torch.stack([p.scales, p.mins])
    return _bytes(codes), _floats(scales)


def _mxfp4_scales(e8m0: torch.Tensor) -> np.ndarray:
    """The kernels' fp32 scale per 32 of an mxfp4 matrix: half the e8m0 power of two, since the kernels'
    e2m1 table holds twice the values (integers). 255, the OCP spec's NaN scale, is refused: no weight of
    a quantized checkpoint can be NaN."""
    if bool((e8m0 == 255).any()):
        raise FormatError("mxfp4 scales hold 255, the NaN encoding of e8m0: the checkpoint's weights are not "
                          "numbers; re-export the model")
    return torch.ldexp(torch.ones(e8m0.shape), e8m0.to(torch.int32) - (mxfp4.E8M0_BIAS + 1)).numpy()


def _storage(t: torch.Tensor) -> np.ndarray:
    """A tensor's memory as numpy (bf16 as its uint16 bits), sharing it, strides kept."""
    return t.view(torch.uint16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


class NativeHostTask:
    """One native host task: `enqueue` and `sync` are the host functions to launch on a stream (each
    with the task as its argument); the task and its buffers live as long as this object."""

    def __init__(self, task, enqueue: HostFunction, sync: HostFunction):
        self._task, self.enqueue, self.sync = task, enqueue, sync
        self.tokens = task.tokens

    @property
    def completed(self) -> int:
        return self._task.completed

    @property
    def submitted(self) -> int:
        return self._task.submitted

    def wait(self) -> None:
        """Block (GIL released) until every enqueue so far has run."""
        self._task.wait()

    def raise_error(self) -> None:
        """Raise the first error a run hit since the last call (its output was zeroed), and clear it."""
        err = self._task.error()
        if err is None:
            return
        self._task.clear_error()
        code, message = err
        if code == 1:
            raise ExpertIdError(f"host task: {message} (the CPU part of that step contributed zeros)")
        raise MoetierError(f"host task failed: {message} (the CPU part of that step contributed zeros)")
