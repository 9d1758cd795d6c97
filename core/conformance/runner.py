"""Run the conformance cases on backends and report per backend and format."""
from __future__ import annotations

import json
import secrets
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

from ..errors import MoetierError
from ..formats import get_format
from ..experts import ExpertBackend
from ..reference import oracle as make_oracle
from .cases import Case, CaseFailure, Context, build_cases, dense_cases


@dataclass(frozen=True)
class CaseResult:
    backend: str
    case: str
    category: str
    fmt: str
    status: str  # passed | failed | skipped
    detail: str = ""
    rel_error: float | None = None
    seconds: float = 0.0


@dataclass
class ConformanceReport:
    seed: int
    results: list[CaseResult] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)  # backend -> why it could not run at all

    def summary(self) -> dict[str, dict[str, dict]]:
        """backend -> format -> {run, passed, failed, skipped, skip_reasons}."""
        out: dict[str, dict[str, dict]] = {}
        for r in self.results:
            s = out.setdefault(r.backend, {}).setdefault(
                r.fmt, {"run": 0, "passed": 0, "failed": 0, "skipped": 0, "skip_reasons": []})
            if r.status == "skipped":
                s["skipped"] += 1
                if r.detail not in s["skip_reasons"]:
                    s["skip_reasons"].append(r.detail)
            else:
                s["run"] += 1
                s[r.status] += 1
        return out

    @property
    def n_run(self) -> int:
        return sum(r.status != "skipped" for r in self.results)

    @property
    def n_failed(self) -> int:
        return sum(r.status == "failed" for r in self.results)

    @property
    def ok(self) -> bool:
        """Passed: at least one case ran, none failed, and no requested backend was unavailable."""
        return self.n_run > 0 and self.n_failed == 0 and not self.unavailable

    def to_dict(self) -> dict:
        return {"seed": self.seed, "ok": self.ok, "cases_run": self.n_run, "cases_failed": self.n_failed,
                "unavailable": self.unavailable, "summary": self.summary(),
                "results": [asdict(r) for r in self.results]}

    def save(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)


def run_case(backend_name: str, case: Case, ctx: Context) -> CaseResult:
    t0 = time.perf_counter()
    try:
        rel = case.run(ctx)
    except CaseFailure as exc:
        return CaseResult(backend_name, case.id, case.category, case.fmt, "failed", str(exc), None,
                          time.perf_counter() - t0)
    except Exception as exc:
        tb = traceback.format_exception_only(type(exc), exc)[-1].strip()
        return CaseResult(backend_name, case.id, case.category, case.fmt, "failed", f"unexpected error: {tb}", None,
                          time.perf_counter() - t0)
    return CaseResult(backend_name, case.id, case.category, case.fmt, "passed", "", rel, time.perf_counter() - t0)


def run_backend(backend: ExpertBackend, *, seed: int, formats: Iterable[str] | None = None,
                report: ConformanceReport, progress: Callable[[CaseResult], None] | None = None) -> None:
    """Every case for one backend instance (a third party can pass its own, unregistered backend)."""
    declared = tuple(backend.formats)
    wanted = tuple(formats) if formats else declared
    for fmt in wanted:
        if not backend.computes(fmt):
            report.results.append(CaseResult(backend.name, f"{fmt}/*", "format", fmt, "skipped",
                                             f"backend does not declare format {fmt}"))
    ctx = Context(backend, make_oracle(), seed)
    cases = build_cases(tuple(f for f in wanted if backend.computes(f)))
    if backend.device.type == "cpu":  # dense matrices are a CPU contract (moetier.dense)
        dense = tuple(f for f in backend.dense_formats if f in wanted and get_format(f).kind != "mixed")
        cases += dense_cases(dense, backend.grouped_dense)
    for case in cases:
        result = run_case(backend.name, case, ctx)
        report.results.append(result)
        if progress:
            progress(result)


def run_suite(backends: list[str | ExpertBackend], *, registry=None, inventory=None, seed: int | None = None,
              formats: Iterable[str] | None = None,
              progress: Callable[[CaseResult], None] | None = None) -> ConformanceReport:
    """Run the suite on backends given by name (built through the registry) or as instances. A named
    backend that cannot be built is recorded as unavailable (the run then fails) with the reason."""
    from ..hardware import load_inventory
    from ..plugins import get_registry

    seed = secrets.randbits(31) if seed is None else seed
    report = ConformanceReport(seed)
    for b in backends:
        if isinstance(b, ExpertBackend):
            run_backend(b, seed=seed, formats=formats, report=report, progress=progress)
            continue
        registry = registry or get_registry()
        inventory = inventory or load_inventory()
        try:
            instance = registry.backend(b).create(inventory)
        except MoetierError as exc:
            report.unavailable[b] = str(exc)
            continue
        run_backend(instance, seed=seed, formats=formats, report=report, progress=progress)
    return report


def runnable_backends(registry=None, inventory=None, device: str = "cpu") -> list[str]:
    """Names of every registered backend of `device` whose probe says it runs on this host."""
    from ..hardware import load_inventory
    from ..plugins import get_registry

    registry = registry or get_registry()
    inventory = inventory or load_inventory()
    return [n for n, s in sorted(registry.backends.items()) if s.device == device and s.safe_probe(inventory).usable]
