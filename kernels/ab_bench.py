"""A/B timing of two builds of one kernel variant, for kernel development on a shared, noisy machine.

    python kernels/ab_bench.py build DIR [--variant V]   # compile a variant of this tree into DIR (default:
                                                         # the best this CPU runs of avx2 / avx512 / avx512_bf16)
    python kernels/ab_bench.py compare DIR_A DIR_B [DIR_C ...] --formats bf16,int4_g64 --threads 1,2 --batches 1,128

`compare` runs the two builds in alternating subprocesses (A B A B ...), each timing the kernel alone on
the Qwen3-30B-A3B layer (128 experts, top-8, H 2048, I 768; the same random weights and routings as
`moetier bench kernels`, one prepared copy, forwards rotating over 32 routings so a step finds its
experts in DRAM, not in the L3), and measuring the read bandwidth in the same process right before.
It prints per (format, threads, batch) the median over rounds of each build's GB/s (bytes: distinct
experts touched x expert bytes), % of its own run's read bandwidth, GFLOP/s, and the median of the B/A
ratios of neighbouring rounds: on a machine whose load changes minute to minute, only ratios of runs
close in time mean something.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import runpy
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BACKEND_OF = {"avx2": "cpu.avx2", "avx512": "cpu.avx512", "avx512_bf16": "cpu.avx512", "amx": "cpu.amx"}


def host_variant() -> str:
    """The best variant below AMX this CPU runs (AMX's kernels differ in prefill only)."""
    from moetier.backends.native import runnable_variants
    from moetier.hardware import detect_inventory

    runnable = [v for v in runnable_variants(detect_inventory()) if v != "amx"]
    if not runnable:
        raise SystemExit("this CPU runs none of the kernel variants")
    return runnable[-1]


def build(out_dir: Path, variant: str, defines: tuple[str, ...] = ()) -> Path:
    """Compile this tree's kernels for `variant` into out_dir (setup.py's flags); returns the module path."""
    from pybind11.setup_helpers import Pybind11Extension, build_ext
    from setuptools import Distribution

    b = runpy.run_path(str(ROOT / "kernels" / "build_variants.py"))
    ext = Pybind11Extension(f"_moe_{variant}", [str(ROOT / s) for s in b["KERNEL_SOURCES"]], cxx_std=17,
                            include_dirs=[str(ROOT / "kernels")],
                            define_macros=b["define_macros"](variant) + [tuple((d + "=1").split("=")[:2]) for d in defines],
                            extra_compile_args=[*b["COMPILE_ARGS"], *b["KERNEL_VARIANTS"][variant]],
                            extra_link_args=b["LINK_ARGS"])
    dist = Distribution({"name": "moetier-ab", "ext_modules": [ext]})
    cmd = build_ext(dist)
    cmd.build_lib = str(out_dir)
    cmd.build_temp = str(out_dir / "tmp")
    cmd.force = True  # the headers are not listed as dependencies here
    cmd.ensure_finalized()
    cmd.run()
    return out_dir / (f"_moe_{variant}" + sysconfig.get_config_var("EXT_SUFFIX"))


class _OlderBuild:
    """A module built from an older tree, whose MoELayer may take fewer arguments than the backend passes
    (the newest ones are options with defaults): it gets the ones it knows."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        return getattr(self._module, name)

    def MoELayer(self, *args, **kwargs):  # noqa: N802 (the extension's class name)
        newer = {k: kwargs.pop(k) for k in ("capacity",) if k in kwargs}  # options older builds lack
        for extra in (newer, {}):
            for n in range(len(args), 0, -1):
                try:
                    return self._module.MoELayer(*args[:n], **kwargs, **extra)
                except TypeError:
                    continue
        raise TypeError("no MoELayer signature of this build accepts the arguments")


def _load(module_dir: Path):
    """The one variant built in module_dir: (module, variant name)."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    found = sorted(Path(module_dir).glob("_moe_*" + suffix))
    if len(found) != 1:
        raise SystemExit(f"{module_dir}: expected one built variant (_moe_*{suffix}), found {len(found)}")
    name = found[0].name[: -len(suffix)]
    spec = importlib.util.spec_from_file_location(name, found[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return _OlderBuild(module), name.removeprefix("_moe_")


def run_one(module_dir: Path, fmt: str, threads: list[int], batches: list[int], seconds: float, seed: int) -> list[dict]:
    """Time one build on one format (in this process); one record per (threads, batch)."""
    import torch

    from moetier.backends.native.backend import NativeBackend
    from moetier.bench import probes
    from moetier.errors import KernelVariantError
    from moetier.bench.workload import (distinct_experts, flops_per_forward, qwen3_30b, random_hidden,
                                        random_routing, random_weights, weights_seed)
    from moetier.hardware import detect_inventory

    torch.set_num_threads(1)
    inv = detect_inventory()
    module, variant = _load(module_dir)
    renamed = module_dir / "layouts.json"  # an older build that names a format's kernel layout differently
    if renamed.exists():
        from moetier.backends.native import backend as native_backend

        native_backend.GGUF_LAYOUTS.update(json.loads(renamed.read_text()))
    layer = qwen3_30b().layer
    weights = random_weights(layer, fmt, weights_seed(seed, fmt))
    out = []
    backend = NativeBackend(BACKEND_OF[variant], variant, inv, threads=max(threads), extension=module)
    prepared = backend.prepare(layer, weights, range(layer.num_experts), fmt)
    del weights
    for t in threads:
        be = NativeBackend(BACKEND_OF[variant], variant, inv, threads=t, extension=module)
        # Best pass of the read probe (a 256 MiB pass takes ~7 ms: the best of 8 is rarely preempted).
        read = max(probes.read_bandwidth(inv, t, nbytes=256 << 20, repeats=8))
        for b in batches:
            hidden = random_hidden(layer, b, seed + b)
            routings = random_routing(layer, b, 32, seed + 1000 + b)
            nbytes = [distinct_experts(r.topk_ids) * layer.expert_bytes(fmt) for r in routings]
            for i in range(max(8, len(routings))):  # warm-up: pool, scratch, page tables
                r = routings[i % len(routings)]
                be.forward(prepared, hidden, r.topk_ids, r.topk_weights)
            times, cpu, used = [], [], []
            start = time.perf_counter()
            i = 0
            while time.perf_counter() - start < seconds or len(times) < 10:
                r = routings[i % len(routings)]
                t0, c0 = time.perf_counter(), time.thread_time()
                be.forward(prepared, hidden, r.topk_ids, r.topk_weights)
                times.append(time.perf_counter() - t0)
                cpu.append(time.thread_time() - c0)
                used.append(nbytes[i % len(routings)])
                i += 1
            read = max(read, *probes.read_bandwidth(inv, t, nbytes=256 << 20, repeats=8))
            med = statistics.median(times)
            per_byte = sorted(x / n for x, n in zip(times, used))  # seconds per byte, fastest first
            gbs = statistics.fmean(used) / med / 1e9
            rec = dict(fmt=fmt, threads=t, batch=b, seconds=med, gb_per_s=gbs, read_gb_per_s=read,
                       pct_bw=100 * gbs / read, gflop_per_s=flops_per_forward(layer, b) / med / 1e9,
                       p10_gb_per_s=1e-9 / per_byte[len(per_byte) // 10])
            if t == 1:  # the caller's thread did all the work: its CPU time leaves out preemption
                rec["cpu_gb_per_s"] = statistics.fmean(used) / statistics.median(cpu) / 1e9
                rec["cpu_gflop_per_s"] = flops_per_forward(layer, b) / statistics.median(cpu) / 1e9
            try:  # the peak probes run on AVX-512 (VNNI / BF16) only
                kind = "bf16" if fmt in ("bf16", "fp8_e4m3", "fp16") else "int8"
                rec["peak_kind"] = kind
                peak = probes.bf16_peak if kind == "bf16" else probes.int8_peak
                rec["peak_gflop_per_s"] = max(peak(inv, t) for _ in range(3)) / 1e9  # best of 3: preemption only lowers it
                if t == 1:  # the same probe in the caller's CPU time (its ~25 ms calibration counted too: <= 3% low)
                    fn = getattr(probes._module(), "bf16_peak" if kind == "bf16" else "int8_peak")
                    c0 = time.thread_time()
                    r = fn(1, 1.0)
                    rec["cpu_peak_gflop_per_s"] = r["ops_per_s"] * r["seconds"] / (time.thread_time() - c0) / 1e9
            except KernelVariantError:
                pass
            out.append(rec)
        del be
    return out


def compare(dirs: list[Path], formats: list[str], threads: list[int], batches: list[int], rounds: int,
            seconds: float, seed: int) -> dict:
    """Builds in `dirs` (the first is the reference) in alternating subprocesses, `rounds` times."""
    names = [chr(ord("A") + i) for i in range(len(dirs))]
    results: dict = {}
    for fmt in formats:
        for rnd in range(rounds):
            order = list(zip(names, dirs))
            order = order[rnd % len(order):] + order[:rnd % len(order)]  # rotate who goes first
            for name, d in order:
                cmd = [sys.executable, __file__, "run", str(d), "--format", fmt, "--threads",
                       ",".join(map(str, threads)), "--batches", ",".join(map(str, batches)), "--seconds",
                       str(seconds), "--seed", str(seed)]
                recs = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
                for r in recs:
                    results.setdefault((fmt, r["threads"], r["batch"]), {}).setdefault(name, []).append(r)
    print("GB/s: median over rounds of each build (wall clock; 'cpu': the calling thread's CPU time, 1 thread);"
          " x/A: median of per-round ratios")
    summary = {}
    for (fmt, t, b), runs in results.items():
        line = f"{fmt:10} t{t} b{b:<4}"
        entry = {}
        for name in names:
            rs = runs[name]
            gbs = statistics.median(r["gb_per_s"] for r in rs)
            pct = statistics.median(r["pct_bw"] for r in rs)
            cpu = statistics.median(r["cpu_gb_per_s"] for r in rs) if "cpu_gb_per_s" in rs[0] else None
            ratio = statistics.median(rb["gb_per_s"] / ra["gb_per_s"] for ra, rb in zip(runs["A"], rs))
            cratio = (statistics.median(rb["cpu_gb_per_s"] / ra["cpu_gb_per_s"] for ra, rb in zip(runs["A"], rs))
                      if cpu else None)
            entry[name] = dict(gb_per_s=gbs, pct_bw=pct, cpu_gb_per_s=cpu, ratio=ratio, cpu_ratio=cratio,
                               gflop_per_s=statistics.median(r["gflop_per_s"] for r in rs), runs=rs)
            line += f" | {name} {gbs:5.1f} {pct:4.0f}%" + (f" cpu {cpu:5.1f}" if cpu else "")
            if name != "A":
                line += f" x{ratio:4.2f}" + (f" cpu x{cratio:4.2f}" if cratio else "")
        summary[f"{fmt} t{t} b{b}"] = entry
        print(line, flush=True)
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pb = sub.add_parser("build")
    pb.add_argument("out_dir", type=Path)
    pb.add_argument("--define", action="append", default=[], help="a preprocessor macro (experiments)")
    pb.add_argument("--variant", help="kernel variant (default: the best this CPU runs, below amx)")
    for name in ("run", "compare"):
        q = sub.add_parser(name)
        q.add_argument("dirs", type=Path, nargs=1 if name == "run" else "+")
        q.add_argument("--format" if name == "run" else "--formats", dest="formats",
                       default="bf16,int8,int4_g64,fp8_e4m3")
        q.add_argument("--threads", default="1,2")
        q.add_argument("--batches", default="1,128")
        q.add_argument("--seconds", type=float, default=1.5)
        q.add_argument("--seed", type=int, default=0)
        if name == "compare":
            q.add_argument("--rounds", type=int, default=3)
            q.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    if a.cmd == "build":
        a.out_dir.mkdir(parents=True, exist_ok=True)
        print(build(a.out_dir, a.variant or host_variant(), defines=tuple(a.define)))
        return 0
    threads = [int(x) for x in a.threads.split(",")]
    batches = [int(x) for x in a.batches.split(",")]
    if a.cmd == "run":
        print(json.dumps(run_one(a.dirs[0], a.formats, threads, batches, a.seconds, a.seed)))
        return 0
    summary = compare(a.dirs, a.formats.split(","), threads, batches, a.rounds, a.seconds, a.seed)
    if a.json:
        a.json.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
