"""The backend conformance suite: generic cases that any backend, ours or a third party's, runs
against the float64 oracle (moetier.reference), with per-format tolerances (tolerances.py).

    from moetier.conformance import run_suite
    report = run_suite(["cpu.avx512"])          # or run_suite([MyBackend()])
    assert report.ok, report.summary()

Command line: `moetier conformance --backend NAME --report out.json`; pytest: `pytest --moetier-backend
NAME` on a test module that does `from moetier.conformance.testing import test_conformance`.
A run that executes zero cases is a failure.
"""
from .cases import SHAPES, Case, CaseFailure, build_cases
from .runner import CaseResult, ConformanceReport, run_backend, run_suite, runnable_backends
from .tolerances import TOLERANCES

__all__ = ["SHAPES", "Case", "CaseFailure", "build_cases", "CaseResult", "ConformanceReport",
           "run_backend", "run_suite", "runnable_backends", "TOLERANCES"]
