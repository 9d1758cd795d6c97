"""`moetier bench kernels|runtime|hybrid|model`: the command lines of the benchmarks (the work lives in moetier.bench)."""
from __future__ import annotations

import argparse
import sys

from ..bench.workload import BENCH_FORMATS, GIB, SHAPE_NAMES
from ..formats import FORMATS, get_format
from ..errors import BackendUnavailable, MoetierError, SettingError
from .options import add_backend_options, check_writable, load_context, positive_int

QUICK = {"shapes": ("qwen3-30b",), "formats": ("bf16", "int4_g64"), "batches": (1, 128), "threads": (2,)}

DESCRIPTION = """\
Time expert backends on model-sized MoE layers, side by side with the machine's limits measured in the
same run (DRAM read bandwidth, vdpbf16ps and vpdpbusd peaks) and the torch per-expert loop baseline.
--backend NAME (repeatable) chooses the backends to time (default: the CPU backend selection picks).
"""


def _csv(kind, choices=None):
    def parse(text: str):
        items = tuple(x.strip() for x in text.split(",") if x.strip())
        if not items:
            raise argparse.ArgumentTypeError(f"empty {kind} list")
        if kind == "int":
            try:
                vals = tuple(int(x) for x in items)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
            if any(v < 1 for v in vals):
                raise argparse.ArgumentTypeError(f"values must be >= 1, got {text!r}")
            return vals
        if kind == "format" and choices is None:  # any format get_format knows, mixed "GATEUP+DOWN" included
            try:
                return tuple(get_format(x).name for x in items)
            except MoetierError as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None
        if choices is not None:
            bad = [x for x in items if x not in choices]
            if bad:
                raise argparse.ArgumentTypeError(f"unknown {kind}: {', '.join(bad)} (known: {', '.join(choices)})")
        return items
    return parse


def register(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks (kernels against the machine's limits and baselines)")
    bsub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    p = bsub.add_parser("kernels", help="time expert backends against bandwidth, vector peak, torch and peers",
                        description=DESCRIPTION)
    add_backend_options(p, backend_help="backend to time (repeatable, or comma-separated; default: MOETIER_BACKEND, "
                                        "else the CPU backend `moetier doctor` chooses)")
    p.add_argument("--shapes", type=_csv("shape", SHAPE_NAMES), metavar="LIST",
                   help=f"comma-separated shapes (default: qwen3-30b,deepseek-v3; known: {', '.join(SHAPE_NAMES)})")
    p.add_argument("--formats", type=_csv("format"), metavar="LIST",
                   help="comma-separated weight formats, any the backend declares (default: every one of "
                        f"{','.join(BENCH_FORMATS)} the backend declares)")
    p.add_argument("--batches", type=_csv("int"), metavar="LIST", help="tokens per forward (default: 1,4,128,512)")
    p.add_argument("--threads", type=_csv("int"), metavar="LIST", help="thread counts (default: 1,2)")
    p.add_argument("--quick", action="store_true",
                   help="a run of under a minute: qwen3-30b, bf16 and int4_g64, batches 1 and 128, 2 threads, "
                        "short timings (explicit options override these)")
    p.add_argument("--no-baseline", action="store_true", help="do not time the torch per-expert loop")
    p.add_argument("--max-weights-gib", type=float, default=3.0, metavar="GIB",
                   help="memory for all prepared copies of one backend and format; also sizes the DeepSeek-V3 "
                        "expert count (default: 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, inputs and routing (default: 0)")
    p.add_argument("--json", metavar="FILE", help="write every measurement, the limits and the machine as JSON")
    p.add_argument("--markdown", metavar="FILE", help="write the run (date, machine, limits, results) as Markdown")
    p.add_argument("--peer", metavar="FILE.json", action="append",
                   help="results of the peer runner (ci/bench_kt_kernel.py) to show side by side (repeatable)")
    p.set_defaults(func=run_cli)

    p = bsub.add_parser("runtime", help="the tiered layer's overhead, and decode with half of the experts on disk",
                        description=RUNTIME_DESCRIPTION)
    add_backend_options(p, backend_help="CPU backend to run on (default: MOETIER_BACKEND, else the one `moetier "
                                        "doctor` chooses)")
    p.add_argument("--layers", type=positive_int, default=4,
                   help="MoE layers of the disk-tier checkpoint (default 4: 2.4 GB of FP8 experts)")
    p.add_argument("--tokens", type=positive_int, default=32, help="decode tokens timed per run (default 32)")
    p.add_argument("--cache-share", type=float, default=0.25, metavar="F",
                   help="DRAM cache of the disk tier as a share of the bytes left on disk (default 0.25)")
    p.add_argument("--workdir", metavar="DIR",
                   help="folder for the disk-tier checkpoint (default: a temporary folder, removed after)")
    p.add_argument("--quick", action="store_true", help="short timings, 2 layers, 8 tokens")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, inputs and routing (default: 0)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.set_defaults(func=run_runtime)

    p = bsub.add_parser("hybrid", help="the hybrid step on a GPU: CPU part, device part, joint time, overlap, "
                                       "device bandwidth share, host-function costs",
                        description=HYBRID_DESCRIPTION)
    add_backend_options(p, backend_help="native CPU backend for the CPU experts (default: MOETIER_BACKEND, else the "
                                        "one `moetier doctor` chooses)")
    p.add_argument("--cpu-stand-in", action="store_true",
                   help="run the whole harness on the CPU with cpu.accel as the device (for testing the harness: "
                        "the numbers then mean nothing)")
    p.add_argument("--shapes", type=_csv("shape", SHAPE_NAMES), metavar="LIST",
                   help=f"comma-separated shapes (default: deepseek-v3,qwen3-30b; known: {', '.join(SHAPE_NAMES)})")
    p.add_argument("--shares", type=_shares, metavar="LIST",
                   help="shares of the experts on the device, comma-separated in [0, 1] (default: 0,0.25,0.5,0.75,1)")
    p.add_argument("--batches", type=_csv("int"), metavar="LIST", help="tokens per step (default: 1,8,128,512)")
    p.add_argument("--format", default="bf16", choices=BENCH_FORMATS,
                   help="weight format of every expert, CPU and device (default: bf16)")
    p.add_argument("--threads", type=positive_int, metavar="N",
                   help="CPU kernel threads (default: physical cores - 1, leaving one to the thread that "
                        "drives the device)")
    p.add_argument("--eager", action="store_true", help="do not capture the steps in CUDA graphs")
    p.add_argument("--quick", action="store_true", help="short timings (every configuration still runs)")
    p.add_argument("--time-budget", type=float, default=300.0, metavar="S",
                   help="stop starting new configurations after S seconds; the rest are listed as skipped "
                        "(default: 300)")
    p.add_argument("--max-weights-gib", type=float, default=3.0, metavar="GIB",
                   help="sizes the DeepSeek-V3 expert count: as many of its experts as fit in bf16 (default: 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, inputs and routing (default: 0)")
    p.add_argument("--json", metavar="FILE", help="write every result as JSON (rewritten after each one)")
    p.set_defaults(func=run_hybrid)

    p = bsub.add_parser("model", help="whole-model prefill and decode: moetier against transformers on the same "
                                      "weights and against the byte limit", description=MODEL_DESCRIPTION)
    add_backend_options(p, backend_help="CPU backend for the experts (default: MOETIER_BACKEND, else the one "
                                        "`moetier doctor` chooses)")
    p.add_argument("--format", type=_csv("format", tuple(FORMATS)), metavar="LIST",
                   help="comma-separated expert formats for moetier, any the backend computes (GGUF types too: "
                        "q4_k, q2_k, ...; default: bf16,int8,int4_g64,fp8_e4m3; --quick: bf16,int4_g64)")
    p.add_argument("--threads", type=positive_int, default=2, help="threads of torch and the kernels (default 2)")
    p.add_argument("--layers", type=positive_int,
                   help="decoder layers of the synthetic model (default: qwen3-30b-a3b 8, deepseek-v3 3; --quick 2)")
    p.add_argument("--dims", choices=("qwen3-30b-a3b", "deepseek-v3", "tiny", "tiny-deepseek"),
                   default="qwen3-30b-a3b",
                   help="layer dimensions: qwen3-30b-a3b (default; 8 layers), deepseek-v3 (a slice: one dense and "
                        "two MoE layers of 32 experts), or tiny / tiny-deepseek (for testing the harness: their "
                        "numbers mean nothing)")
    p.add_argument("--experts", type=positive_int, metavar="N",
                   help="routed experts per MoE layer of the synthetic model (default: qwen3-30b-a3b 128, "
                        "deepseek-v3 32: all 256 take 22.5 GB per layer in bf16)")
    p.add_argument("--prompt-tokens", type=positive_int, help="prefill length (default 512; --quick 128)")
    p.add_argument("--new-tokens", type=positive_int,
                   help="tokens generated; decode is timed over all but the first (default 65; --quick 17)")
    p.add_argument("--repeats", type=positive_int, help="timed generations per implementation (default 3; --quick 1)")
    p.add_argument("--model", metavar="DIR",
                   help="checkpoint folder: written there if it has no config.json, else reused as it is "
                        "(default: a temporary folder, removed after)")
    p.add_argument("--dense", type=_dense_choice, default="auto", metavar="FMT",
                   help="moetier's dense layers (attention, LM head): auto (default: bf16 on the backend's kernels), "
                        "same (each row's expert format, as llama.cpp's types quantize them), transformers (torch's "
                        "own layers), or a format")
    p.add_argument("--no-transformers", action="store_true", help="do not time transformers (its eager model still "
                                                                  "gives the correctness check)")
    p.add_argument("--llama-cpp", metavar="RESULTS.json",
                   help="llama.cpp figures on the same checkpoint (from ci/llama_cpp_bench.sh) to show side by side")
    p.add_argument("--gguf", metavar="FILE.gguf", action="append", default=[],
                   help="also run moetier on a GGUF file of this checkpoint, every tensor in the file's own types "
                        "(e.g. the CHECKPOINT/gguf/model-Q4_K_M.gguf that ci/llama_cpp_bench.sh made and llama.cpp "
                        "read); repeatable"),
    p.add_argument("--quick", action="store_true",
                   help="2 layers, prefill 128, decode 16 tokens, bf16 and int4_g64, one repeat "
                        "(explicit options override these)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights and prompts (default 0)")
    p.add_argument("--json", metavar="FILE", help="write the results, settings and machine as JSON")
    p.add_argument("--markdown", metavar="FILE", help="write the table as Markdown")
    p.set_defaults(func=run_model)


def _dense_choice(value: str) -> str:
    if value in ("auto", "same", "transformers") or value in FORMATS:
        return value
    raise argparse.ArgumentTypeError(f"{value!r} is not auto, same, transformers or a format "
                                     f"({', '.join(FORMATS)})")


MODEL_DESCRIPTION = """\
Whole-model prefill and decode tokens/s through transformers' generation (greedy, static cache, bf16 on
the CPU) on a synthetic checkpoint with the real Qwen3-30B-A3B or DeepSeek-V3 layer dimensions in the
family's real safetensors layout: moetier.load in each format, transformers' own model on the same weights (eager and grouped_mm
experts), and the byte limit (weight bytes per decode token / read bandwidth measured in the same run).
Every implementation's logits are first checked against transformers' eager model on the same weights.
"""


def run_model(args) -> int:
    import json
    import shutil
    import tempfile
    from dataclasses import replace
    from pathlib import Path

    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from ..bench import model as mb
    from ..bench.report import make_console

    for path, what in ((args.json, "JSON file"), (args.markdown, "Markdown file")):
        if path:
            check_writable(path, what)
    llama_records = mb.load_llama_cpp(args.llama_cpp) if args.llama_cpp else []
    if args.model and Path(args.model).exists() and not Path(args.model).is_dir():
        raise SettingError(f"--model {args.model} is not a folder")
    from ..checkpoint.gguf import is_gguf

    if args.gguf and not args.model:
        raise SettingError("--gguf needs --model DIR: the checkpoint the GGUF files were made from")
    for f in args.gguf:
        if not is_gguf(f):
            raise SettingError(f"--gguf {f}: not a GGUF file (make one of this checkpoint with "
                               "ci/llama_cpp_bench.sh CHECKPOINT RESULTS.json: CHECKPOINT/gguf/model-TYPE.gguf)")
    ctx = load_context(args)
    name = ctx.requested[0] if ctx.requested else ctx.selection.for_device("cpu")
    if name is None:
        raise MoetierError("no CPU backend can run here (see `moetier doctor`)")
    spec = ctx.registry.backend(name)
    formats = args.format or (mb.QUICK_FORMATS if args.quick else mb.DEFAULT_FORMATS)
    missing = [f for f in formats if not spec.computes(f)]
    if args.format and missing:
        raise SettingError(f"backend {name} does not compute {', '.join(missing)}; it computes "
                           f"{', '.join(spec.formats)}")
    formats = tuple(f for f in formats if spec.computes(f))
    dims = mb.DIMS[args.dims]
    dims = replace(dims, layers=args.layers or (2 if args.quick else dims.layers),
                   experts=args.experts or dims.experts)
    config = mb.ModelBenchConfig(
        dims=dims, backend=name, formats=formats, threads=args.threads,
        prompt_tokens=args.prompt_tokens or (128 if args.quick else 512),
        new_tokens=args.new_tokens or (17 if args.quick else 65), repeats=args.repeats or (1 if args.quick else 3),
        transformers=not args.no_transformers, quick=args.quick,
        seed=args.seed, dense=args.dense, gguf_files=tuple(str(Path(f).resolve()) for f in args.gguf))
    if config.new_tokens < 2:
        raise SettingError("--new-tokens must be at least 2 (decode is timed from the first new token to the last)")
    console = make_console()
    errc = Console(stderr=True)
    folder = Path(args.model) if args.model else Path(tempfile.mkdtemp(prefix="moetier-bench-model-"))
    try:
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=errc,
                      transient=True) as progress:
            task = progress.add_task("starting")

            def status(text):
                progress.update(task, description=text)

            if (folder / "config.json").exists():
                config = replace(config, dims=mb.dims_from_config(dims, mb.checkpoint_dims(folder)))
            else:
                status(f"writing the synthetic checkpoint ({dims.layers} layers) to {folder}")
                folder.mkdir(parents=True, exist_ok=True)
                mb.write_model(folder, dims, registry=ctx.registry, seed=args.seed)
            result = mb.run_model_bench(config, folder, registry=ctx.registry, inventory=ctx.inventory, status=status)
            llama = []
            if llama_records:
                from ..family import load_layout

                layout = load_layout(folder, ctx.registry)
                llama = mb.llama_cpp_rows(llama_records, layout, result.dense_bf16_bytes,
                                          config.dims.vocab * config.dims.hidden)
    finally:
        if not args.model:
            shutil.rmtree(folder, ignore_errors=True)
    doc = mb.document(result, ctx.inventory, command=["moetier", *sys.argv[1:]], llama=llama)
    mb.print_report(doc, console)
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1))
        console.print(f"wrote {args.json}")
    if args.markdown:
        Path(args.markdown).write_text(mb.markdown_table(doc) + "\n")
        console.print(f"wrote {args.markdown}")
    failed = [r for r in result.rows if not r.check_ok]
    return 1 if failed else 0


RUNTIME_DESCRIPTION = """\
1. The tiered layer's overhead: the Qwen3-30B-A3B layer at decode in one shard against the same experts
in two CPU shards, timed alternately. 2. Decode through every MoE layer of a checkpoint with the
Qwen3-30B-A3B layer dimensions (FP8 experts) with half of each layer's experts left on disk behind a DRAM
cache, against every expert in DRAM: tokens/s, bytes read per token, hit rate, prefetch precision.
"""


def run_runtime(args) -> int:
    import json
    import shutil
    import tempfile
    from dataclasses import asdict
    from pathlib import Path

    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from ..bench.runtime import disk_decode, tiered_overhead, write_decode_checkpoint

    if args.json:
        check_writable(args.json, "JSON file")
    if not 0 < args.cache_share <= 1:
        raise SettingError(f"--cache-share must be in (0, 1], got {args.cache_share}")
    ctx = load_context(args)
    name = ctx.requested[0] if ctx.requested else ctx.selection.for_device("cpu")
    if name is None:
        raise MoetierError("no CPU backend can run here (see `moetier doctor`)")
    layers, tokens = (2, 8) if args.quick else (args.layers, args.tokens)
    console = Console()
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="moetier-bench-"))
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                  transient=True) as progress:
        task = progress.add_task("starting")

        def status(text):
            progress.update(task, description=text)

        backend = ctx.registry.backend(name).create(ctx.inventory)
        overhead = tiered_overhead(backend, seed=args.seed, quick=args.quick, status=status)
        del backend
        try:
            if not (workdir / "config.json").exists():
                write_decode_checkpoint(workdir, layers, args.seed, status)
            disk = disk_decode(workdir, name, layers=layers, tokens=tokens, cache_share=args.cache_share,
                               registry=ctx.registry, inventory=ctx.inventory, seed=args.seed, status=status)
        finally:
            if not args.workdir:
                shutil.rmtree(workdir, ignore_errors=True)
    console.print(f"[bold]Tiered layer overhead[/bold] (Qwen3-30B-A3B layer, {overhead.fmt}, batch {overhead.batch}, "
                  f"{name}, {overhead.threads} threads): one shard {overhead.single_s * 1e3:.3f} ms, two CPU shards "
                  f"{overhead.tiered_s * 1e3:.3f} ms per forward: {overhead.overhead:+.1%}")
    console.print(f"[bold]Half of the experts on disk[/bold] ({disk.layers} layers, {disk.tokens} tokens, cache "
                  f"{disk.cache_share:.0%} of the disk experts' bytes): {disk.disk_tok_s:.2f} tok/s against "
                  f"{disk.dram_tok_s:.2f} tok/s all in DRAM ({disk.disk_tok_s / disk.dram_tok_s:.0%}); "
                  f"{disk.bytes_read_per_token / 2**20:.1f} MiB read per token, hit rate {disk.hit_rate:.0%} "
                  f"(waits {disk.waits}, misses {disk.misses}), prefetch precision {disk.prefetch_precision:.0%}")
    if args.json:
        Path(args.json).write_text(json.dumps({"overhead": {**asdict(overhead), "overhead": overhead.overhead},
                                               "disk": asdict(disk)}, indent=2))
    return 0


HYBRID_DESCRIPTION = """\
The hybrid step (CPU experts started from the device stream by host functions while the device experts
compute) on the Qwen3-30B-A3B layer and DeepSeek-V3 experts, with 0-100% of the experts on the device:
the CPU part alone, the device part alone, both together (captured in a CUDA graph), overlap efficiency
= max(parts) / joint, the device part's expert bytes/s as a share of the device's memory bandwidth, and
what one host function costs. Needs a CUDA GPU; --cpu-stand-in runs the harness on the CPU only.
"""


def _shares(text: str):
    items = [x.strip() for x in text.split(",") if x.strip()]
    try:
        vals = tuple(float(x) for x in items)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in [0, 1], got {text!r}") from None
    if not vals or any(not 0.0 <= v <= 1.0 for v in vals):
        raise argparse.ArgumentTypeError(f"shares must be numbers in [0, 1], got {text!r}")
    return vals


def _gpu_problem() -> str | None:
    """Why this process cannot run the hybrid bench on a GPU (None: it can)."""
    import torch

    if getattr(torch.version, "cuda", None) is None and getattr(torch.version, "hip", None) is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return "torch sees no GPU"
    return None


def run_hybrid(args) -> int:
    import json
    import os
    from pathlib import Path

    import torch
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from ..bench.hybrid import BATCHES, SHAPES, SHARES, HybridBenchConfig, run_hybrid_bench

    if args.json:
        check_writable(args.json, "JSON file")
    if args.time_budget <= 0:
        raise SettingError(f"--time-budget must be positive, got {args.time_budget}")
    if args.max_weights_gib <= 0:
        raise SettingError(f"--max-weights-gib must be positive, got {args.max_weights_gib}")
    if not args.cpu_stand_in:
        problem = _gpu_problem()
        if problem:
            raise BackendUnavailable(f"bench hybrid needs a CUDA or ROCm GPU ({problem}); --cpu-stand-in runs the "
                                     "harness on the CPU, with numbers that mean nothing")
    ctx = load_context(args)
    name = ctx.requested[0] if ctx.requested else ctx.selection.for_device("cpu")
    if name is None:
        raise MoetierError("no CPU backend can run here (see `moetier doctor`)")
    threads = args.threads or max(1, ctx.inventory.cpu.physical_cores - 1)
    config = HybridBenchConfig(
        cpu_backend=name, device_backend="rocm" if getattr(torch.version, "hip", None) else "cuda",
        stand_in=args.cpu_stand_in, shapes=args.shapes or SHAPES, shares=args.shares or SHARES,
        batches=args.batches or BATCHES, fmt=args.format, graph=not args.eager, threads=threads, quick=args.quick,
        time_budget_s=args.time_budget, max_weight_bytes=int(args.max_weights_gib * GIB), seed=args.seed)

    def save(doc):
        if args.json:
            tmp = Path(args.json + ".tmp")
            tmp.write_text(json.dumps(doc, indent=1))
            os.replace(tmp, args.json)

    from ..bench.report import make_console

    console = make_console()
    if args.cpu_stand_in:
        console.print("[bold yellow]CPU stand-in:[/bold yellow] cpu.accel plays the GPU; these numbers test the "
                      "harness and mean nothing about a GPU.")
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                  transient=True) as progress:
        task = progress.add_task("starting")
        doc = run_hybrid_bench(config, ctx.registry, ctx.inventory,
                               status=lambda text: progress.update(task, description=text), on_update=save)
    _print_hybrid(doc, console)
    return 0


def _print_hybrid(doc: dict, console) -> None:
    from rich.table import Table

    hf = doc["host_functions"]
    line = (f"host functions ({doc['streams']}): enqueue+sync of an empty task {hf['ctypes_pair_us']:.1f} us "
            f"called through ctypes, {hf['host_thread_pair_us']:.1f} us through a native host-function thread")
    if "stream_pair_us" in hf:
        line += (f"; on the device: launch {hf['launch_us']:.1f} us, one host node {hf['stream_noop_us']:.1f} us, "
                 f"a pair {hf['stream_pair_us']:.1f} us on a stream, {hf['graph_pair_us']:.1f} us in a graph "
                 f"(one node {hf['graph_noop_us']:.1f} us)")
    console.print(line)
    if doc["bandwidth"]:
        bw = doc["bandwidth"]
        nominal = f"{bw['nominal_bytes_per_s'] / 1e9:.0f} GB/s nominal, " if bw["nominal_bytes_per_s"] else ""
        console.print(f"{bw['name']}: {nominal}{bw['copy_bytes_per_s'] / 1e9:.0f} GB/s device copy")
    cm = doc["cost_model"]
    console.print(f"cost model: {cm['note']}" + (f" (CPU {cm['cpu']}; device {cm['device']})" if cm["available"] else ""))

    def ms(v):
        return "-" if v is None else f"{v * 1e3:.3f}"

    def pct(v):
        return "-" if v is None else f"{v:.0%}"

    for shape in dict.fromkeys(r["shape"] for r in doc["rows"]):
        rows = [r for r in doc["rows"] if r["shape"] == shape]
        r0 = rows[0]
        t = Table(title=f"{shape}: {r0['num_experts']} experts, top-{r0['top_k']}, hidden {r0['hidden']}, "
                        f"intermediate {r0['intermediate']}, {r0['fmt']} ({doc['cpu_backend']} "
                        f"{doc['cpu_threads']} threads + {doc['device_backend']})")
        # dev: the device's experts; exact: the joint step equals the tiered layer's standard path.
        for col in ("on dev", "batch", "graph", "CPU ms", "dev ms", "joint ms", "predicted", "overlap", "dev GB/s",
                    "of BW", "exact"):
            t.add_column(col, justify="right")
        for r in rows:
            gbs = r["device_gb_per_s"]
            t.add_row(f"{r['share']:.0%}", str(r["batch"]), "yes" if r["graph"] else "no", ms(r["cpu_s"]),
                      ms(r["device_s"]), ms(r["joint_s"]), ms(r["predicted_s"]),
                      "-" if r["overlap"] is None else f"{r['overlap']:.2f}",
                      "-" if gbs is None else f"{gbs:.0f}", pct(r["device_bw_share"]),
                      "yes" if r["matches_standard_path"] else "NO")
        console.print(t)
    for g in doc["goals"]:
        console.print(f"goal: {g['goal']}: {g['value']:.2f} ({g['where']}) {'met' if g['met'] else 'NOT met'}")
    for s in doc["skipped"]:
        console.print(f"skipped {s['shape']} share {s['share']:.0%} batch {s['batch']}: {s['why']}")
    if doc["stand_in"]:
        console.print(f"[yellow]{doc['note']}[/yellow]")


class _RichProgress:
    def __init__(self, progress):
        self._p = progress
        self._task = None

    def start(self, total: int) -> None:
        self._task = self._p.add_task("measuring machine limits", total=total)

    def status(self, text: str) -> None:
        self._p.update(self._task, description=text)

    def advance(self, text: str) -> None:
        self._p.update(self._task, advance=1, description=text)


def run_cli(args) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..bench import report
    from ..bench.kernels import BenchConfig, run_kernel_bench
    from ..bench.workload import l3_bytes

    for path, what in ((args.json, "JSON file"), (args.markdown, "Markdown file")):
        if path:
            check_writable(path, what)
    if args.max_weights_gib <= 0:
        raise SettingError(f"--max-weights-gib must be positive, got {args.max_weights_gib}")
    ctx = load_context(args)
    inventory, registry = ctx.inventory, ctx.registry
    backends = ctx.requested or tuple(n for n in (ctx.selection.for_device("cpu"),) if n)
    if not backends:
        raise MoetierError("no CPU backend can run here (see `moetier doctor`)")
    preset = QUICK if args.quick else {}
    config = BenchConfig(
        shapes=args.shapes or preset.get("shapes", ("qwen3-30b", "deepseek-v3")),
        backends=backends,
        formats=args.formats or preset.get("formats"),
        batches=args.batches or preset.get("batches", (1, 4, 128, 512)),
        threads=args.threads or preset.get("threads", (1, 2)),
        baseline=not args.no_baseline,
        quick=args.quick,
        max_weight_bytes=int(args.max_weights_gib * GIB),
        l3_bytes=l3_bytes(),
        seed=args.seed,
    )
    peers, peer_records = [], []
    for path in args.peer or ():
        more, recs = report.load_peer_measurements(path)
        peers += more
        peer_records += recs
    console = report.make_console()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        result = run_kernel_bench(config, inventory, registry, _RichProgress(progress))
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.__dict__.items() if k != "plans"}
    doc = report.document(result, inventory, command=["moetier", *sys.argv[1:]], settings=settings,
                          peers=peers, peer_records=peer_records)
    report.print_report(doc, console)
    if args.json:
        report.write_json(doc, args.json)
        console.print(f"wrote {len(doc['records'])} records to {args.json}")
    if args.markdown:
        from pathlib import Path

        Path(args.markdown).write_text(report.markdown_report(doc) + "\n")
        console.print(f"wrote the Markdown report to {args.markdown}")
    return 0
