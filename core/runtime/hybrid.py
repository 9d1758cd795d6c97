"""The hybrid step: one layer's device experts and CPU experts computed at the same time, joined on the
device without the host waiting, and (for CUDA graphs) started from the stream itself.

One step, as KTransformers does it (the mechanism, not the code):

    side stream, after the main stream's work:  hidden, ids, weights -> a pinned staging slot (D2H)
                                                host function `enqueue(task)` for every CPU shard
    main stream, meanwhile:                     the device shards' experts
    side stream:                                host function `sync(task)` (its host thread waits for
                                                the CPU shards), CPU outputs -> device buffers (H2D)
    main stream:                                waits for the side stream (an event), sums the parts in
                                                fp32 in the tiered layer's order: CPU shards, then device

The CPU shards run on their backend's host worker thread (a `HostTask`: fixed pinned buffers, the
prepared experts, the kernels' thread pool) the moment the staging copy lands: no Python runs between
the copy and the CPU kernels, or between them and the copy back. The host functions are C entry points
of the native CPU module launched with `cudaLaunchHostFunc` (through ctypes; HIP: `hipLaunchHostFunc`):
they queue and wait, never take the GIL, and hold only fixed pointers, so a CUDA graph that captured a
step replays it (`HybridRunner`, graph=True).

Staging (`StagingRing`): pinned host buffers in a two-deep ring per batch size (capacity rounded up to
a power of two), shared by the layers of a model, so layer l+1 stages while layer l's output is still
being copied back; a slot is reused only after the work that read it (its fence) is done. On a CPU
stand-in device (`StandInStreams`: the calling thread is the main stream, a native thread runs the host
functions in order) the same code runs here, with the same C entry points.

Large prefills (`PrefillStreaming`): when the cost model (`moetier.offload.decide_stream`) says that
streaming a CPU shard's used experts to the device beats computing them on the CPU, they are prepared
on the device backend in chunks, the next chunk loading while the current one computes.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import itertools
import os
import threading
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from ..errors import BackendUnavailable, DeviceError, DTypeError, SettingError, ShapeError
from ..experts import (ExpertBackend, ExpertLayerSpec, ExpertSource, ForwardInputs, check_static_inputs,
                       validate_forward_inputs)
from ..offload import StreamDecision, decide_stream


# ---- host functions and host tasks -------------------------------------------------------------------

@dataclass(frozen=True)
class HostFunction:
    """A C function `void fn(void* data)` and its argument, as a device stream runs a host function."""

    fn: int
    data: int


@runtime_checkable
class HostTask(Protocol):
    """A CPU forward over fixed host buffers that host functions start (`enqueue`) and join (`sync`)."""

    enqueue: HostFunction
    sync: HostFunction
    tokens: int

    @property
    def completed(self) -> int: ...

    def wait(self) -> None: ...

    def raise_error(self) -> None: ...


def host_task_backend(backend: ExpertBackend) -> bool:
    """Whether `backend` makes host tasks (the native CPU backends do)."""
    return callable(getattr(backend, "host_task", None)) and callable(getattr(backend, "host_callback_thread", None))


def _loaded_library(prefix: str) -> str | None:
    """The path of a shared library this process has loaded whose file name starts with `prefix`."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rstrip("\n").split(" ")[-1]
                name = os.path.basename(path)
                if name.startswith(prefix) and ".so" in name:
                    return path
    except OSError:
        pass
    return None


class DeviceHostFunctions:
    """`cudaLaunchHostFunc` of the CUDA runtime torch loaded (HIP builds: `hipLaunchHostFunc`), called
    through ctypes. Without a runtime library in the process or on the loader path, the driver's
    `cuLaunchHostFunc` (the same operation one level down) is used, and `source` says so."""

    _instance: DeviceHostFunctions | None = None
    _lock = threading.Lock()

    def __init__(self):
        torch.cuda.init()  # loads the runtime torch uses, so its path is in /proc/self/maps
        hip = getattr(torch.version, "hip", None) is not None
        candidates = ([("libamdhip64", "amdhip64", "hipLaunchHostFunc")] if hip else
                      [("libcudart", "cudart", "cudaLaunchHostFunc"), ("libcuda.so", "cuda", "cuLaunchHostFunc")])
        tried = []
        for prefix, short, symbol in candidates:
            path = _loaded_library(prefix) or ctypes.util.find_library(short)
            if not path:
                tried.append(f"{prefix}: not loaded and not on the loader path")
                continue
            try:
                fn = getattr(ctypes.CDLL(path), symbol)
            except (OSError, AttributeError) as exc:
                tried.append(f"{path}: {exc}")
                continue
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
            fn.restype = ctypes.c_int
            self._fn, self.symbol, self.source = fn, symbol, path
            return
        raise BackendUnavailable("cannot launch host functions on the device stream: " + "; ".join(tried))

    @classmethod
    def get(cls) -> DeviceHostFunctions:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def launch(self, stream_handle: int, hf: HostFunction) -> None:
        err = self._fn(ctypes.c_void_p(stream_handle), ctypes.c_void_p(hf.fn), ctypes.c_void_p(hf.data))
        if err != 0:
            raise DeviceError(f"{self.symbol} failed with error {err}")


# ---- streams: the device's, and the CPU stand-in ----------------------------------------------------

class DeviceStreams:
    """The main stream (the caller's current one), one side stream per device for staging and host
    functions, pinned host memory. Shared by every hybrid layer on the device (`for_device`), so all
    staging on a device is ordered on one side stream."""

    _by_device: dict[torch.device, DeviceStreams] = {}
    _lock = threading.Lock()

    def __init__(self, device: torch.device):
        if device.type != "cuda":
            raise DeviceError(f"the hybrid step's streams need a CUDA or HIP device, got {device}")
        self.device = device
        self.host = DeviceHostFunctions.get()
        self.side_stream = torch.cuda.Stream(device)
        self._rings: dict[int, StagingRing] = {}

    def ring(self, hidden_size: int) -> StagingRing:
        """The staging ring every layer of this hidden size on this device shares (as KTransformers
        shares one staging buffer across layers: two slots, not two per layer)."""
        with self._lock:
            if hidden_size not in self._rings:
                self._rings[hidden_size] = StagingRing(self, hidden_size)
            return self._rings[hidden_size]

    @classmethod
    def for_device(cls, device: torch.device) -> DeviceStreams:
        device = torch.device(device.type, device.index if device.index is not None else torch.cuda.current_device())
        with cls._lock:
            if device not in cls._by_device:
                cls._by_device[device] = cls(device)
            return cls._by_device[device]

    def describe(self) -> str:
        return f"{self.device}: host functions by {self.host.symbol} ({self.host.source})"

    @property
    def capturing(self) -> bool:
        return torch.cuda.is_current_stream_capturing()

    def pinned(self, shape, dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=True)

    def buffer(self, shape, dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=self.device)

    def main(self):
        return torch.cuda.current_stream(self.device)

    def fork(self, *inputs: torch.Tensor) -> None:
        """The side stream waits for the main stream's work so far (the inputs it is about to read)."""
        self.side_stream.wait_stream(self.main())
        if not self.capturing:
            for t in inputs:  # the caching allocator must not recycle them while the side stream reads
                t.record_stream(self.side_stream)

    def side(self):
        return torch.cuda.stream(self.side_stream)

    def launch(self, hf: HostFunction) -> None:
        self.host.launch(self.side_stream.cuda_stream, hf)

    def join(self) -> None:
        """The main stream waits (on the device, an event) for everything on the side stream so far."""
        self.main().wait_stream(self.side_stream)

    def fence(self):
        """An event after the main stream's work so far (None inside a capture: the graph orders it)."""
        if self.capturing:
            return None
        ev = torch.cuda.Event()
        ev.record(self.main())
        return ev

    def before_reuse(self, fence) -> None:
        if fence is not None and not self.capturing:
            self.side_stream.wait_event(fence)

    def passed(self, fence) -> bool:
        return fence is None or bool(fence.query())

    def synchronize(self, fence) -> None:
        if fence is not None:
            fence.synchronize()


class StandInFence:
    """The stand-in's event: passed once its host thread has run the first `n` host functions."""

    def __init__(self, thread, n: int):
        self.thread, self.n = thread, n

    def query(self) -> bool:
        return self.thread.executed >= self.n

    def synchronize(self) -> None:
        self.thread.wait_executed(self.n)


class StandInStreams:
    """A CPU stand-in for a device: the calling thread is the main stream (its work is done when it
    returns), a native thread (`thread`: launch/executed/wait_executed, from a host-task backend's
    `host_callback_thread()`) runs the host functions in launch order, and work "on the side stream"
    first waits for the host functions launched before it, as a stream would. Tests and `moetier bench
    hybrid --cpu-stand-in` run the hybrid step's code and the real C entry points through it."""

    device = torch.device("cpu")
    capturing = False

    def __init__(self, thread):
        self.thread = thread

    def describe(self) -> str:
        return "CPU stand-in: host functions on a native thread, device work in the calling thread"

    def pinned(self, shape, dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype)

    buffer = pinned

    def fork(self, *inputs: torch.Tensor) -> None:
        pass  # the main stream's work is done: it ran in this thread

    @contextlib.contextmanager
    def side(self):
        self.thread.wait_executed(self.thread.launched)
        yield

    def launch(self, hf: HostFunction) -> None:
        self.thread.launch(hf.fn, hf.data)

    def join(self) -> None:
        self.thread.wait_executed(self.thread.launched)

    def fence(self) -> StandInFence:
        return StandInFence(self.thread, self.thread.launched)

    def before_reuse(self, fence) -> None:
        if fence is not None:
            fence.synchronize()

    def passed(self, fence) -> bool:
        return fence is None or fence.query()

    def synchronize(self, fence) -> None:
        if fence is not None:
            fence.synchronize()


class Streams(Protocol):
    device: torch.device
    capturing: bool

    def pinned(self, shape, dtype) -> torch.Tensor: ...
    def buffer(self, shape, dtype) -> torch.Tensor: ...
    def fork(self, *inputs: torch.Tensor) -> None: ...
    def side(self): ...
    def launch(self, hf: HostFunction) -> None: ...
    def join(self) -> None: ...
    def fence(self): ...
    def before_reuse(self, fence) -> None: ...
    def passed(self, fence) -> bool: ...
    def synchronize(self, fence) -> None: ...


# ---- the staging ring -------------------------------------------------------------------------------

def capacity_for(tokens: int) -> int:
    """The ring a batch of `tokens` stages in: the next power of two (so prefills of any length reuse
    a few rings instead of allocating per length)."""
    return 1 << max(0, tokens - 1).bit_length()


class Slot:
    """One staging slot: pinned hidden [C, H], ids [C, k] int64, weights [C, k] fp32, and per CPU shard a
    pinned output [C, H] fp32 with its device copy; `fence` marks the last work that read it."""

    def __init__(self, streams: Streams, capacity: int, hidden_size: int, k: int, dtype: torch.dtype, index: int):
        self.streams, self.capacity, self.hidden_size, self.index = streams, capacity, hidden_size, index
        self.hidden = streams.pinned((capacity, hidden_size), dtype)
        self.ids = streams.pinned((capacity, k), torch.int64)
        self.weights = streams.pinned((capacity, k), torch.float32)
        self.outs: list[torch.Tensor] = []
        self.device_outs: list[torch.Tensor] = []
        self.fence = None
        self.tasks: dict[tuple, HostTask] = {}
        self.retired: list[tuple[Any, HostTask]] = []  # replaced tasks, kept until the fence they ran under passed

    def ensure_outputs(self, n: int) -> None:
        while len(self.outs) < n:
            self.outs.append(self.streams.pinned((self.capacity, self.hidden_size), torch.float32))
            self.device_outs.append(self.streams.buffer((self.capacity, self.hidden_size), torch.float32))

    def buffers(self) -> list[torch.Tensor]:
        return [self.hidden, self.ids, self.weights, *self.outs, *self.device_outs]

    def task(self, key: tuple, tokens: int, make) -> HostTask:
        """The cached host task of `key` (a layer's shard) over the first `tokens` rows, made by `make()`
        when missing or when the batch changed (the old one retires until its work is surely done)."""
        t = self.tasks.get(key)
        if t is not None and t.tokens == tokens:
            return t
        if t is not None:
            self.retired.append((self.fence, t))
        t = self.tasks[key] = make()
        return t

    def purge(self) -> None:
        self.retired = [(f, t) for f, t in self.retired if not self.streams.passed(f)]


class StagingRing:
    """Two slots per (capacity, hidden dtype, k), taken in turn. `acquire` returns the next slot once the
    work that last read it is done: on a device the side stream waits for the slot's fence (no host
    wait); on the stand-in the calling thread waits. Buffers of a capacity are allocated on first use
    and never again."""

    DEPTH = 2

    def __init__(self, streams: Streams, hidden_size: int):
        self.streams, self.hidden_size = streams, hidden_size
        self._rings: dict[tuple, tuple[list[Slot], list[int]]] = {}
        self.lock = threading.RLock()  # one step's launches at a time (deferral computes from a second thread)

    def acquire(self, tokens: int, dtype: torch.dtype, k: int, outputs: int) -> Slot:
        cap = capacity_for(tokens)
        key = (cap, dtype, k)
        with self.lock:
            if key not in self._rings:
                self._rings[key] = ([Slot(self.streams, cap, self.hidden_size, k, dtype, i) for i in range(self.DEPTH)],
                                    [0])
            slots, turn = self._rings[key]
            slot = slots[turn[0]]
            turn[0] = (turn[0] + 1) % self.DEPTH
            self.streams.before_reuse(slot.fence)
            slot.ensure_outputs(outputs)
            slot.purge()
            return slot

    def release(self, slot: Slot, fence) -> None:
        slot.fence = fence

    def forget(self, step_key: int) -> None:
        """Retire the cached tasks of a step that is gone (they hold its prepared experts)."""
        with self.lock:
            for slot in self.slots():
                for key in [k for k in slot.tasks if k[0] == step_key]:
                    slot.retired.append((slot.fence, slot.tasks.pop(key)))
                slot.purge()

    def slots(self) -> list[Slot]:
        return [s for slots, _ in self._rings.values() for s in slots]


# ---- the step ---------------------------------------------------------------------------------------

_STEP_KEYS = itertools.count()


class HybridStep:
    """The hybrid forward of one layer: `host_shards` (CPU experts, as host tasks) and `device_shards`
    (computed on the main stream's device) over `streams`, staging through `ring`.

    forward() is the tiered layer's eager path (inputs validated once, any batch size); runner() makes
    a fixed-batch step that a CUDA graph can capture. The sum is the tiered layer's: host shards' parts
    in order, then device shards' parts, in fp32."""

    def __init__(self, spec: ExpertLayerSpec, host_shards: Sequence, device_shards: Sequence, streams: Streams,
                 ring: StagingRing | None = None):
        self.spec = spec
        self.host_shards, self.device_shards = tuple(host_shards), tuple(device_shards)
        for s in self.host_shards:
            if not host_task_backend(s.backend):
                raise BackendUnavailable(f"backend {s.backend.name} cannot run host tasks: the hybrid step needs "
                                         "a native CPU backend for its CPU shards")
        for s in self.device_shards:
            if s.device.type != streams.device.type:
                raise DeviceError(f"device shard on {s.device}, but the hybrid step's streams are on {streams.device}")
        if not self.host_shards and not self.device_shards:
            raise ShapeError("a hybrid step needs at least one shard")
        self.streams = streams
        self.ring = ring if ring is not None else StagingRing(streams, spec.hidden_size)
        if self.ring.hidden_size != spec.hidden_size:
            raise ShapeError(f"staging ring of hidden size {self.ring.hidden_size} for a layer of {spec.hidden_size}")
        self._key = next(_STEP_KEYS)  # names this step's tasks in shared slots (never reused, unlike id())
        weakref.finalize(self, self.ring.forget, self._key)
        self.nan_policy = "raise" if any(s.backend.nan_policy == "raise"
                                         for s in self.host_shards + self.device_shards) else "propagate"

    @property
    def device(self) -> torch.device:
        return self.streams.device

    def _tasks(self, slot: Slot, tokens: int) -> list[HostTask]:
        out = []
        for i, s in enumerate(self.host_shards):
            def make(s=s, i=i):
                return s.backend.host_task(s.prepared, slot.hidden[:tokens], slot.ids[:tokens],
                                           slot.weights[:tokens], slot.outs[i][:tokens])
            out.append(slot.task((self._key, i), tokens, make))
        return out

    def forward(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, *,
                out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        inputs = validate_forward_inputs(self.spec, hidden, topk_ids, topk_weights, out_dtype, self.nan_policy,
                                         device=self.device)
        T, k = inputs.hidden.shape[0], inputs.topk_ids.shape[1]
        st = self.streams
        with self.ring.lock:
            slot = self.ring.acquire(T, inputs.hidden.dtype, k, len(self.host_shards))
            tasks = self._tasks(slot, T)
            st.fork(inputs.hidden, inputs.topk_ids, inputs.topk_weights)
            with st.side():
                slot.hidden[:T].copy_(inputs.hidden, non_blocking=True)
                slot.ids[:T].copy_(inputs.topk_ids, non_blocking=True)
                slot.weights[:T].copy_(inputs.topk_weights, non_blocking=True)
            for t in tasks:
                st.launch(t.enqueue)
            pending = [s.backend.submit_validated(s.prepared, _device_inputs(inputs, s.device))
                       for s in self.device_shards]
            for t in tasks:
                st.launch(t.sync)
            with st.side():
                for i in range(len(tasks)):
                    slot.device_outs[i][:T].copy_(slot.outs[i][:T], non_blocking=True)
            st.join()
            parts = [slot.device_outs[i][:T] for i in range(len(tasks))] + [p.wait() for p in pending]
            out = _fixed_order_sum(parts)
            self.ring.release(slot, st.fence())
            if isinstance(st, StandInStreams):  # the work is done here: report a failed task now
                for t in tasks:
                    t.raise_error()
        return out if out_dtype == torch.float32 else out.to(out_dtype)

    __call__ = forward

    def runner(self, batch_size: int, **kwargs) -> HybridRunner:
        return HybridRunner(self, batch_size, **kwargs)


def _device_inputs(inputs: ForwardInputs, device: torch.device) -> ForwardInputs:
    if inputs.hidden.device == device:
        return inputs
    return ForwardInputs(inputs.hidden.to(device, non_blocking=True), inputs.topk_ids.to(device, non_blocking=True),
                         inputs.topk_weights.to(device, non_blocking=True), inputs.out_dtype)


def _fixed_order_sum(parts: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """parts[0] + parts[1] + ... left to right in fp32 (the tiered layer's order and rounding)."""
    if out is None:
        acc = parts[0].clone() if len(parts) == 1 else parts[0] + parts[1]
    else:
        acc = out.copy_(parts[0]) if len(parts) == 1 else torch.add(parts[0], parts[1], out=out)
    for p in parts[2:]:
        acc.add_(p)
    return acc


PARTS = ("host", "device")


class HybridRunner:
    """The hybrid step for exactly `batch_size` tokens over fixed buffers, so that it can be captured in
    a CUDA graph (graph=True) and replayed: run() copies the inputs into the static buffers and replays.

    Inputs live in static device buffers (those of the first device shard's DecodeRunner when there is
    one); the staging slot and the host tasks are bound at construction; the output buffer is the same
    tensor every step. As in the accelerator's decode step nothing is read back: an expert id out of
    range contributes nothing on the device, and makes the CPU part of that step zeros and its host
    task keep the error, which check() raises once the step is done.

    parts: ("host", "device") (default), ("host",) (the CPU part alone: staging, host functions, copy
    back) or ("device",) (the device experts alone), to time each part on its own.
    """

    def __init__(self, step: HybridStep, batch_size: int, *, hidden_dtype: torch.dtype = torch.bfloat16,
                 top_k: int | None = None, graph: bool = False, parts: Sequence[str] = PARTS):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ShapeError(f"batch_size must be a positive int, got {batch_size!r}")
        if hidden_dtype not in (torch.float32, torch.bfloat16):
            raise DTypeError(f"hidden_dtype must be torch.float32 or torch.bfloat16, got {hidden_dtype}")
        parts = tuple(parts)
        if not parts or any(p not in PARTS for p in parts):
            raise SettingError(f"parts must be a non-empty subset of {PARTS}, got {parts!r}")
        k = step.spec.top_k if top_k is None else top_k
        if not isinstance(k, int) or not 1 <= k <= step.spec.num_experts:
            raise ShapeError(f"top_k must be in [1, {step.spec.num_experts}], got {k!r}")
        self.step_def, self.batch_size, self.top_k, self.parts = step, batch_size, k, parts
        st = step.streams
        B, H = batch_size, step.spec.hidden_size
        host = step.host_shards if "host" in parts else ()
        device = step.device_shards if "device" in parts else ()
        if not host and not device:
            raise SettingError(f"this layer has no shards for parts {parts}")
        self.runners = [s.backend.decode_runner(s.prepared, B, top_k=k, hidden_dtype=hidden_dtype,
                                                out_dtype=torch.float32) for s in device]
        if self.runners:
            first = self.runners[0]
            self.hidden, self.topk_ids, self.topk_weights = first.hidden, first.topk_ids, first.topk_weights
        else:
            self.hidden = st.buffer((B, H), hidden_dtype)
            self.topk_ids = st.buffer((B, k), torch.int64)
            self.topk_weights = st.buffer((B, k), torch.float32)
        self.out = st.buffer((B, H), torch.float32)
        self.slot = None
        self.tasks: list[HostTask] = []
        if host:
            with step.ring.lock:
                # The runner keeps its slot: a captured graph replays these buffers and tasks.
                self.slot = step.ring.acquire(B, hidden_dtype, k, len(host))
                self.tasks = [s.backend.host_task(s.prepared, self.slot.hidden[:B], self.slot.ids[:B],
                                                  self.slot.weights[:B], self.slot.outs[i][:B])
                              for i, s in enumerate(host)]
        self.graph = None
        if graph:
            self.capture()

    def step(self) -> None:
        """One step over the static buffers into self.out (what a graph captures)."""
        st, slot, B = self.step_def.streams, self.slot, self.batch_size
        parts = []
        if self.tasks:
            st.fork()
            with st.side():
                slot.hidden[:B].copy_(self.hidden, non_blocking=True)
                slot.ids[:B].copy_(self.topk_ids, non_blocking=True)
                slot.weights[:B].copy_(self.topk_weights, non_blocking=True)
            for t in self.tasks:
                st.launch(t.enqueue)
        for r in self.runners[1:]:
            r.hidden.copy_(self.hidden)
            r.topk_ids.copy_(self.topk_ids)
            r.topk_weights.copy_(self.topk_weights)
        for r in self.runners:
            r.step()
        if self.tasks:
            for t in self.tasks:
                st.launch(t.sync)
            with st.side():
                for i in range(len(self.tasks)):
                    slot.device_outs[i][:B].copy_(slot.outs[i][:B], non_blocking=True)
            st.join()
            parts = [slot.device_outs[i][:B] for i in range(len(self.tasks))]
        _fixed_order_sum(parts + [r.out for r in self.runners], out=self.out)

    def capture(self) -> None:
        """Capture step() in a CUDA graph (warm-up on a side stream first, as capture requires)."""
        dev = self.step_def.device
        if dev.type != "cuda":
            raise BackendUnavailable(f"graph capture needs a CUDA or HIP device; this step runs on {dev}")
        warm = torch.cuda.Stream(dev)
        warm.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(warm):
            for _ in range(2):
                self.step()
        torch.cuda.current_stream(dev).wait_stream(warm)
        torch.cuda.synchronize(dev)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.step()
        self.graph = graph

    def run(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """Copy the inputs into the static buffers, compute, return the static output buffer."""
        check_static_inputs(hidden, topk_ids, topk_weights, batch_size=self.batch_size,
                            hidden_size=self.step_def.spec.hidden_size, top_k=self.top_k,
                            device=torch.device(self.step_def.device.type))
        self.hidden.copy_(hidden)
        self.topk_ids.copy_(topk_ids)
        self.topk_weights.copy_(topk_weights)
        if self.graph is not None:
            self.graph.replay()
        else:
            self.step()
        return self.out

    def check(self) -> None:
        """Raise the first error a host task hit (call once the step is done, e.g. after synchronizing)."""
        for t in self.tasks:
            t.raise_error()


# ---- large prefills: stream the used CPU experts to the device ---------------------------------------

@dataclass(frozen=True)
class StreamCosts:
    """What the n* rule needs (moetier.offload): the CPU kernels' FLOP/s, the host-to-device link's
    bytes/s and (optional) the DRAM bytes/s the CPU kernels stream experts at; from measurements."""

    cpu_flops: float
    link_bytes_per_s: float
    dram_bytes_per_s: float | None = None

    def __post_init__(self):
        for name in ("cpu_flops", "link_bytes_per_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise SettingError(f"{name} must be a positive number, got {v!r}")
        v = self.dram_bytes_per_s
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0):
            raise SettingError(f"dram_bytes_per_s must be a positive number or None, got {v!r}")


@dataclass(frozen=True, eq=False)
class PrefillStreaming:
    """Per layer and batch, stream a CPU shard's used experts to `device_backend` (default: the layer's
    first device shard's backend) when decide_stream says it is faster; `chunk_experts` experts are
    prepared at a time, the next chunk while the current one computes. The shard needs a `source` to
    read its experts from (the loader gives every memory shard its checkpoint)."""

    costs: StreamCosts
    device_backend: ExpertBackend | None = None
    chunk_experts: int = 8

    def __post_init__(self):
        if not isinstance(self.costs, StreamCosts):
            raise SettingError(f"costs must be a StreamCosts, got {type(self.costs).__name__}")
        if isinstance(self.chunk_experts, bool) or not isinstance(self.chunk_experts, int) or self.chunk_experts < 1:
            raise SettingError(f"chunk_experts must be a positive int, got {self.chunk_experts!r}")


@dataclass(frozen=True)
class ShardStreamDecision:
    """What the prefill path decided for one CPU shard of one forward, and why."""

    shard: int
    decision: StreamDecision | None
    streamed: bool
    note: str = ""


def tokens_per_expert(topk_ids_cpu: torch.Tensor, num_experts: int) -> torch.Tensor:
    return torch.bincount(topk_ids_cpu.reshape(-1), minlength=num_experts)


def decide_shard(spec: ExpertLayerSpec, shard, counts: torch.Tensor, costs: StreamCosts) -> StreamDecision:
    held = list(shard.prepared.expert_ids)
    return decide_stream(spec, shard.prepared.fmt, counts[held].tolist(), cpu_flops=costs.cpu_flops,
                         link_bytes_per_s=costs.link_bytes_per_s, dram_bytes_per_s=costs.dram_bytes_per_s)


def stream_experts(spec: ExpertLayerSpec, source: ExpertSource, fmt, used: Sequence[int], backend: ExpertBackend,
                   inputs: ForwardInputs, chunk: int) -> torch.Tensor:
    """Prepare `used` experts from `source` on `backend`'s device `chunk` at a time and compute the
    layer's inputs over each, the next chunk loading on a worker thread (on its own stream on a device)
    while the current one computes; at most two chunks are resident. Returns the fp32 sum over chunks
    on the backend's device."""
    dev = backend.device
    on_device = dev.type != "cpu"
    mod = getattr(torch, dev.type) if on_device else None
    copy_stream = mod.Stream(dev) if on_device else None
    chunks = [tuple(used[i:i + chunk]) for i in range(0, len(used), chunk)]

    def load(ids):
        if not on_device:
            return backend.prepare(spec, source, ids, fmt), None
        with mod.stream(copy_stream):
            prepared = backend.prepare(spec, source, ids, fmt)
            ready = mod.Event()
            ready.record(copy_stream)
        return prepared, ready

    out = None
    previous = None  # (prepared, pending) of the chunk before: freed once its compute is done
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="moetier-stream") as ex:
        loading = ex.submit(load, chunks[0])
        for i in range(len(chunks)):
            prepared, ready = loading.result()
            if previous is not None:
                _finish(previous[1])
                previous = None
            if i + 1 < len(chunks):
                loading = ex.submit(load, chunks[i + 1])
            if ready is not None:
                mod.current_stream(dev).wait_event(ready)
            pending = backend.submit_validated(prepared, inputs)
            part = pending.wait()
            out = part if out is None else out + part
            previous = (prepared, pending)
    if previous is not None:
        _finish(previous[1])
    return out


def _finish(pending) -> None:
    sync = getattr(pending, "synchronize", None)
    if sync is not None:
        sync()
    else:
        pending.wait()
