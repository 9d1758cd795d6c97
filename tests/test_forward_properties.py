"""Property-based test of the public forward API (prepare / forward / submit) of every CPU backend this
host runs: each random example is correct against the float64 reference or a typed error naming the
problem, never a crash, never NaN from finite inputs (tests/forward_properties.py says what is drawn and
the semantics it pins down).

Each backend runs in its own subprocess, which prints every example before running it: a segfault or an
abort is reported with the example that caused it and the command that replays it.
"""
from __future__ import annotations

import functools
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import forward_properties as fp
import numpy as np
import pytest
import torch
from moetier.backends.cpu_torch import TorchBackend
from moetier.errors import ExpertIdError, PreparedExpertsError, ShapeError
from moetier.experts import ExpertLayerSpec, ExpertWeights
from moetier.hardware import load_inventory
from moetier.plugins import load_registry
from moetier.reference import oracle

REGISTRY = load_registry(no_plugins=True)
INVENTORY = load_inventory()
CPU_BACKENDS = [n for n, s in sorted(REGISTRY.backends.items())
                if s.device == "cpu" and s.safe_probe(INVENTORY).usable]
WORKER = Path(fp.__file__)
# A few hundred examples per backend: 3-10 s each on two busy cores. The seed is fixed so that a failure
# reproduces; run the worker by hand with --seed N --examples M (--survey to list every failure) to explore.
EXAMPLES = 300
SEED = 0


# Pinned examples that fail today, by (backend, kernel variant), each a fault in the C++ kernels. Strict
# xfail: once the kernels are fixed the test fails until the entry is removed.
KNOWN_KERNEL_BUGS = {
    # u8 activation compensation with the fallback scale 1.0 for all-zero rows (the int8-dot paths).
    "zero-hidden-row-int4": {("cpu.avx512", "avx512_bf16")},
    "zero-gate-expert-int4": {("cpu.avx512", "avx512_bf16")},
    # vmin(g, limit) / vmax(u, -limit) return the limit for a NaN lane (min/max take the second operand).
    "swiglu-clamp-keeps-nan": {("cpu.avx2", "avx2"), ("cpu.avx512", "avx512_bf16")},
}


def run_worker(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          check=False)


def crash_report(proc: subprocess.CompletedProcess, backend: str) -> str | None:
    """For a worker that died of a signal: the signal, the example it was running and how to replay it."""
    if proc.returncode >= 0:
        return None
    try:
        sig = signal.Signals(-proc.returncode).name
    except ValueError:
        sig = f"signal {-proc.returncode}"
    examples = [line for line in proc.stdout.splitlines() if line.startswith("EXAMPLE ")]
    if not examples:
        return f"{backend}: the worker died of {sig} before its first example\n{proc.stderr[-3000:]}"
    ex = examples[-1].split(" ", 2)[2]
    return (f"{backend}: the worker died of {sig} while running\n  {ex}\n"
            f"replay: python {WORKER} --backend {backend} --replay \"{ex}\"\n{proc.stderr[-2000:]}")


@functools.cache
def worker(name: str) -> subprocess.CompletedProcess:
    """One worker run per backend: the pinned examples, then EXAMPLES random ones."""
    # cwd: hypothesis keeps a small cache in ./.hypothesis; keep it out of the checkout.
    with tempfile.TemporaryDirectory() as cwd:
        return run_worker([str(WORKER), "--backend", name, "--pinned", "--examples", str(EXAMPLES),
                           "--seed", str(SEED)], Path(cwd))


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_forward_properties(name):
    proc = worker(name)
    crash = crash_report(proc, name)
    assert crash is None, crash
    out = proc.stdout
    assert proc.returncode == 0, (out[-6000:] + proc.stderr[-3000:])
    summary = [line for line in out.splitlines() if line.startswith("RAN ")]
    assert summary, out[-3000:] + proc.stderr[-3000:]
    counts = {k: int(v) for k, v in (item.split("=") for item in summary[-1].split(": ", 1)[1].split())}
    # The property held on every example, and it was not vacuous: many compared numbers, some raised.
    assert sum(counts.values()) == EXAMPLES, summary
    assert counts.get("compared", 0) >= EXAMPLES // 4, summary
    assert counts.get("raised", 0) >= EXAMPLES // 20 and counts.get("prepare-raised", 0) >= 1, summary


@pytest.mark.parametrize("pin", list(fp.PINNED))
@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_pinned_example(name, pin):
    proc = worker(name)
    crash = crash_report(proc, name)
    assert crash is None, crash
    header = proc.stdout.split("\n", 1)[0].split()
    variant = header[header.index("variant") + 1] if "variant" in header else "?"
    lines = [line for line in proc.stdout.splitlines() if line.startswith(f"PINNED {pin} ")]
    assert lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    verdict = lines[0].split(" ", 2)[2]
    if verdict.startswith("skipped"):
        pytest.skip(f"{name}: {verdict}")
    known = (name, variant) in KNOWN_KERNEL_BUGS.get(pin, ())
    if known:
        assert verdict.startswith("FAIL"), (f"{pin} now passes on {name} ({variant}): remove it from "
                                            f"KNOWN_KERNEL_BUGS")
        pytest.xfail(f"known kernel fault on {name} ({variant}): {verdict}")
    assert verdict.startswith("ok"), f"{name} ({variant}) {pin}: {verdict}\n  {fp.PINNED[pin]!r}"


def test_crash_is_reported_with_its_example(tmp_path):
    """A worker killed by a signal is reported with the last example it printed and a replay command."""
    script = tmp_path / "dies.py"
    script.write_text("import os, sys\nprint('EXAMPLE 1 Example(a=1)', flush=True)\n"
                      "print('EXAMPLE 2 Example(a=2)', flush=True)\nos.abort()\n")
    proc = run_worker([str(script)], tmp_path)
    report = crash_report(proc, "cpu.x")
    assert report is not None and "SIGABRT" in report
    assert "Example(a=2)" in report and "Example(a=1)" not in report
    assert '--backend cpu.x --replay "Example(a=2)"' in report


# ---- the checker itself catches broken backends (so a passing run means something) ---------------------

example = fp.make_example


class _Mutant(TorchBackend):
    """cpu.torch with one deliberate fault in compute."""

    def __init__(self, fault: str, nan_policy: str = "raise"):
        super().__init__(nan_policy=nan_policy)
        self.fault = fault

    def compute(self, prepared, inputs):
        if self.fault == "dedup":  # a repeated id within a token counted once (k = 2 here)
            w = inputs.topk_weights.clone()
            w[:, 1][inputs.topk_ids[:, 1] == inputs.topk_ids[:, 0]] = 0
            inputs = type(inputs)(inputs.hidden, inputs.topk_ids, w, inputs.out_dtype)
        out = super().compute(prepared, inputs)
        if self.fault == "scale":
            return out * 1.1
        if self.fault == "swallow-nan":
            return torch.nan_to_num(out)
        if self.fault == "leak-nan":  # one NaN row poisons every row
            return out + out.sum(0, keepdim=True) * 0
        if self.fault == "not-zero":
            return out + 1e-12
        if self.fault == "untyped":
            raise ValueError("something broke")
        return out


@pytest.mark.parametrize("fault, ex, says", [
    ("dedup", example(), "relative error"),
    ("scale", example(), "relative error"),
    ("swallow-nan", example(nan_policy="propagate", hidden_specials=((1, 3, float("nan")),)), "non-finite rows"),
    ("leak-nan", example(nan_policy="propagate", hidden_specials=((1, 3, float("nan")),)), "non-finite rows"),
    ("not-zero", example(zero_rows=(2,)), "exactly zero"),
    ("untyped", example(), "raised ValueError"),
])
def test_checker_catches(fault, ex, says):
    backends = {p: _Mutant(fault, nan_policy=p) for p in ("raise", "propagate")}
    with pytest.raises(fp.PropertyFailure, match=says):
        fp.run_example(backends, ex)
    honest = {p: TorchBackend(nan_policy=p) for p in ("raise", "propagate")}
    fp.run_example(honest, ex)  # the same example passes on the unbroken backend


def test_checker_wants_the_predicted_error():
    ex = example(ids=((0, 1), (1, 5), (2, 0), (0, 0)))  # id 5 with 3 experts
    honest = {p: TorchBackend(nan_policy=p) for p in ("raise", "propagate")}
    assert fp.run_example(honest, ex).startswith("raised ExpertIdError")

    class Silent(TorchBackend):
        def validate(self, prepared, hidden, topk_ids, topk_weights, out_dtype):
            return super().validate(prepared, hidden, topk_ids.clamp(max=2), topk_weights, out_dtype)

    with pytest.raises(fp.PropertyFailure, match="no error raised"):
        fp.run_example({p: Silent(nan_policy=p) for p in ("raise", "propagate")}, ex)


# ---- regressions for what the property found in Python validation ------------------------------------

def _small():
    g = torch.Generator().manual_seed(1)
    layer = ExpertLayerSpec(4, 2, 16, 8)
    weights = ExpertWeights.from_float(torch.randn(4, 8, 16, generator=g), torch.randn(4, 8, 16, generator=g),
                                       torch.randn(4, 16, 8, generator=g), "bf16")
    return layer, weights, torch.randn(3, 16, generator=g), torch.tensor([[0, 1], [1, 2], [2, 3]]), torch.rand(3, 2)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("name", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["sparse_coo", "sparse_csr", "mkldnn"])
def test_non_dense_inputs_are_shape_errors(name, layout):
    """Sparse and oneDNN tensors were a RuntimeError (CSR has no is_contiguous) or NotImplementedError
    (oneDNN has no isfinite); a misleading "call .contiguous()" for COO."""
    layer, weights, hidden, ids, w = _small()
    backend = REGISTRY.backend(name).create(INVENTORY)
    prepared = backend.prepare(layer, weights, range(4), "bf16")
    convert = {"sparse_coo": lambda t: t.to_sparse(), "sparse_csr": lambda t: t.to_sparse_csr(),
               "mkldnn": lambda t: t.to_mkldnn() if t.is_floating_point() else t.to_sparse()}[layout]
    for i, arg in enumerate(("hidden", "topk_ids", "topk_weights")):
        args = [hidden, ids, w]
        args[i] = convert(args[i])
        with pytest.raises(ShapeError, match=f"{arg} must be a dense tensor.*to_dense"):
            backend.forward(prepared, *args)


def test_experts_of_another_backend_are_a_typed_error():
    layer, weights, hidden, ids, w = _small()
    backend = TorchBackend()
    foreign = oracle().prepare(layer, weights, range(4), "bf16")
    with pytest.raises(PreparedExpertsError, match="prepared by reference"):
        backend.forward(foreign, hidden, ids, w)
    with pytest.raises(TypeError):  # still a TypeError for callers written before the typed error
        backend.submit(foreign, hidden, ids, w)
    with pytest.raises(PreparedExpertsError, match="prepared by dict"):
        backend.forward({}, hidden, ids, w)


def test_prepare_refuses_non_integer_ids():
    """A float id was truncated (1.5 prepared expert 1)."""
    layer, weights, *_ = _small()
    with pytest.raises(ExpertIdError, match="1.5"):
        TorchBackend().prepare(layer, weights, [0, 1.5], "bf16")
    with pytest.raises(ExpertIdError, match="'2'"):
        TorchBackend().prepare(layer, weights, ["2"], "bf16")
    # Integers of any kind are fine: numpy, 0-d tensors.
    p = TorchBackend().prepare(layer, weights, [np.int64(1), torch.tensor(2)], "bf16")
    assert p.expert_ids == (1, 2)
