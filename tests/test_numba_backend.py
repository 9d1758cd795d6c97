"""cpu.numba against the float64 reference: every format, odd shapes, held subsets, bf16 in/out, swiglu_oai,
concurrent callers, and the plugin's behaviour without numba.

Error bound used throughout (unless a test says otherwise): the kernel decodes every format exactly (bf16,
fp16 and fp8 codes are exact in fp32; int codes times an fp32 scale round once, 2^-24) and computes in
fp32 without rounding activations, so against the float64 oracle on the same dequantized weights the
only error is fp32 rounding in dot products of length <= 200: ~sqrt(200) * 2^-24 ~ 1e-6 relative, plus
fp32 exp in the activation (~1e-7). 1e-5 is a 10x margin, still four orders below what a wrong scale,
group or expert produces (>= 1e-1).
"""
from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from moetier import ExpertLayerSpec, ExpertWeights, FORMATS
from moetier.errors import SettingError
from moetier.reference import oracle

pytest.importorskip("numba")
from moetier.backends.cpu_numba import NumbaBackend, _probe  # noqa: E402

FP32_BOUND = 1e-5
# bf16 output rounds each element once more: relative 2^-9 ~ 2e-3 per element, at most that in the norm.
BF16_OUT_BOUND = 4e-3


@pytest.fixture(scope="module")
def backend():
    return NumbaBackend(num_threads=2)


@pytest.fixture(scope="module")
def ref():
    return oracle()


def rel_err(out, expected):
    return float((out.double() - expected).norm() / expected.norm())


def make_weights(E, H, I, fmt, g, *, scale=1.0, biases=False):
    gate = torch.randn(E, I, H, generator=g) * scale / H ** 0.5
    up = torch.randn(E, I, H, generator=g) * scale / H ** 0.5
    down = torch.randn(E, H, I, generator=g) / I ** 0.5
    b = None
    if biases:
        b = (torch.randn(E, I, generator=g), torch.randn(E, I, generator=g), torch.randn(E, H, generator=g))
    return ExpertWeights.from_float(gate, up, down, fmt, biases=b)


def routing(g, T, E, k):
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    return ids, torch.softmax(torch.randn(T, k, generator=g), dim=-1)


def fresh_generator():
    g = torch.Generator()
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    g.manual_seed(seed)
    return g, seed


def compare(backend, ref, layer, weights, held, fmt, hidden, ids, w, out_dtype=torch.float32):
    p = backend.prepare(layer, weights, held, fmt)
    out = backend.forward(p, hidden, ids, w, out_dtype=out_dtype)
    expected = ref.forward(ref.prepare(layer, weights, held, fmt), hidden, ids, w).double()
    assert out.dtype == out_dtype and out.shape == expected.shape
    return out, expected


# T=1 takes the one-token path (dot straight from packed bytes), T=13 the decoded-row path with four-token
# passes and a remainder, for every format; (130, 200) has partial 128-blocks and groups in both matrices.
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("H,I", [(50, 37), (130, 200)])
@pytest.mark.parametrize("T", [1, 13])
def test_every_format_matches_float64_reference(backend, ref, fmt, H, I, T):
    m = FORMATS[fmt].block_size or 1  # block formats (GGUF, mxfp4) hold whole blocks: round up to them
    H, I = -(-H // m) * m, -(-I // m) * m
    g, seed = fresh_generator()
    E, k = 5, 3
    layer = ExpertLayerSpec(E, k, H, I)
    weights = make_weights(E, H, I, fmt, g)
    hidden = torch.randn(T, H, generator=g)
    ids, w = routing(g, T, E, k)
    out, expected = compare(backend, ref, layer, weights, range(E), fmt, hidden, ids, w)
    assert rel_err(out, expected) < FP32_BOUND, f"seed {seed}"


@pytest.mark.parametrize("fmt", ["bf16", "int4_g32", "fp8_e4m3"])
def test_many_tokens_on_one_expert(backend, ref, fmt):
    # 42 pairs on one expert: ten four-token passes and a remainder of two, both phases.
    g, seed = fresh_generator()
    E, H, I = 3, 64, 40
    layer = ExpertLayerSpec(E, 1, H, I)
    weights = make_weights(E, H, I, fmt, g)
    hidden = torch.randn(42, H, generator=g)
    ids = torch.full((42, 1), 1, dtype=torch.int64)
    w = torch.rand(42, 1, generator=g) + 0.5
    out, expected = compare(backend, ref, layer, weights, range(E), fmt, hidden, ids, w)
    assert rel_err(out, expected) < FP32_BOUND, f"seed {seed}"


def test_holding_no_expert_gives_zeros(backend):
    layer = ExpertLayerSpec(4, 2, 16, 8)
    weights = make_weights(4, 16, 8, "int8", torch.Generator().manual_seed(0))
    p = backend.prepare(layer, weights, [], "int8")
    out = backend.submit(p, torch.randn(3, 16), torch.tensor([[0, 1], [2, 3], [1, 2]]), torch.rand(3, 2)).wait(60)
    assert torch.equal(out, torch.zeros(3, 16))


def test_held_subset_others_contribute_nothing(backend, ref):
    g, seed = fresh_generator()
    E, k, H, I, T = 8, 2, 48, 24, 20
    layer = ExpertLayerSpec(E, k, H, I)
    weights = make_weights(E, H, I, "int8", g)
    held = (1, 4, 6)
    hidden = torch.randn(T, H, generator=g)
    ids, w = routing(g, T, E, k)
    ids[0] = torch.tensor([0, 2])  # token 0 routes only to experts this backend does not hold
    ids[1] = torch.tensor([4, 7])  # token 1 to one held and one not
    out, expected = compare(backend, ref, layer, weights, held, "int8", hidden, ids, w)
    assert torch.equal(out[0], torch.zeros(H)), "an unheld expert contributed"
    assert rel_err(out, expected) < FP32_BOUND, f"seed {seed}"
    # and the held part is exactly what one-expert-at-a-time preparation gives summed up
    parts = sum(backend.forward(backend.prepare(layer, weights, [e], "int8"), hidden, ids, w).double() for e in held)
    assert rel_err(out, parts) < FP32_BOUND


@pytest.mark.parametrize("fmt", ["bf16", "int4_g64"])
def test_bf16_hidden_and_output(backend, ref, fmt):
    g, seed = fresh_generator()
    E, k, H, I, T = 6, 2, 50, 37, 9
    layer = ExpertLayerSpec(E, k, H, I)
    weights = make_weights(E, H, I, fmt, g)
    hidden = torch.randn(T, H, generator=g).to(torch.bfloat16)
    ids, w = routing(g, T, E, k)
    out, expected = compare(backend, ref, layer, weights, range(E), fmt, hidden, ids, w, out_dtype=torch.bfloat16)
    assert rel_err(out, expected) < BF16_OUT_BOUND, f"seed {seed}"
    out32 = backend.forward(backend.prepare(layer, weights, range(E), fmt), hidden, ids, w)
    assert rel_err(out32, expected) < FP32_BOUND, f"seed {seed}: bf16 input must be used exactly"


@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("T", [1, 11])
def test_swiglu_oai(backend, ref, has_bias, T):
    g, seed = fresh_generator()
    E, k, H, I = 4, 2, 40, 30
    layer = ExpertLayerSpec(E, k, H, I, activation="swiglu_oai", swiglu_alpha=1.702, swiglu_limit=2.0,
                            has_bias=has_bias)
    # weights scaled so pre-activations (std ~3) cross the limit of 2 on both sides: the clamps are exercised
    weights = make_weights(E, H, I, "bf16", g, scale=3.0, biases=has_bias)
    hidden = torch.randn(T, H, generator=g)
    ids, w = routing(g, T, E, k)
    gate0 = weights.expert(int(ids[0, 0])).gate.dequantize()
    assert (hidden[0] @ gate0.T).abs().max() > layer.swiglu_limit
    out, expected = compare(backend, ref, layer, weights, range(E), "bf16", hidden, ids, w)
    assert rel_err(out, expected) < FP32_BOUND, f"seed {seed}"


def test_two_threads_at_once(backend, ref):
    g, seed = fresh_generator()
    E, k, H, I = 8, 3, 64, 48
    layer = ExpertLayerSpec(E, k, H, I)
    weights = make_weights(E, H, I, "int4_g32", g)
    p = backend.prepare(layer, weights, range(E), "int4_g32")
    pr = ref.prepare(layer, weights, range(E), "int4_g32")
    jobs = []
    for T in (1, 37):
        hidden = torch.randn(T, H, generator=g)
        ids, w = routing(g, T, E, k)
        jobs.append((hidden, ids, w, ref.forward(pr, hidden, ids, w).double()))
    errors = []

    def work(hidden, ids, w, expected):
        try:
            for _ in range(20):
                err = rel_err(backend.forward(p, hidden, ids, w), expected)
                if not err < FP32_BOUND:
                    errors.append(err)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, f"seed {seed}: {errors[:3]}"
    # submit returns before wait; both pending calls give their own answers
    pending = [backend.submit(p, hidden, ids, w) for hidden, ids, w, _ in jobs]
    for pend, (_, _, _, expected) in zip(pending, jobs):
        assert rel_err(pend.wait(60), expected) < FP32_BOUND


def test_long_inputs_run_in_token_chunks(backend, ref, monkeypatch):
    import moetier.backends.cpu_numba as mod

    monkeypatch.setattr(mod, "TOKENS_PER_LAUNCH", 7)  # 30 tokens -> chunks of 7, 7, 7, 7, 2
    g, seed = fresh_generator()
    E, k, H, I, T = 5, 2, 40, 24, 30
    layer = ExpertLayerSpec(E, k, H, I)
    weights = make_weights(E, H, I, "int4_g32", g)
    hidden = torch.randn(T, H, generator=g)
    ids, w = routing(g, T, E, k)
    out, expected = compare(backend, ref, layer, weights, range(E), "int4_g32", hidden, ids, w)
    assert rel_err(out, expected) < FP32_BOUND, f"seed {seed}"


def test_result_does_not_depend_on_thread_count(ref):
    g, _ = fresh_generator()
    E, k, H, I, T = 6, 2, 96, 70, 9
    layer = ExpertLayerSpec(E, k, H, I)
    weights = make_weights(E, H, I, "fp8_e4m3", g)
    hidden = torch.randn(T, H, generator=g)
    ids, w = routing(g, T, E, k)
    outs = []
    for n in (1, 2):
        b = NumbaBackend(num_threads=n)
        outs.append(b.forward(b.prepare(layer, weights, range(E), "fp8_e4m3"), hidden, ids, w))
    assert torch.equal(outs[0], outs[1]), "each output element must be accumulated in a fixed order"


def test_nan_propagates_only_where_it_belongs():
    g, _ = fresh_generator()
    E, k, H, I, T = 4, 2, 32, 16, 3
    layer = ExpertLayerSpec(E, k, H, I)
    weights = make_weights(E, H, I, "bf16", g)
    b = NumbaBackend(nan_policy="propagate")
    hidden = torch.randn(T, H, generator=g)
    hidden[1, 5] = float("nan")
    ids, w = routing(g, T, E, k)
    out = b.forward(b.prepare(layer, weights, range(E), "bf16"), hidden, ids, w)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2]]).all()


def test_decoders_are_exact_for_every_code():
    # Every fp16, bf16 and fp8 e4m3 bit pattern (NaN, inf and subnormals included) decodes as torch does.
    from moetier.backends import numba_kernels as k

    def decode(kind, u8, u16, n):
        buf = np.zeros(n + k.SCRATCH_ALIGN, np.float32)
        z8, z16 = np.zeros((1, 1, 1), np.uint8), np.zeros((1, 1, 1), np.uint16)
        k.decode_row(kind, 128, n, 0, 0, u8 if u8 is not None else z8, u16 if u16 is not None else z16,
                     np.zeros((1, 1, 1), np.int8), np.zeros((1, 1, 1), np.float32),
                     np.ones((1, 1, -(-n // 128)), np.float32), buf, buf.view(np.uint32))
        return buf[:n]

    halves = np.arange(65536, dtype=np.uint16)
    want16 = torch.from_numpy(halves.view(np.int16)).view(torch.float16).float().numpy()
    np.testing.assert_array_equal(decode(k.KIND_FP16, None, halves.reshape(1, 1, -1), 65536), want16)
    want_bf = torch.from_numpy(halves.view(np.int16)).view(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(decode(k.KIND_BF16, None, halves.reshape(1, 1, -1), 65536), want_bf)
    codes = np.arange(256, dtype=np.uint8)
    want8 = torch.from_numpy(codes).view(torch.float8_e4m3fn).float().numpy()
    np.testing.assert_array_equal(decode(k.KIND_FP8, codes.reshape(1, 1, -1), None, 256), want8)


def test_probe_and_registration():
    import numba

    from moetier.plugins import load_registry

    p = _probe(None)
    assert p.score == 20 and numba.__version__ in p.reason
    spec = load_registry(no_plugins=True).backend("cpu.numba")
    assert spec.device == "cpu" and set(spec.formats) == set(FORMATS)
    with pytest.raises(SettingError, match="threads"):
        NumbaBackend(num_threads=0)
    # the plugin's numba-free format table agrees with the kernels' kind codes
    from moetier.backends import cpu_numba, numba_kernels as k
    kinds = {"fp32": k.KIND_FP32, "bf16": k.KIND_BF16, "fp16": k.KIND_FP16, "int8": k.KIND_INT8,
             "int4_g32": k.KIND_INT4, "int4_g64": k.KIND_INT4, "int4_g128": k.KIND_INT4, "fp8_e4m3": k.KIND_FP8,
             "q8_0": k.KIND_Q8_0, "q4_0": k.KIND_Q4_0, "q4_k": k.KIND_Q4_K, "q5_k": k.KIND_Q5_K, "q6_k": k.KIND_Q6_K,
             "mxfp4": k.KIND_MXFP4, "q4_1": k.KIND_Q4_1, "q5_0": k.KIND_Q5_0, "q5_1": k.KIND_Q5_1,
             "iq4_nl": k.KIND_IQ4_NL, "iq4_xs": k.KIND_IQ4_XS, "q2_k": k.KIND_Q2_K, "q3_k": k.KIND_Q3_K}
    assert cpu_numba._KINDS == kinds


def test_plugin_imports_and_probes_without_numba():
    # A host without the optional extra: the module imports, the probe says why it cannot run.
    code = ("import sys; sys.modules['numba'] = None\n"
            "import moetier.backends.cpu_numba as m\n"
            "p = m._probe(None); print(p.score, p.reason)\n"
            "try:\n    m.NumbaBackend()\nexcept Exception as e:\n    print(type(e).__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.strip().splitlines()
    assert first.startswith("0 numba not importable: ")
    assert second == "BackendUnavailable"


def test_two_threads_on_the_workqueue_layer():
    # numba's fallback threading layer (no OpenMP/TBB on the host) aborts on concurrent launches unless
    # the backend serialises them: run the concurrent case under it in a fresh process.
    code = """
import threading, torch
from moetier import ExpertLayerSpec, ExpertWeights
from moetier.backends.cpu_numba import NumbaBackend
from moetier.reference import oracle
E, k, H, I = 6, 2, 40, 24
layer = ExpertLayerSpec(E, k, H, I)
W = ExpertWeights.from_float(torch.randn(E, I, H), torch.randn(E, I, H), torch.randn(E, H, I), "bf16")
b, o = NumbaBackend(num_threads=2), oracle()
p, po = b.prepare(layer, W, range(E), "bf16"), o.prepare(layer, W, range(E), "bf16")
# the very first call launches no kernel (nothing routed to the held expert): must not trip the layer check
first = b.forward(b.prepare(layer, W, [0], "bf16"), torch.randn(2, H), torch.tensor([[1, 2], [3, 4]]), torch.rand(2, 2))
assert torch.equal(first, torch.zeros(2, H))
jobs = []
for T in (1, 25):
    x, ids = torch.randn(T, H), torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    w = torch.rand(T, k)
    jobs.append((x, ids, w, o.forward(po, x, ids, w).double()))
bad = []
def work(x, ids, w, ref):
    for _ in range(30):
        y = b.forward(p, x, ids, w).double()
        bad.append(float((y - ref).norm() / ref.norm()) > 1e-5)
ts = [threading.Thread(target=work, args=j) for j in jobs]
[t.start() for t in ts]; [t.join() for t in ts]
import numba
print(numba.threading_layer(), sum(bad), len(bad))
"""
    import os
    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["workqueue", "0", "60"]
