"""The conformance suite: it passes on every backend this host runs, and it catches broken backends."""
import dataclasses
import subprocess
import sys

import pytest
import torch

from moetier import FORMATS
from moetier.conformance import run_suite, runnable_backends
from moetier.reference import DenseExpert, ReferenceBackend, moe_forward

RUNNABLE = runnable_backends()


def test_cpu_torch_runs_hundreds_of_cases():
    report = run_suite(["cpu.torch"])
    summary = report.summary()["cpu.torch"]
    assert report.ok, [r for r in report.results if r.status == "failed"][:5]
    assert report.n_run >= 400
    assert set(summary) == set(FORMATS)  # every format the core defines, block formats included


@pytest.mark.parametrize("name", [n for n in RUNNABLE if n != "cpu.torch"])
def test_every_runnable_backend_conforms(name):
    report = run_suite([name])
    failed = [f"{r.case}: {r.detail}" for r in report.results if r.status == "failed"]
    assert not failed, failed[:10]
    assert report.ok and report.n_run >= 50 * len(report.summary()[name])


def test_zero_cases_is_a_failure():
    class NoFormats(ReferenceBackend):
        name = "test.noformats"
        formats = ()

    report = run_suite([NoFormats()])
    assert report.n_run == 0 and not report.ok
    assert not run_suite([]).ok


def test_unavailable_backend_fails_the_run():
    report = run_suite(["cpu.amx"] if "cpu.amx" not in RUNNABLE else ["cpu.nope"])
    assert not report.ok and report.unavailable


class _Broken(ReferenceBackend):
    formats = ("fp32", "int8")


class ComputesUnheldExperts(_Broken):
    """Keeps every expert and ignores which ones it was asked to hold."""

    name = "test.unheld"

    def prepare(self, layer, weights, experts, fmt):
        p = super().prepare(layer, weights, range(layer.num_experts), fmt)
        p.expert_ids = tuple(experts)
        return p


class DropsLastSlot(_Broken):
    name = "test.dropslot"

    def compute(self, prepared, inputs):
        ids, w = inputs.topk_ids, inputs.topk_weights.clone()
        if ids.shape[1] > 1:
            w[:, -1] = 0
        return moe_forward(prepared.layer, prepared.payload, inputs.hidden, ids, w, torch.float32).to(inputs.out_dtype)


class IgnoresInt8Scales(_Broken):
    name = "test.noscale"

    def pack(self, layer, fmt, experts):
        if fmt.name != "int8":
            return super().pack(layer, fmt, experts)
        return {e: DenseExpert(t.gate.data.float() / 127, t.up.data.float() / 127, t.down.data.float() / 127)
                for e, t in experts.items()}


class NoValidation(_Broken):
    name = "test.novalidation"

    def validate(self, prepared, hidden, topk_ids, topk_weights, out_dtype):
        from moetier.experts import ForwardInputs
        return ForwardInputs(hidden, topk_ids.long(), topk_weights.float(), out_dtype)


class DenseIgnoresBias(_Broken):
    name = "test.densebias"

    def compute_dense(self, packed, x, out_dtype):
        w, _ = packed.payload
        return super().compute_dense(dataclasses.replace(packed, payload=(w, None)), x, out_dtype)


class GroupedAsOneBlock(_Broken):
    """Multiplies every row of a block-diagonal matrix with the first block's inputs."""

    name = "test.groupedblock"

    def compute_dense(self, packed, x, out_dtype):
        if packed.groups == 1:
            return super().compute_dense(packed, x, out_dtype)
        w, b = packed.payload
        y = x[:, : w.shape[1]].to(self.precision) @ w.T
        return (y if b is None else y + b).to(out_dtype)


@pytest.mark.parametrize("backend,category", [
    (ComputesUnheldExperts(), "subset"), (DropsLastSlot(), "shapes"), (IgnoresInt8Scales(), "shapes"),
    (NoValidation(), "bad-input"), (DenseIgnoresBias(), "dense"), (GroupedAsOneBlock(), "dense"),
])
def test_the_suite_catches_broken_backends(backend, category):
    report = run_suite([backend])
    failed = {r.category for r in report.results if r.status == "failed"}
    assert not report.ok and category in failed


def test_pytest_plugin_runs_the_cases(tmp_path):
    test_file = tmp_path / "test_my_backend.py"
    test_file.write_text("from moetier.conformance.testing import test_conformance  # noqa: F401\n")
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_file), "--rootdir", str(tmp_path)]
    ok = subprocess.run(args + ["--moetier-backend", "cpu.torch", "-k", "fp32 and tiny"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout[-2000:]
    assert " passed" in ok.stdout and "4 passed" in ok.stdout  # T = 0, 1, 3, 130 on the tiny shape
    bad = subprocess.run(args + ["--moetier-backend", "cpu.nope"], capture_output=True, text=True)
    assert bad.returncode != 0 and "cpu.nope" in bad.stdout + bad.stderr
