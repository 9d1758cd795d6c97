"""`moetier bench kernels`: drive expert backends through the public contract on model-sized layers
and time them against the machine's limits and the torch baseline, all in one run.

For each shape and format, random weights are drawn once and prepared into several independent
copies (enough that a decode step never finds its weights in the L3, within the memory budget); each
timed forward uses the next copy and the next pre-drawn routing, so the weights stream from DRAM as they
do when a real model walks its layers.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ..errors import MoetierError
from ..experts import ExpertLayerSpec
from ..hardware.inventory import HardwareInventory
from ..plugins import Registry
from ..reference import DenseExpert, moe_forward
from . import baseline as torch_baseline
from .measure import (DECODE_PLAN, PREFILL_PLAN, QUICK_DECODE_PLAN, QUICK_PREFILL_PLAN, Measurement, TimingPlan,
                      summarize, time_calls)
from .probes import MachineLimits, measure_limits
from ..formats import computes
from .workload import (BENCH_FORMATS, GIB, BenchShape, distinct_experts, flops_per_forward, get_shape, plan_copies,
                       random_hidden, random_routing, random_weights, weights_seed)

DECODE_MAX_TOKENS = 16  # batches up to this are timed with the decode plan
ROUTING_SETS_DECODE = 32
ROUTING_SETS_PREFILL = 4


@dataclass(frozen=True)
class BenchConfig:
    shapes: tuple[str, ...] = ("qwen3-30b", "deepseek-v3")
    backends: tuple[str, ...] = ()
    formats: tuple[str, ...] | None = None  # None: every bench format the backend declares
    batches: tuple[int, ...] = (1, 4, 128, 512)
    threads: tuple[int, ...] = (1, 2)
    baseline: bool = True
    quick: bool = False
    max_weight_bytes: int = 3 * GIB  # all prepared copies of one (backend, format) together
    l3_bytes: int = 32 << 20
    seed: int = 0
    plans: tuple[TimingPlan, TimingPlan] | None = None  # (decode, prefill); None: by `quick`

    def plan_for(self, batch: int) -> TimingPlan:
        if self.plans is not None:
            decode, prefill = self.plans
        elif self.quick:
            decode, prefill = QUICK_DECODE_PLAN, QUICK_PREFILL_PLAN
        else:
            decode, prefill = DECODE_PLAN, PREFILL_PLAN
        return decode if batch <= DECODE_MAX_TOKENS else prefill


@dataclass
class BenchResult:
    limits: MachineLimits
    shapes: dict[str, BenchShape] = field(default_factory=dict)
    measurements: list[Measurement] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    load_average_start: list[float] | None = None  # 1/5/15-minute load averages when the run began


class Progress:
    """What the runner reports while it works; the CLI shows it with rich, tests pass nothing."""

    def start(self, total: int) -> None: ...
    def status(self, text: str) -> None: ...
    def advance(self, text: str) -> None: ...


def apply_threads(backend, threads: int) -> None:
    """Make `backend` compute on `threads` threads. torch's intra-op threads are set too, since input
    validation runs torch ops."""
    torch.set_num_threads(threads)
    backend.set_threads(threads)


@contextlib.contextmanager
def _torch_threads(n: int):
    """Run setup on `n` torch threads: on a small, shared machine torch's spinning intra-op threads make
    elementwise setup ops several times slower (the timed part sets its own thread count)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _load_average() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS (glibc keeps it otherwise), so the next
    layer's footprint is measured, and the machine's memory shared, correctly."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def formats_for(spec_formats: tuple[str, ...], wanted: tuple[str, ...] | None, *,
                mixed: bool = False) -> tuple[list[str], list[str]]:
    """(formats to run, formats skipped because the backend does not declare them)."""
    if wanted is None:
        return [f for f in BENCH_FORMATS if f in spec_formats], []
    # a mixed format (q4_k+q6_k) runs where the backend computes mixed formats and both its parts
    ok = [f for f in wanted if computes(spec_formats, f, mixed=mixed)]
    return ok, [f for f in wanted if f not in ok]


CHECK_TOKENS = 4


class _DequantizedOnDemand(Mapping):
    """expert id -> DenseExpert (fp32), dequantized when asked: the reference then holds one expert at a
    time instead of a whole model-sized layer in fp32."""

    def __init__(self, weights, num_experts: int):
        self._weights, self._n = weights, num_experts

    def __getitem__(self, e):
        if not 0 <= e < self._n:
            raise KeyError(e)
        return DenseExpert.from_tensors(self._weights.expert(e), torch.float32)

    def __iter__(self):
        return iter(range(self._n))

    def __len__(self):
        return self._n


def reference_relerr(layer: ExpertLayerSpec, weights, forward, seed: int, tokens: int = CHECK_TOKENS) -> float:
    """Relative L2 error of forward(hidden, topk_ids, topk_weights) against moetier's fp32 reference on
    the same weights, for a few tokens: a check that what is timed computes the right thing."""
    x = random_hidden(layer, tokens, seed)
    r = random_routing(layer, tokens, 1, seed + 1)[0]
    out = forward(x, r.topk_ids, r.topk_weights).float()
    ref = moe_forward(layer, _DequantizedOnDemand(weights, layer.num_experts), x, r.topk_ids, r.topk_weights,
                      torch.float32)
    return float((out - ref).norm() / ref.norm())


def make_inputs(shape: BenchShape, batches: tuple[int, ...], seed: int) -> dict[int, tuple[torch.Tensor, list]]:
    """Per batch: the bf16 hidden states and the pre-drawn routings, the same for every implementation."""
    out = {}
    for b in batches:
        sets = ROUTING_SETS_DECODE if b <= DECODE_MAX_TOKENS else ROUTING_SETS_PREFILL
        s = seed * 1_000_003 + b
        out[b] = (random_hidden(shape.layer, b, s), random_routing(shape.layer, b, sets, s + 1))
    return out


class KernelBench:
    def __init__(self, config: BenchConfig, inventory: HardwareInventory, registry: Registry,
                 progress: Progress | None = None, limits: MachineLimits | None = None):
        self.config = config
        self.inventory = inventory
        self.registry = registry
        self.progress = progress or Progress()
        self._limits = limits

    # ---- planning -------------------------------------------------------------------------------
    def _backends(self) -> list[tuple[str, object, list[str], list[str]]]:
        """(name, spec, formats to run, formats skipped) for every requested backend that can run here."""
        out = []
        for name in self.config.backends:
            spec = self.registry.backend(name)
            probe = spec.safe_probe(self.inventory)
            if not probe.usable:
                raise MoetierError(f"backend {name} cannot run here: {probe.reason}")
            fmts, skipped = formats_for(spec.formats, self.config.formats, mixed=spec.mixed_formats)
            out.append((name, spec, fmts, skipped))
        return out

    def count(self) -> int:
        c = self.config
        per_fmt = len(c.batches) * len(c.threads) * len(c.shapes)
        return sum(len(fmts) for _, _, fmts, _ in self._backends()) * per_fmt + (per_fmt if c.baseline else 0)

    # ---- running --------------------------------------------------------------------------------
    def run(self) -> BenchResult:
        c = self.config
        backends = self._backends()
        self.progress.start(self.count())
        result = BenchResult(self._limits or measure_limits(self.inventory, c.threads, quick=c.quick,
                                                            progress=self.progress.status))
        result.load_average_start = _load_average()
        for name, _, _, skipped in backends:
            for f in skipped:
                result.notes.append(f"{name} does not compute {f}: skipped")
        saved_threads = torch.get_num_threads()
        try:
            for shape_name in c.shapes:
                shape = get_shape(shape_name, c.max_weight_bytes)
                result.shapes[shape.name] = shape
                inputs = make_inputs(shape, c.batches, c.seed)
                wanted = {torch_baseline.FORMAT} if c.baseline else set()
                for _, _, fmts, _ in backends:
                    wanted.update(fmts)
                order = [f for f in BENCH_FORMATS if f in wanted] + sorted(wanted - set(BENCH_FORMATS))
                for fmt in order:  # one set of random weights per format, shared by every implementation
                    self.progress.status(f"{shape.name} {fmt}: random weights")
                    with _torch_threads(1):
                        weights = random_weights(shape.layer, fmt, weights_seed(c.seed, fmt))
                    if c.baseline and fmt == torch_baseline.FORMAT:
                        self._run_one(result, shape, inputs, weights, torch_baseline.NAME, None, fmt)
                    for name, spec, fmts, _ in backends:
                        if fmt in fmts:
                            self._run_one(result, shape, inputs, weights, name, spec, fmt)
                    del weights
                    release_memory()
                    self._sample_limits(result)
        finally:
            torch.set_num_threads(saved_threads)
        return result

    def _sample_limits(self, result: BenchResult) -> None:
        """Measure the limits again (short probes) and keep the best seen: on a shared machine one probe
        may coincide with someone else's burst, and the limit is what the machine can do. Sampled after
        every format, so the limits and the kernels see the same stretch of the run."""
        if self._limits is None:
            again = measure_limits(self.inventory, self.config.threads, quick=True, progress=self.progress.status)
            result.limits = result.limits.best_of(again)

    def _run_one(self, result: BenchResult, shape: BenchShape, inputs, weights, name: str, spec, fmt: str) -> None:
        c = self.config
        layer = shape.layer
        label = f"{shape.name} {name} {fmt}"
        try:
            if spec is None:
                backend = torch_baseline.TorchLoopBaseline()
            else:  # pack on every thread the run uses
                backend = spec.create(self.inventory, threads=max(c.threads))
            with _torch_threads(1):
                prepared, copies = self._prepare_copies(backend, spec is None, layer, weights, fmt, label)
        except MoetierError as exc:
            result.notes.append(f"{label}: not measured: {type(exc).__name__}: {exc}")
            for _ in range(len(c.batches) * len(c.threads)):
                self.progress.advance(f"{label} skipped")
            return
        relerr = forward = None
        for t in c.threads:
            apply_threads(backend, t)
            forward = backend.forward
            if relerr is None:
                self.progress.status(f"{label}: checking the output against the reference")
                relerr = reference_relerr(layer, weights, lambda x, i, w, _f=forward, _p=prepared[0]: _f(_p, x, i, w),
                                          c.seed + 17)
            for b in c.batches:
                hidden, routings = inputs[b]
                n_r = len(routings)
                text = f"{label} batch {b} threads {t}"
                self.progress.status(text + " (timing)")

                def call(i, _p=prepared, _h=hidden, _r=routings, _f=forward):
                    r = _r[i % n_r]
                    return _f(_p[i % copies], _h, r.topk_ids, r.topk_weights)

                base = c.plan_for(b)
                plan = dataclasses.replace(base, warmup=max(base.warmup, copies))  # warm every copy
                try:
                    times = time_calls(call, plan)
                except MoetierError as exc:
                    result.notes.append(f"{text}: failed: {type(exc).__name__}: {exc}")
                    self.progress.advance(text)
                    continue
                first = plan.warmup
                nbytes = [distinct_experts(routings[(first + j) % n_r].topk_ids) * layer.expert_bytes(fmt)
                          for j in range(len(times))]
                med, p10, p90, mean_bytes = summarize(times, nbytes)
                result.measurements.append(Measurement(
                    shape.name, layer.num_experts, layer.top_k, layer.hidden_size, layer.intermediate_size,
                    name, fmt, b, t, med, p10, p90, len(times), copies, mean_bytes,
                    float(flops_per_forward(layer, b)), relerr))
                self.progress.advance(text)
        del prepared, backend, forward
        release_memory()

    def _prepare_copies(self, backend, is_baseline: bool, layer: ExpertLayerSpec, weights, fmt: str, label: str):
        c = self.config
        nominal = layer.num_experts * layer.expert_bytes(fmt)

        def prepare():
            if is_baseline:
                return backend.prepare(layer, weights)
            return backend.prepare(layer, weights, range(layer.num_experts), fmt)

        self.progress.status(f"{label}: prepare copy 1")
        rss0 = _rss_bytes()
        first = prepare()
        rss1 = _rss_bytes()
        footprint = max(nominal, (rss1 - rss0) if rss0 is not None and rss1 is not None else 0)
        step = layer.top_k * layer.expert_bytes(fmt)  # a batch-1 step: the fewest bytes, the worst case
        copies = plan_copies(layer, footprint, step, c.max_weight_bytes, c.l3_bytes)
        prepared = [first]
        for k in range(1, copies):
            self.progress.status(f"{label}: prepare copy {k + 1}/{copies}")
            prepared.append(prepare())
        return prepared, copies


def run_kernel_bench(config: BenchConfig, inventory: HardwareInventory, registry: Registry,
                     progress: Progress | None = None, limits: MachineLimits | None = None) -> BenchResult:
    return KernelBench(config, inventory, registry, progress, limits).run()

