"""The host functions of the hybrid step, called as a device runtime calls them: a C function pointer and
a void* of user data, from a thread that is not the one that made the task, never taking the GIL."""
from __future__ import annotations

import ctypes
import sys
import threading
import time

import pytest
import torch

from moetier.errors import DeviceError, DTypeError, ExpertIdError, ShapeError
from moetier.experts import ExpertLayerSpec, ExpertWeights
from moetier.hardware import load_inventory
from moetier.plugins import load_registry
from moetier.runtime.hybrid import HostTask, host_task_backend
from moetier.selection import select_backends

REGISTRY = load_registry(no_plugins=True)
INVENTORY = load_inventory()
BEST = select_backends(REGISTRY, INVENTORY, force=[]).for_device("cpu")
NATIVE = REGISTRY.backend(BEST).create(INVENTORY, threads=2)
pytestmark = pytest.mark.skipif(not host_task_backend(NATIVE), reason=f"{BEST} runs no host tasks (not native)")
HOST_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p)  # cudaHostFn_t: void (*)(void* userData)


def prepared(layer: ExpertLayerSpec, fmt: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    E, H, I = layer.num_experts, layer.hidden_size, layer.intermediate_size
    w = ExpertWeights.from_float(torch.randn(E, I, H, generator=g) / H ** 0.5, torch.randn(E, I, H, generator=g) / H ** 0.5,
                                 torch.randn(E, H, I, generator=g) / I ** 0.5, fmt)
    return NATIVE.prepare(layer, w, range(E), fmt)


def fill(buffers, layer, g):
    hidden, ids, weights = buffers
    T = hidden.shape[0]
    hidden.copy_(torch.randn(T, layer.hidden_size, generator=g))
    ids.copy_(torch.stack([torch.randperm(layer.num_experts, generator=g)[:ids.shape[1]] for _ in range(T)]))
    weights.copy_(torch.softmax(torch.randn(T, ids.shape[1], generator=g), dim=1))


@pytest.mark.parametrize("fmt,hidden_dtype,out_dtype", [("bf16", torch.bfloat16, torch.float32),
                                                        ("int4_g32", torch.float32, torch.float32),
                                                        ("fp8_e4m3", torch.bfloat16, torch.bfloat16)])
def test_entry_points_called_like_the_cuda_runtime_compute_the_backends_forward(fmt, hidden_dtype, out_dtype):
    layer = ExpertLayerSpec(8, 3, 64, 48)
    p = prepared(layer, fmt, 1)
    T = 6
    hidden = torch.empty(T, layer.hidden_size, dtype=hidden_dtype)
    ids, weights = torch.empty(T, 3, dtype=torch.int64), torch.empty(T, 3)
    out = torch.full((T, layer.hidden_size), float("nan"), dtype=out_dtype)
    task = NATIVE.host_task(p, hidden, ids, weights, out)
    assert isinstance(task, HostTask)
    enqueue, sync = HOST_FN(task.enqueue.fn), HOST_FN(task.sync.fn)
    assert task.enqueue.data == task.sync.data != 0
    g = torch.Generator().manual_seed(2)
    for run in (1, 2):  # fixed pointers, new values: what a graph replay does
        fill((hidden, ids, weights), layer, g)

        def host_callback_thread():
            enqueue(task.enqueue.data)  # returns at once: the task runs on the backend's host worker
            sync(task.sync.data)  # blocks this thread until it has run

        t = threading.Thread(target=host_callback_thread)
        t.start()
        t.join(60)
        assert not t.is_alive()
        assert task.submitted == task.completed == run
        assert torch.equal(out, NATIVE.forward(p, hidden, ids, weights, out_dtype=out_dtype)), (fmt, run)


def test_entry_points_never_take_the_gil():
    """A native thread (no Python state) runs enqueue and sync while this thread holds the GIL and never
    lets go of it (switch interval of 1000 s): the task must still complete."""
    layer = ExpertLayerSpec(8, 2, 64, 32)
    p = prepared(layer, "bf16", 3)
    T = 64
    bufs = (torch.empty(T, layer.hidden_size), torch.empty(T, 2, dtype=torch.int64), torch.empty(T, 2))
    fill(bufs, layer, torch.Generator().manual_seed(4))
    out = torch.empty(T, layer.hidden_size)
    task = NATIVE.host_task(p, *bufs, out)
    thread = NATIVE.host_callback_thread()
    # The control: a Python host function (ctypes takes the GIL to call it) on another such thread.
    ran = []
    python_fn = HOST_FN(lambda data: ran.append(data))
    control = NATIVE.host_callback_thread()
    old = sys.getswitchinterval()
    sys.setswitchinterval(1000.0)
    try:
        control.launch(ctypes.cast(python_fn, ctypes.c_void_p).value, 0)
        thread.launch(task.enqueue.fn, task.enqueue.data)
        thread.launch(task.sync.fn, task.sync.data)
        deadline = time.perf_counter() + 20.0
        while (thread.executed < 2 or task.completed < 1) and time.perf_counter() < deadline:
            pass  # pure Python: holds the GIL
        done = thread.executed == 2 and task.completed == 1
        control_ran = control.executed
    finally:
        sys.setswitchinterval(old)
    control.wait_executed(1)
    assert control_ran == 0 and ran == [None], "the GIL was not held throughout: the test proves nothing"
    assert done, f"host functions run {thread.executed}/2, task runs {task.completed}/1 while the GIL was held"
    assert torch.equal(out, NATIVE.forward(p, *bufs))


def test_sync_waits_for_the_run_and_tasks_run_in_order_on_one_worker():
    layer = ExpertLayerSpec(8, 2, 256, 256)
    p = prepared(layer, "bf16", 5)
    g = torch.Generator().manual_seed(6)
    tasks, outs, bufs_all = [], [], []
    for T in (512, 1, 7):
        bufs = (torch.empty(T, layer.hidden_size), torch.empty(T, 2, dtype=torch.int64), torch.empty(T, 2))
        fill(bufs, layer, g)
        out = torch.zeros(T, layer.hidden_size)
        tasks.append(NATIVE.host_task(p, *bufs, out))
        outs.append(out)
        bufs_all.append(bufs)
    thread = NATIVE.host_callback_thread()
    for t in tasks:
        thread.launch(t.enqueue.fn, t.enqueue.data)
    n = thread.launch(tasks[-1].sync.fn, tasks[-1].sync.data)
    thread.wait_executed(n)
    # One worker, first in first out: once the last task is synced, the earlier ones have run too.
    assert [t.completed for t in tasks] == [1, 1, 1]
    for out, bufs in zip(outs, bufs_all):
        assert torch.equal(out, NATIVE.forward(p, *bufs))


def test_a_bad_expert_id_zeroes_the_output_and_is_reported_once():
    layer = ExpertLayerSpec(8, 2, 64, 32)
    p = prepared(layer, "bf16", 7)
    hidden, ids, w = torch.randn(2, 64), torch.tensor([[0, 1], [2, 8]]), torch.full((2, 2), 0.5)
    out = torch.full((2, 64), 7.0)
    task = NATIVE.host_task(p, hidden, ids, w, out)
    HOST_FN(task.enqueue.fn)(task.enqueue.data)
    HOST_FN(task.sync.fn)(task.sync.data)
    assert task.completed == 1 and torch.count_nonzero(out) == 0
    with pytest.raises(ExpertIdError, match="out of range"):
        task.raise_error()
    task.raise_error()  # cleared
    ids[1, 1] = 3
    HOST_FN(task.enqueue.fn)(task.enqueue.data)
    task.wait()
    assert torch.equal(out, NATIVE.forward(p, hidden, ids, w))


def test_host_task_buffers_are_checked():
    layer = ExpertLayerSpec(8, 2, 64, 32)
    p = prepared(layer, "bf16", 8)
    h, ids, w, out = torch.randn(3, 64), torch.zeros(3, 2, dtype=torch.int64), torch.zeros(3, 2), torch.zeros(3, 64)
    with pytest.raises(DTypeError, match="int64"):
        NATIVE.host_task(p, h, ids.to(torch.int32), w, out)
    with pytest.raises(ShapeError, match="contiguous"):
        NATIVE.host_task(p, torch.randn(64, 3).T, ids, w, out)
    with pytest.raises(ShapeError):
        NATIVE.host_task(p, h, ids, w, torch.zeros(2, 64))
    with pytest.raises(DeviceError):
        NATIVE.host_task(p, h.to("meta"), ids, w, out)
