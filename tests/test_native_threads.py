"""The native backend's thread pool, GIL release, concurrency, and typed errors on bad input."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from moetier.errors import DTypeError, ExpertIdError, NonFiniteError, SettingError, ShapeError
from moetier.reference import oracle

from test_native_common import RUNNABLE, make_backend, needs_native, random_layer, reference, rel_err, routing

pytestmark = needs_native
BEST = RUNNABLE[-1] if RUNNABLE else None


@pytest.fixture
def small(monkeypatch):
    gen = torch.Generator().manual_seed(torch.seed())
    layer, weights = random_layer(gen, "int8", 6, 2, 40, 24)
    be = make_backend(BEST, monkeypatch)
    return gen, layer, weights, be, be.prepare(layer, weights, range(6), "int8")


def test_threads_argument(monkeypatch):
    be = make_backend(BEST, monkeypatch, threads=None)
    assert be.threads >= 1
    for bad in (0, -1, 1.5, True):
        with pytest.raises(SettingError, match="threads"):
            make_backend(BEST, monkeypatch, threads=bad)


def test_concurrent_forwards_from_two_python_threads(small):
    gen, layer, weights, be, prepared = small
    batches = [(torch.randn(T, 40, generator=gen), *routing(gen, T, 6, 2)) for T in (1, 9, 3, 17) * 3]
    expected = [be.forward(prepared, *b) for b in batches]
    results = [None] * len(batches)

    def worker(idx):
        for i in idx:
            results[i] = be.forward(prepared, *batches[i])

    ts = [threading.Thread(target=worker, args=(range(j, len(batches), 2),)) for j in (0, 1)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for got, want in zip(results, expected):
        assert torch.equal(got, want)


def test_submit_returns_and_the_gil_is_released_during_compute(monkeypatch):
    gen = torch.Generator().manual_seed(torch.seed())
    layer, weights = random_layer(gen, "bf16", 16, 4, 512, 384)
    be = make_backend(BEST, monkeypatch, threads=1)
    prepared = be.prepare(layer, weights, range(16), "bf16")
    hidden = torch.randn(256, 512, generator=gen)
    ids, w = routing(gen, 256, 16, 4)
    pending = be.submit(prepared, hidden, ids, w)
    # While the kernel computes, this thread keeps running Python: it could not if the GIL were held.
    ticks = 0
    while not pending.done():
        ticks += 1
        time.sleep(0)
    out = pending.wait()
    assert ticks > 10
    assert rel_err(out, reference(layer, weights, range(16), "bf16", hidden, ids, w)) < 1e-2


def test_bad_inputs_raise_typed_errors(small):
    gen, layer, weights, be, prepared = small
    x = torch.randn(3, 40, generator=gen)
    ids, w = routing(gen, 3, 6, 2)
    with pytest.raises(ShapeError):
        be.forward(prepared, torch.randn(3, 41), ids, w)
    with pytest.raises(ExpertIdError):
        be.forward(prepared, x, torch.tensor([[0, 6], [1, 2], [3, 4]]), w)
    with pytest.raises(DTypeError):
        be.forward(prepared, x.double(), ids, w)
    with pytest.raises(NonFiniteError):
        be.forward(prepared, torch.full((3, 40), float("nan")), ids, w)
    with pytest.raises(TypeError):
        other = oracle()
        be.forward(other.prepare(layer, weights, range(6), "int8"), x, ids, w)
    # Zero tokens: an empty result without touching the kernel.
    assert be.forward(prepared, torch.zeros(0, 40), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2)).shape == (0, 40)


def test_nan_propagates_when_asked(monkeypatch):
    gen = torch.Generator().manual_seed(torch.seed())
    layer, weights = random_layer(gen, "int4_g32", 4, 2, 40, 24)
    be = make_backend(BEST, monkeypatch, nan_policy="propagate")
    prepared = be.prepare(layer, weights, range(4), "int4_g32")
    for T in (2, 30):  # decode and prefill paths
        x = torch.randn(T, 40, generator=gen)
        x[1, 5] = float("nan")
        ids, w = routing(gen, T, 4, 2)
        out = be.forward(prepared, x, ids, w)
        assert torch.isnan(out[1]).all()
        assert torch.isfinite(out[0]).all()


def test_extension_checks_sizes_itself(monkeypatch):
    """The extension's own boundary: wrong byte counts and dtypes raise, never touch memory."""
    be = make_backend(BEST, monkeypatch, threads=1)
    ext = be._ext
    layer = ext.MoELayer(4, 40, 24, "int4_g32")
    g = np.zeros((24, 20), np.uint8)
    s = np.ones((24, 2), np.float32)
    d = np.zeros((40, 12), np.uint8)
    ds = np.ones((40, 1), np.float32)
    with pytest.raises(ValueError, match="bytes"):
        layer.add_expert(0, g[:, :19].copy(), s, g, s, d, ds)
    with pytest.raises(ValueError, match="scales"):
        layer.add_expert(0, g, None, g, s, d, ds)
    with pytest.raises(TypeError, match="float32"):
        layer.add_expert(0, g, s.astype(np.float64), g, s, d, ds)
    with pytest.raises(ValueError, match="format"):
        ext.MoELayer(4, 40, 24, "int3")
    layer.add_expert(0, g, s, g, s, d, ds)
    with pytest.raises(ValueError, match="already packed"):
        layer.add_expert(0, g, s, g, s, d, ds)
    with pytest.raises(IndexError):
        layer.add_expert(4, g, s, g, s, d, ds)
    pool = ext.ThreadPool(1, [], [])
    out = np.empty((2, 40), np.float32)
    x = np.zeros((2, 40), np.float32)
    with pytest.raises(TypeError):
        layer.forward(pool, x, False, np.zeros((2, 2), np.int32), np.zeros((2, 2), np.float32), out, False)
    # Bad values come back as (what, id) before any work, for the backend's typed error; out untouched.
    out[:] = 5.0
    assert layer.forward(pool, x, False, np.full((2, 2), 9, np.int64), np.zeros((2, 2), np.float32), out,
                         False) == ("expert_id", 9)
    assert layer.forward(pool, x, False, np.array([[0, -3], [1, 2]], np.int64), np.zeros((2, 2), np.float32), out,
                         False) == ("expert_id", -3)
    nan_x = x.copy()
    nan_x[1, 7] = np.nan
    ids, w = np.zeros((2, 2), np.int64), np.ones((2, 2), np.float32)
    assert layer.forward(pool, nan_x, False, ids, w, out, False, True) == ("hidden", 0)
    inf_w = w.copy()
    inf_w[0, 1] = np.inf
    assert layer.forward(pool, x, False, ids, inf_w, out, False, True) == ("topk_weights", 0)
    assert (out == 5.0).all()
    assert layer.forward(pool, nan_x, False, ids, w, out, False) is None  # check_finite off: NaN propagates
    with pytest.raises(ValueError):
        layer.forward(pool, x[:, :30].copy(), False, np.zeros((2, 2), np.int64), np.zeros((2, 2), np.float32), out, False)


def test_background_workers_are_pinned(monkeypatch):
    import os

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two allowed CPUs")
    be = make_backend(BEST, monkeypatch, threads=2)
    assert be._kernel_pool.size == 2
    # The caller is worker 0; the one background worker pins itself when it starts.
    deadline = time.time() + 5
    while be._kernel_pool.pinned != 1 and time.time() < deadline:
        time.sleep(0.01)
    assert be._kernel_pool.pinned == 1


def test_two_numa_nodes_split_and_reduce(monkeypatch):
    """A (recorded-style) two-node inventory over this machine's CPUs: experts are homed on alternate
    nodes, each node reduces its own experts and a last phase sums the nodes. Same result as one node."""
    import dataclasses
    import os

    from moetier.backends.native.backend import NativeBackend
    from moetier.hardware import NumaNode

    from test_native_common import BACKEND_OF, INVENTORY

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two allowed CPUs")
    nodes = (NumaNode(0, (cpus[0],), 1 << 30, 1 << 30), NumaNode(1, (cpus[1],), 1 << 30, 1 << 30))
    two_nodes = dataclasses.replace(INVENTORY, numa_nodes=nodes)
    monkeypatch.setenv("MOETIER_CPU_VARIANT", BEST)
    be2 = NativeBackend(BACKEND_OF[BEST], BEST, two_nodes, threads=2)
    assert be2.num_nodes == 2
    gen = torch.Generator().manual_seed(torch.seed())
    layer, weights = random_layer(gen, "bf16", 7, 3, 48, 40)
    be1 = make_backend(BEST, monkeypatch, threads=1)
    for T in (1, 30):
        hidden = torch.randn(T, 48, generator=gen)
        ids, w = routing(gen, T, 7, 3)
        out2 = be2.forward(be2.prepare(layer, weights, range(7), "bf16"), hidden, ids, w)
        out1 = be1.forward(be1.prepare(layer, weights, range(7), "bf16"), hidden, ids, w)
        assert rel_err(out2, out1) < 1e-6  # only the order of the fp32 sums across nodes differs
        assert rel_err(out2, reference(layer, weights, range(7), "bf16", hidden, ids, w)) < 1e-2


def test_idle_spin_is_a_setting_of_the_backend(monkeypatch):
    """How long idle workers spin (decode raises it: moetier.integrations.transformers.dense.DecodeThreads)
    is kept across set_threads; a negative value clamps to 0; forwards are unchanged by it. What it buys is
    measured, not asserted here (docs/benchmarks.md: a call after an idle gap 60 us parked, 5 us spinning)."""
    backend = make_backend(BEST, monkeypatch, threads=2)
    assert backend._kernel_pool.idle_spin_us == 50
    from moetier.formats import quantize

    packed = backend.pack_linear(quantize(torch.randn(64, 64), "fp32"))
    x = torch.randn(3, 64)
    want = backend.linear(packed, x)
    backend.set_idle_spin_us(3000)
    assert backend._kernel_pool.idle_spin_us == 3000
    backend.set_threads(2)
    assert backend._kernel_pool.idle_spin_us == 3000
    assert torch.equal(backend.linear(packed, x), want)
    backend.set_idle_spin_us(-5)
    assert backend._kernel_pool.idle_spin_us == 0
    assert torch.equal(backend.linear(packed, x), want)
