"""How fast each tier reads weights and computes: the inputs of the cost model.

- CPU tiers: the read bandwidth and the vdpbf16ps / vpdpbusd peaks exactly as `moetier bench` measures
  them (moetier.bench.probes), measured now on this machine (about two seconds), or read from a
  `moetier bench kernels --json` file, or, for a recorded inventory of another machine, assumed from its
  core count and instruction set (said so in the plan's output);
- accelerators: a table of published memory bandwidth and dense bf16 tensor throughput by device name;
  a device not in it, or one planned for with --gpu-mem on a machine without it, gets an RTX 4090-class
  assumption;
- disk: an assumed NVMe read rate; the host <-> accelerator link: PCIe 4 x16 as measured in practice.
"""
from __future__ import annotations

import json
import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SettingError
from ..formats import get_format
from ..hardware.inventory import HardwareInventory

# Fixed cost of one MoE layer on moetier's CPU path (routing in fp32, input checks, waking the kernel
# pool): 40 us measured on the development machine for a tiny layer (route + forward, cpu.avx512, 2
# threads); host round trips of a hybrid layer add about 2 x 26 us (cudaLaunchHostFunc, see
# docs/architecture.md, placement).
CPU_LAYER_OVERHEAD_S = 40e-6
HYBRID_LAYER_OVERHEAD_S = 60e-6
PCIE_GB_PER_S = 25.0  # pinned host->device copies on PCIe 4 x16 measure 24-26 GB/s
DISK_GB_PER_S = 3.0  # a PCIe 4 NVMe drive reading MB-sized expert slices (assumed)
GB_ = 1e9

# name substring -> (memory GB/s, dense bf16 tensor TFLOP/s), from the vendors' data sheets
ACCELERATOR_TABLE = (
    ("H200", 4800.0, 989.0), ("H100", 3350.0, 989.0), ("H20", 4000.0, 148.0), ("A100", 2039.0, 312.0),
    ("L40S", 864.0, 362.0), ("A6000", 768.0, 155.0), ("4090", 1008.0, 165.0), ("5090", 1792.0, 210.0),
    ("3090", 936.0, 71.0), ("MI300X", 5300.0, 1307.0), ("MI250", 3277.0, 362.0), ("910B", 1600.0, 320.0),
)
DEFAULT_ACCELERATOR = ("an RTX 4090-class card (assumed)", 1008.0, 165.0)


@dataclass(frozen=True)
class TierSpeed:
    """read_gb_per_s: how fast weights stream (1e9 B/s); bf16 / int8 peaks in GFLOP/s (GOP/s); overlap:
    True when reading and computing overlap (accelerators), False when they add up (the CPU kernels do
    not fully hide DRAM waits behind their vector work, docs/benchmarks.md)."""

    read_gb_per_s: float
    bf16_gflop_per_s: float
    int8_gop_per_s: float
    source: str
    overlap: bool = False
    read_by_format: tuple[tuple[str, float], ...] = ()  # measured decode read rates, where known

    def read_for(self, fmt: str) -> float:
        """GB/s weights in `fmt` stream at: the rate the kernel benchmark measured for that format at
        decode, where a bench file gave one, else the probe's read bandwidth."""
        return dict(self.read_by_format).get(fmt, self.read_gb_per_s)

    def peak(self, fmt: str) -> float:
        """GFLOP/s the format's math runs at: bf16 for float and fp8 weights, int8 for int8/int4 and the block
        formats (GGUF, MXFP4: their kernels quantize activations to int8), whichever the tier has; a mixed
        format at its gate/up part's (two thirds of the work)."""
        if on_int8_dot(fmt) and self.int8_gop_per_s:
            return self.int8_gop_per_s
        return self.bf16_gflop_per_s


def on_int8_dot(fmt: str) -> bool:
    """Whether the CPU kernels compute `fmt` on int8 dot products (int8 / int4 and the block formats, GGUF
    and MXFP4, quantize the activations to int8); a mixed format by its gate/up part (two thirds of the work)."""
    return get_format(fmt).gate_up.kind in ("int8", "int4", "gguf", "mxfp4")


@dataclass(frozen=True)
class Speeds:
    tiers: Mapping[str, TierSpeed]
    link_gb_per_s: float = PCIE_GB_PER_S
    layer_overhead_s: float = CPU_LAYER_OVERHEAD_S
    hybrid_overhead_s: float = HYBRID_LAYER_OVERHEAD_S
    notes: tuple[str, ...] = field(default=())

    def of(self, tier: str) -> TierSpeed:
        try:
            return self.tiers[tier]
        except KeyError:
            raise SettingError(f"no speed known for tier {tier!r}") from None


def measured_cpu(inventory: HardwareInventory, threads: int | None = None) -> TierSpeed:
    """This machine's CPU as `moetier bench` measures it (quick probes, best of the repeats)."""
    from ..bench.probes import measure_limits

    t = threads or max(1, inventory.cpu.physical_cores)
    lim = measure_limits(inventory, (t,), quick=True)
    bf16 = lim.bf16_gflop_per_s.get(t)
    int8 = lim.int8_gop_per_s.get(t)
    assumed = _assumed_peaks(inventory, t)
    return TierSpeed(lim.read_gb_per_s_best[t], bf16 or assumed[0], int8 or assumed[1],
                     f"measured now ({t} threads): read {lim.read_gb_per_s_best[t]:.1f} GB/s"
                     + (f", bf16 {bf16:.0f} GFLOP/s" if bf16 else ", bf16 peak assumed")
                     + (f", int8 {int8:.0f} GOP/s" if int8 else ""))


def cpu_from_bench(path: str | Path, inventory: HardwareInventory, *, backend: str | None = None,
                   threads: int | None = None) -> TierSpeed:
    """The CPU limits recorded by `moetier bench kernels --json FILE` (at `threads`, default its highest
    thread count), and, from its batch-1 records of `backend` at those threads, the rate each format's
    weights streamed at in decode: weight bytes / (seconds - FLOPs / peak), the time the kernel spent
    reading once its math is taken out (median over the shapes measured)."""
    try:
        doc = json.loads(Path(path).read_text())
        limits = doc["limits"]
        have = sorted(int(k) for k in limits["read_gb_per_s_best"])
        if threads is not None and threads not in have:
            raise SettingError(f"--speeds {path}: measured at {', '.join(map(str, have))} threads, not {threads}")
        threads = threads or have[-1]
        read = float(limits["read_gb_per_s_best"][str(threads)])
        bf16 = limits.get("bf16_gflop_per_s", {}).get(str(threads))
        int8 = limits.get("int8_gop_per_s", {}).get(str(threads))
    except FileNotFoundError:
        raise SettingError(f"--speeds {path}: no such file") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SettingError(f"--speeds {path}: not the JSON of `moetier bench kernels --json` "
                           f"({type(exc).__name__}: {exc})") from None
    assumed = _assumed_peaks(inventory, threads)
    bf16, int8 = float(bf16 or assumed[0]), float(int8 or assumed[1])
    rates: dict[str, list[float]] = {}
    for r in doc.get("records") or ():
        if r.get("batch") != 1 or r.get("threads") != threads or (backend and r.get("backend") != backend):
            continue
        try:
            peak = int8 if on_int8_dot(r["format"]) else bf16
            reading = float(r["seconds"]) - float(r["flops"]) / (peak * GB_)
            if reading > 0:
                rates.setdefault(r["format"], []).append(float(r["weight_bytes"]) / reading / GB_)
        except (KeyError, TypeError, ValueError, SettingError):
            continue
    by_format = tuple(sorted((f, statistics.median(v)) for f, v in rates.items()))
    return TierSpeed(read, bf16, int8,
                     f"from {Path(path).name} ({doc.get('date', 'undated')}, {threads} threads): read {read:.1f} GB/s"
                     + (", decode streams " + ", ".join(f"{f} {v:.1f}" for f, v in by_format) + " GB/s"
                        if by_format else ""), read_by_format=by_format)


def _assumed_peaks(inventory: HardwareInventory, threads: int) -> tuple[float, float]:
    """bf16 GFLOP/s and int8 GOP/s per the instruction set at an assumed 2.5 GHz: AMX 1024 / 2048 ops per
    cycle per core, AVX-512 BF16/VNNI 64 / 128 (one 512-bit port), otherwise fp32 FMA 32 on AVX-512 and
    AVX2 alike (two 256-bit ports), and the same for int8."""
    cpu = inventory.cpu
    if cpu.has("amx_bf16", "amx_int8"):
        per = (1024, 2048)
    elif cpu.has("avx512_bf16", "avx512_vnni"):
        per = (64, 128)
    elif cpu.has("avx512f") or cpu.has("avx2"):
        per = (32, 32)
    else:
        per = (8, 8)
    return threads * 2.5 * per[0], threads * 2.5 * per[1]


def assumed_cpu(inventory: HardwareInventory, node_cores: int) -> TierSpeed:
    """An unmeasured NUMA node: 8 GB/s per physical core up to 250 GB/s (a DDR5 socket's measured
    ceiling), peaks per `_assumed_peaks`."""
    read = min(8.0 * node_cores, 250.0)
    bf16, int8 = _assumed_peaks(inventory, node_cores)
    return TierSpeed(read, bf16, int8, f"assumed for {node_cores} cores: read {read:.0f} GB/s (measure with "
                                       "`moetier bench kernels --json F` and pass --speeds F)")


def accelerator_speed(name: str | None) -> TierSpeed:
    for key, bw, tflops in ACCELERATOR_TABLE:
        if name and key.lower() in name.lower():
            return TierSpeed(bw, tflops * 1e3, tflops * 2e3, f"{name}: {bw:.0f} GB/s, {tflops:.0f} TFLOP/s bf16 "
                                                             "(data sheet)", overlap=True)
    what, bw, tflops = DEFAULT_ACCELERATOR
    return TierSpeed(bw, tflops * 1e3, tflops * 2e3, f"{name or 'accelerator'}: speeds of {what}", overlap=True)


def make_speeds(budgets, inventory: HardwareInventory, *, measure: bool, bench_file: str | None = None,
                cpu_speed: TierSpeed | None = None, threads: int | None = None,
                cpu_backend: str | None = None) -> Speeds:
    """A speed for every tier of `budgets`. CPU tiers: `cpu_speed` if given, else the bench file, else a
    measurement now (`measure`), else the assumption; a machine with several NUMA nodes shares the
    measured bandwidth and peaks evenly between them."""
    nodes = budgets.of_kind("cpu")
    if cpu_speed is None:
        if bench_file:
            cpu_speed = cpu_from_bench(bench_file, inventory, backend=cpu_backend, threads=threads)
        elif measure:
            cpu_speed = measured_cpu(inventory, threads)
    tiers: dict[str, TierSpeed] = {}
    for t in nodes:
        if cpu_speed is not None:
            n = max(1, len(nodes))
            tiers[t.name] = TierSpeed(cpu_speed.read_gb_per_s / n, cpu_speed.bf16_gflop_per_s / n,
                                      cpu_speed.int8_gop_per_s / n,
                                      cpu_speed.source + (f", shared by {n} NUMA nodes" if n > 1 else ""),
                                      read_by_format=tuple((f, v / n) for f, v in cpu_speed.read_by_format))
        else:
            numa = [nd for nd in inventory.numa_nodes if f"cpu:numa{nd.id}" == t.name]
            logical = len(numa[0].cpus) if numa else inventory.cpu.logical_cores
            per_core = max(1, inventory.cpu.logical_cores // max(1, inventory.cpu.physical_cores))
            tiers[t.name] = assumed_cpu(inventory, max(1, logical // per_core))
    names = {f"{a.kind}:{a.index}": a.name for a in inventory.accelerators}
    for t in budgets.of_kind("accelerator"):
        tiers[t.name] = accelerator_speed(names.get(t.name))
    for t in budgets.of_kind("disk"):
        cpu = tiers[nodes[0].name] if nodes else assumed_cpu(inventory, inventory.cpu.physical_cores)
        tiers[t.name] = TierSpeed(DISK_GB_PER_S, cpu.bf16_gflop_per_s, cpu.int8_gop_per_s,
                                  f"disk: {DISK_GB_PER_S:.0f} GB/s assumed (NVMe), every touched expert read; "
                                  "computed on the CPU")
    return Speeds(tiers)
