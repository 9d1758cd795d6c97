#!/usr/bin/env python
"""Run the `moetier bench kernels` workload through the peer project's published CPU kernels (PyPI
`kt-kernel`), so that anyone can repeat the comparison.

Runs inside the separate environment `ci/kt_kernel_env.sh` creates (kt-kernel pins its own torch). It
imports moetier's workload definitions from this checkout (shapes, seeds, routing, byte and FLOP
accounting, timing, records), so both sides time the same weights shapes, the same routings and count
the same bytes; it writes the same JSON document `moetier bench kernels --json` writes, which
`moetier bench kernels --peer FILE` shows side by side.

kt-kernel is driven through its pybind extension (CPUInfer + MOEConfig + a MoE class), as its own
benchmarks do: KTMoEWrapper needs CUDA pinned buffers and a weight directory. Format mapping:
  bf16      AMXBF16_MOE          (bf16 weights)
  int8      AMXInt8_MOE          (kt quantizes the bf16 weights itself, per channel)
  int4_gG   AMXInt4_1KGroup_MOE  (kt quantizes the bf16 weights itself, groups of G, with zero points;
                                  G=32 crashes kt-kernel 0.7.2 with SIGSEGV)
  fp8_e4m3  AMXFP8_MOE           (moetier's e4m3 data and 128x128 block scales, as checkpoints ship them)
Bytes per forward are counted in moetier's format (the GB/s column means the same on both sides).
Each shape x format runs in its own process, so a crash of kt-kernel becomes a note, not a lost run.

    build/kt-venv/bin/python ci/bench_kt_kernel.py --quick --json kt.json
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import kt_kernel
from moetier.bench import report
from moetier.bench.kernels import CHECK_TOKENS, BenchConfig, BenchResult, make_inputs, reference_relerr
from moetier.bench.measure import Measurement, summarize, time_calls
from moetier.bench.probes import measure_limits
from moetier.bench.workload import (BENCH_FORMATS, GIB, distinct_experts, flops_per_forward, get_shape, l3_bytes,
                                    plan_copies, random_weights, weights_seed)
from moetier.hardware import detect_inventory

CLASSES = {"bf16": "AMXBF16_MOE", "int8": "AMXInt8_MOE", "int4_g32": "AMXInt4_1KGroup_MOE",
           "int4_g64": "AMXInt4_1KGroup_MOE", "int4_g128": "AMXInt4_1KGroup_MOE", "fp8_e4m3": "AMXFP8_MOE"}


def _stack(weights, layer, fmt):
    """Stacked [E, I, H], [E, I, H], [E, H, I] tensors (and fp32 block scales for fp8) kt-kernel reads."""
    es = [weights.expert(e) for e in range(layer.num_experts)]
    if fmt == "fp8_e4m3":
        data = [torch.stack([getattr(t, m).data.view(torch.uint8) for t in es]).contiguous() for m in ("gate", "up", "down")]
        scales = [torch.stack([getattr(t, m).scales for t in es]).contiguous() for m in ("gate", "up", "down")]
        return data, scales
    return [torch.stack([getattr(t, m).data for t in es]).contiguous() for m in ("gate", "up", "down")], None


class KtLayer:
    """One packed copy of the layer in kt-kernel, bound to a CPUInfer."""

    def __init__(self, ext, cpu, layer, fmt, data, scales, max_len):
        cfg = ext.moe.MOEConfig(layer.num_experts, layer.top_k, layer.hidden_size, layer.intermediate_size, 0)
        cfg.max_len = max_len
        cfg.pool = cpu.backend_
        cfg.gate_proj, cfg.up_proj, cfg.down_proj = (t.data_ptr() for t in data)
        if scales is not None:
            cfg.gate_scale, cfg.up_scale, cfg.down_scale = (t.data_ptr() for t in scales)
        if fmt == "fp8_e4m3":  # kt reads the block size from the quant config (0 there divides by zero)
            cfg.quant_config.bits = 8
            cfg.quant_config.group_size = 128
            cfg.quant_config.zero_point = False
        if fmt.startswith("int4_g"):
            cfg.quant_config.bits = 4
            cfg.quant_config.group_size = int(fmt[len("int4_g"):])
            cfg.quant_config.zero_point = True
        self.cpu = cpu
        self.k = layer.top_k
        self.moe = getattr(ext.moe, CLASSES[fmt])(cfg)
        self._map = torch.arange(layer.num_experts, dtype=torch.int64)
        cpu.submit(self.moe.load_weights_task(self._map.data_ptr()))
        cpu.sync()

    def forward(self, hidden, topk_ids, topk_weights, out, qlen):
        self.cpu.submit(self.moe.forward_task(qlen.data_ptr(), self.k, topk_ids.data_ptr(), topk_weights.data_ptr(),
                                              hidden.data_ptr(), out.data_ptr(), False))
        self.cpu.sync()
        return out


def kt_forward(kt_layer, layer):
    """forward(hidden, topk_ids, topk_weights) -> bf16 out, for the reference check."""
    def forward(x, ids, w):
        out = torch.zeros(x.shape[0], layer.hidden_size, dtype=torch.bfloat16)
        return kt_layer.forward(x, ids, w, out, torch.tensor([x.shape[0]], dtype=torch.int32))
    return forward


def run(config: BenchConfig, progress=print) -> list[Measurement]:
    """Time every shape x format x thread count x batch of `config` (the child process's work)."""
    ext = kt_kernel.kt_kernel_ext
    measurements: list[Measurement] = []
    version = getattr(kt_kernel, "__version__", "?")
    # Tokens per forward kt sizes its buffers for: a multiple of its 32-row tiles (the reference check
    # runs a few tokens too).
    max_len = -(-max(config.batches + (CHECK_TOKENS, 32)) // 32) * 32
    for shape_name in config.shapes:
        shape = get_shape(shape_name, config.max_weight_bytes)
        layer = shape.layer
        inputs = make_inputs(shape, config.batches, config.seed)
        for fmt in config.formats or BENCH_FORMATS:
            src_fmt = "fp8_e4m3" if fmt == "fp8_e4m3" else "bf16"
            weights = random_weights(layer, src_fmt, weights_seed(config.seed, src_fmt))
            data, scales = _stack(weights, layer, fmt)
            step = layer.top_k * layer.expert_bytes(fmt)
            copies = plan_copies(layer, layer.num_experts * layer.expert_bytes(fmt), step, config.max_weight_bytes,
                                 config.l3_bytes)
            backend = f"kt-kernel {version} {CLASSES[fmt]}"
            for t in config.threads:
                cpu = ext.CPUInfer(t)
                progress(f"{shape.name} {fmt} threads {t}: loading {copies} copies into {CLASSES[fmt]}")
                kt = [KtLayer(ext, cpu, layer, fmt, data, scales, max_len) for _ in range(copies)]
                relerr = reference_relerr(layer, weights, kt_forward(kt[0], layer), config.seed + 17)
                for b in config.batches:
                    hidden, routings = inputs[b]
                    n_r = len(routings)
                    out = torch.empty(b, layer.hidden_size, dtype=torch.bfloat16)
                    qlen = torch.tensor([b], dtype=torch.int32)

                    def call(i, _kt=kt, _h=hidden, _r=routings, _o=out, _q=qlen):
                        r = _r[i % n_r]
                        return _kt[i % copies].forward(_h, r.topk_ids, r.topk_weights, _o, _q)

                    base = config.plan_for(b)
                    plan = dataclasses.replace(base, warmup=max(base.warmup, copies))  # warm every copy
                    times = time_calls(call, plan)
                    nbytes = [distinct_experts(routings[(plan.warmup + j) % n_r].topk_ids) * layer.expert_bytes(fmt)
                              for j in range(len(times))]
                    med, p10, p90, mean_bytes = summarize(times, nbytes)
                    m = Measurement(shape.name, layer.num_experts, layer.top_k, layer.hidden_size,
                                    layer.intermediate_size, backend, fmt, b, t, med, p10, p90, len(times), copies,
                                    mean_bytes, float(flops_per_forward(layer, b)), relerr)
                    measurements.append(m)
                    progress(f"  batch {b:4d}: {m.tokens_per_s:10.1f} tok/s {m.gb_per_s:7.2f} GB/s "
                             f"{m.gflop_per_s:8.1f} GFLOP/s (relerr {relerr:.4f})")
                del kt, cpu
                gc.collect()
            del weights, data, scales
            gc.collect()
    return measurements


def run_isolated(config: BenchConfig, args) -> BenchResult:
    """Measure the limits here, then each shape x format in its own process: kt-kernel kills the process
    on some inputs (SIGFPE, SIGSEGV), and one crash must not lose the other formats."""
    inventory = detect_inventory()
    result = BenchResult(measure_limits(inventory, config.threads, quick=config.quick))
    result.load_average_start = list(os.getloadavg())
    for shape_name in config.shapes:
        shape = get_shape(shape_name, config.max_weight_bytes)
        result.shapes[shape.name] = shape
        for fmt in config.formats:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "part.json"
                cmd = [sys.executable, __file__, "--child", "--shapes", shape_name, "--formats", fmt,
                       "--batches", ",".join(map(str, config.batches)),
                       "--threads", ",".join(map(str, config.threads)),
                       "--max-weights-gib", str(args.max_weights_gib), "--seed", str(config.seed), "--json", str(out)]
                if config.quick:
                    cmd.append("--quick")
                rc = subprocess.run(cmd).returncode
                # As `moetier bench kernels` does: short probes after every format, the best kept.
                result.limits = result.limits.best_of(measure_limits(inventory, config.threads, quick=True))
                if rc == 0:
                    result.measurements += [Measurement.from_record(r) for r in json.loads(out.read_text())]
                    continue
            why = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit status {rc}"
            result.notes.append(f"kt-kernel {CLASSES[fmt]} on {shape_name} {fmt}: the process died ({why}); "
                                "no measurement")
            print(result.notes[-1], flush=True)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=None, help="comma-separated (default: qwen3-30b,deepseek-v3)")
    p.add_argument("--formats", default=None, help=f"comma-separated (default: {','.join(BENCH_FORMATS)})")
    p.add_argument("--batches", default=None, help="default: 1,4,128,512")
    p.add_argument("--threads", default=None, help="CPUInfer thread counts (default: 1,2)")
    p.add_argument("--quick", action="store_true", help="the preset of `moetier bench kernels --quick`")
    p.add_argument("--max-weights-gib", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one shape x format, records only
    args = p.parse_args(argv)
    from moetier.cli.bench import QUICK

    preset = QUICK if args.quick else {}

    def pick(text, key, default, conv=str):
        if text:
            return tuple(conv(x) for x in text.split(",") if x.strip())
        return preset.get(key, default)

    formats = pick(args.formats, "formats", BENCH_FORMATS)
    unknown = [f for f in formats if f not in CLASSES]
    if unknown:
        p.error(f"kt-kernel has no counterpart here for {', '.join(unknown)} (known: {', '.join(CLASSES)})")
    config = BenchConfig(shapes=pick(args.shapes, "shapes", ("qwen3-30b", "deepseek-v3")), formats=formats,
                         batches=pick(args.batches, "batches", (1, 4, 128, 512), int),
                         threads=pick(args.threads, "threads", (1, 2), int), baseline=False, quick=args.quick,
                         max_weight_bytes=int(args.max_weights_gib * GIB), l3_bytes=l3_bytes(), seed=args.seed)
    if args.child:
        measurements = run(config, progress=lambda text: print(text, flush=True))
        Path(args.json).write_text(json.dumps([m.to_record() for m in measurements]))
        return 0
    t0 = time.time()
    result = run_isolated(config, args)
    doc = report.document(result, detect_inventory(), command=["python", *sys.argv],
                          settings={"kt_kernel": getattr(kt_kernel, "__version__", "?"),
                                    "kt_cpu_variant": kt_kernel.__cpu_variant__, "torch": torch.__version__,
                                    "quick": args.quick, "seed": args.seed})
    report.print_report(doc)
    print(f"{len(doc['records'])} measurements in {time.time() - t0:.0f} s")
    if args.json:
        report.write_json(doc, args.json)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
