"""Timing: warm-up, repeated timed calls, medians; and the record one measurement becomes."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class TimingPlan:
    """How long to time one configuration: at least min_iters calls and min_seconds, at most max_iters
    or max_seconds (whichever ends first after the minimums)."""

    warmup: int
    min_iters: int
    max_iters: int
    min_seconds: float
    max_seconds: float


DECODE_PLAN = TimingPlan(warmup=10, min_iters=20, max_iters=400, min_seconds=1.0, max_seconds=3.0)
PREFILL_PLAN = TimingPlan(warmup=1, min_iters=3, max_iters=40, min_seconds=1.0, max_seconds=4.0)
QUICK_DECODE_PLAN = TimingPlan(warmup=3, min_iters=10, max_iters=200, min_seconds=0.3, max_seconds=0.6)
QUICK_PREFILL_PLAN = TimingPlan(warmup=1, min_iters=2, max_iters=20, min_seconds=0.3, max_seconds=1.0)
TINY_PLAN = TimingPlan(warmup=2, min_iters=5, max_iters=50, min_seconds=0.05, max_seconds=0.2)


def time_calls(call: Callable[[int], object], plan: TimingPlan) -> list[float]:
    """Call `call(i)` plan.warmup times untimed, then time each call; returns the per-call seconds.
    `i` counts every call, warm-up included, so the caller can rotate copies and routings with it."""
    i = 0
    for _ in range(plan.warmup):
        call(i)
        i += 1
    times: list[float] = []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        call(i)
        times.append(time.perf_counter() - t0)
        i += 1
        spent = time.perf_counter() - start
        enough = len(times) >= plan.min_iters and spent >= plan.min_seconds
        if enough or len(times) >= plan.max_iters or (len(times) >= plan.min_iters and spent >= plan.max_seconds):
            return times


def quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


@dataclass(frozen=True)
class Measurement:
    """One (shape, format, batch, threads, backend) timing.

    seconds is the median per-forward time; weight_bytes and flops are per forward (weight_bytes is
    the mean over the timed forwards of distinct experts touched x expert bytes in `format`), so
    tokens/s = batch / seconds, GB/s = weight_bytes / seconds / 1e9, GFLOP/s = flops / seconds / 1e9.
    """

    shape: str
    num_experts: int
    top_k: int
    hidden: int
    intermediate: int
    backend: str
    format: str
    batch: int
    threads: int
    seconds: float
    seconds_p10: float
    seconds_p90: float
    iterations: int
    copies: int
    weight_bytes: float
    flops: float
    check_relerr: float | None = None  # output vs the fp32 reference on the same weights (a few tokens)

    @property
    def tokens_per_s(self) -> float:
        return self.batch / self.seconds

    @property
    def gb_per_s(self) -> float:
        return self.weight_bytes / self.seconds / 1e9

    @property
    def gflop_per_s(self) -> float:
        return self.flops / self.seconds / 1e9

    def key(self) -> tuple:
        """What two implementations must share to be compared."""
        return (self.shape, self.num_experts, self.format, self.batch, self.threads)

    def to_record(self) -> dict:
        d = {f: getattr(self, f) for f in self.__dataclass_fields__}
        d.update(tokens_per_s=self.tokens_per_s, gb_per_s=self.gb_per_s, gflop_per_s=self.gflop_per_s)
        return d

    @classmethod
    def from_record(cls, d: dict) -> Measurement:
        return cls(**{f: d[f] for f in cls.__dataclass_fields__ if f in d})


def summarize(times: list[float], bytes_per_call: list[int]) -> tuple[float, float, float, float]:
    """(median s, p10 s, p90 s, mean bytes) of a timed series."""
    return (statistics.median(times), quantile(times, 0.1), quantile(times, 0.9),
            float(statistics.fmean(bytes_per_call)))
