"""The machine's limits, measured in the same run as the kernels they judge.

- read bandwidth: a STREAM-like read of an array far larger than the last-level cache, each thread
  reading its own slice (first-touched by that thread), GB/s = 1e9 bytes/s, median of the repeats;
- vector peaks: register-only loops of `vdpbf16ps` (bf16 FLOP/s) and `vpdpbusd` (int8 OP/s) on 512-bit
  registers, the instructions the expert kernels' prefill paths are built on.

The C++ module `moetier.bench._probes` is built for baseline x86-64, so it imports everywhere; a wide
probe runs only when the inventory says the CPU has the feature (and the module checks again).
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field

from ..errors import KernelVariantError, MoetierError
from ..hardware.inventory import HardwareInventory

# Read-probe array: many times any last-level cache (the L3 here is 32 MiB), so every byte comes from DRAM.
DEFAULT_READ_BYTES = 1 << 30
QUICK_READ_BYTES = 256 << 20

# The peak each weight format's prefill path is judged against: float formats compute in bf16
# (vdpbf16ps), integer formats with quantized activations in int8 (vpdpbusd).
# GGUF blocks are integer codes whose dot products run on int8 activations (as llama.cpp's and moetier's
# kernels do); so do MXFP4's e2m1 values (twice each is an integer, -12..12, on moetier's vpdpbusd path).
PEAK_KIND = {"float": "bf16", "fp8": "bf16", "int8": "int8", "int4": "int8", "gguf": "int8", "mxfp4": "int8"}


def _module():
    try:
        from . import _probes
    except ImportError as exc:
        raise MoetierError(f"the bench probe module moetier.bench._probes is not built ({exc}); "
                           "build the extensions with `python setup.py build_ext --inplace`") from None
    return _probes


def read_isa(inventory: HardwareInventory) -> str:
    """The widest read loop both the inventory's CPU and the CPU running this process run (wider loads need
    fewer instructions per byte; DRAM is the limit). The probe measures this machine: a recorded inventory
    of a wider CPU must not pick a loop this one cannot execute."""
    from ..hardware.detect import host_cpu

    cpus = (inventory.cpu, host_cpu())
    for cpu in cpus:
        if not cpu.is_x86:
            raise KernelVariantError(f"the bench probes are x86-only; this CPU is {cpu.arch}")
    for isa, feature in (("avx512", "avx512f"), ("avx2", "avx2")):
        if all(cpu.has(feature) for cpu in cpus):
            return isa
    return "sse2"


def read_bandwidth(inventory: HardwareInventory, threads: int, nbytes: int = DEFAULT_READ_BYTES,
                   repeats: int = 7) -> tuple[float, ...]:
    """GB/s of each repeat of a `threads`-thread read of `nbytes` (the first repeat is a warm-up, dropped)."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if nbytes < (1 << 20):
        raise ValueError(f"nbytes must be at least 1 MiB, got {nbytes}")
    rates = _module().read_bandwidth(int(nbytes), int(threads), int(repeats) + 1, read_isa(inventory))
    return tuple(rates[1:])


def bf16_peak(inventory: HardwareInventory, threads: int, seconds: float = 0.25) -> float:
    """vdpbf16ps FLOP/s on `threads` threads; KernelVariantError when the CPU lacks avx512_bf16."""
    missing = inventory.cpu.missing("avx512f", "avx512_bf16")
    if missing:
        raise KernelVariantError(f"bf16 peak probe needs {', '.join(missing)}")
    return float(_call(_module().bf16_peak, threads, seconds)["ops_per_s"])


def int8_peak(inventory: HardwareInventory, threads: int, seconds: float = 0.25) -> float:
    """vpdpbusd int8 OP/s on `threads` threads; KernelVariantError when the CPU lacks avx512_vnni."""
    missing = inventory.cpu.missing("avx512f", "avx512_vnni")
    if missing:
        raise KernelVariantError(f"int8 peak probe needs {', '.join(missing)}")
    return float(_call(_module().int8_peak, threads, seconds)["ops_per_s"])


def _call(fn, threads: int, seconds: float) -> dict:
    try:
        return fn(int(threads), float(seconds))
    except ValueError as exc:  # the module's own feature check: the inventory described another CPU
        raise KernelVariantError(str(exc)) from None


@dataclass(frozen=True)
class MachineLimits:
    """Per thread count: read GB/s (median of repeats) and the bf16 / int8 peaks in GFLOP/s (GOP/s).
    A peak is None when the CPU lacks the instruction; `notes` says why."""

    read_gb_per_s: dict[int, float]
    read_gb_per_s_best: dict[int, float]
    bf16_gflop_per_s: dict[int, float | None]
    int8_gop_per_s: dict[int, float | None]
    read_bytes: int
    read_isa: str
    notes: tuple[str, ...] = field(default=())

    def peak_for(self, fmt_kind: str, threads: int) -> tuple[str, float | None]:
        """(peak kind, GFLOP/s) a format of `fmt_kind` is judged against at `threads`."""
        kind = PEAK_KIND[fmt_kind]
        table = self.bf16_gflop_per_s if kind == "bf16" else self.int8_gop_per_s
        return kind, table.get(threads)

    def best_of(self, other: MachineLimits) -> MachineLimits:
        """Per thread count, the higher of two measurements of each limit: on a shared machine a limit
        measured once may coincide with someone else's burst, and the limit is what the machine can do."""
        def mx(a: dict, b: dict) -> dict:
            return {k: max((v for v in (a.get(k), b.get(k)) if v is not None), default=None) for k in a.keys() | b.keys()}

        return MachineLimits(mx(self.read_gb_per_s, other.read_gb_per_s),
                             mx(self.read_gb_per_s_best, other.read_gb_per_s_best),
                             mx(self.bf16_gflop_per_s, other.bf16_gflop_per_s),
                             mx(self.int8_gop_per_s, other.int8_gop_per_s), self.read_bytes, self.read_isa,
                             tuple(dict.fromkeys(self.notes + other.notes)))

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("read_gb_per_s", "read_gb_per_s_best", "bf16_gflop_per_s", "int8_gop_per_s"):
            d[key] = {str(k): v for k, v in d[key].items()}
        d["notes"] = list(self.notes)
        return d


def measure_limits(inventory: HardwareInventory, threads: tuple[int, ...], *, quick: bool = False,
                   progress=None) -> MachineLimits:
    """Measure read bandwidth and both peaks for every thread count (about 1-2 s each, 0.5 s when quick)."""
    nbytes = QUICK_READ_BYTES if quick else DEFAULT_READ_BYTES
    repeats = 3 if quick else 7
    seconds = 0.1 if quick else 0.25
    read, best, bf16, int8, notes = {}, {}, {}, {}, []
    for t in threads:
        if progress:
            progress(f"read bandwidth, {t} thread(s)")
        rates = read_bandwidth(inventory, t, nbytes, repeats)
        read[t], best[t] = statistics.median(rates), max(rates)
        for name, fn, table in (("bf16", bf16_peak, bf16), ("int8", int8_peak, int8)):
            if progress:
                progress(f"{name} peak, {t} thread(s)")
            try:
                table[t] = fn(inventory, t, seconds) / 1e9
            except KernelVariantError as exc:
                table[t] = None
                note = f"{name} peak not measured: {exc}"
                if note not in notes:
                    notes.append(note)
    return MachineLimits(read, best, bf16, int8, nbytes, read_isa(inventory), tuple(notes))
