"""`moetier plan`: can this model run here, where does each part live, and how fast will it be?

Reads only a config (and a checkpoint's index and safetensors headers), or a zoo version's published
dimensions; prints the experts and bytes per tier for every MoE layer (consecutive layers with the same
placement share a row), the totals against each budget and the predicted prefill and decode tokens/s
with what bounds each layer. A model that does not fit exits 2 with the numbers.
"""
from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from ..errors import SettingError
from .options import add_backend_options, check_writable, load_context, named_model, non_negative_int, positive_int

MODEL_HELP = ("checkpoint folder (config.json, index and safetensors headers are read, never the weights), a "
              "config.json, or a model version with published dimensions (e.g. DeepSeek-V3, Qwen3-30B-A3B)")


def _size(what: str):
    def parse(text: str) -> int:
        from ..placement.sizes import parse_size
        try:
            return parse_size(text, what)
        except SettingError as exc:
            raise argparse.ArgumentTypeError(str(exc).split(": ", 1)[-1]) from None
    return parse


def _mix(text: str) -> float:
    """"D:P" token ratio -> the decode share D / (D + P)."""
    try:
        d, p = (float(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected DECODE:PREFILL token ratio like 1:4, got {text!r}") from None
    if d < 0 or p < 0 or d + p == 0:
        raise argparse.ArgumentTypeError(f"the ratio must be two non-negative numbers, not both 0, got {text!r}")
    return d / (d + p)


def register(sub) -> None:
    p = sub.add_parser("plan", help="place a model's experts on this machine's tiers and predict its speed",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("model", metavar="MODEL", nargs="?", help=MODEL_HELP)
    p.add_argument("--gpu-mem", type=_size("--gpu-mem"), metavar="SIZE",
                   help="memory per accelerator, e.g. 24GiB (default: detected; 0: CPU only; given without an "
                        "accelerator here, plans for one)")
    p.add_argument("--cpu-mem", type=_size("--cpu-mem"), metavar="SIZE",
                   help="DRAM moetier may use, split over the NUMA nodes (default: each node's memory less 5%%)")
    p.add_argument("--disk", action="store_true", help="leave the experts that do not fit in their checkpoint files, "
                                                        "read on demand through a DRAM cache")
    p.add_argument("--disk-cache", type=_size("--disk-cache"), metavar="SIZE",
                   help="DRAM for the disk tier's cache (default: 10%% of the CPU budget)")
    p.add_argument("--context", type=positive_int, metavar="N",
                   help="tokens of context per sequence: sizes the KV cache and the predicted prompt (default "
                        "4096, or the model's max_position_embeddings when that is smaller)")
    p.add_argument("--batch", type=positive_int, default=1, metavar="N",
                   help="sequences decoded at once (default 1)")
    p.add_argument("--strategy", metavar="NAME",
                   help="placement strategy (default: cost with --stats, else uniform); see --list-strategies")
    p.add_argument("--list-strategies", action="store_true", help="list the registered strategies and exit")
    p.add_argument("--stats", metavar="FILE",
                   help="activation statistics: moetier's .safetensors or an SGLang expert-distribution .pt dump")
    p.add_argument("--cpu-format", metavar="FMT",
                   help="format of CPU experts, converted on load, e.g. int4_g64 (default: as shipped)")
    p.add_argument("--cpu-copies", action="store_true",
                   help="also keep a CPU copy of every accelerator expert (hot-swap headroom; off by default)")
    p.add_argument("--min-per-layer", type=non_negative_int, metavar="N", help="frequency*, cost: at least N fast-tier experts "
                                                                     "per MoE layer")
    p.add_argument("--max-per-layer", type=non_negative_int, metavar="N", help="frequency*, cost: at most N fast-tier experts "
                                                                     "per MoE layer")
    p.add_argument("--seed", type=int, metavar="N", help="random: the seed (default 0)")
    p.add_argument("--rule", action="append", metavar="PATTERN=TIER",
                   help="explicit: layers.A-B.experts.C-D=TIER or REGEX=TIER over tensor names (repeatable)")
    p.add_argument("--rules", metavar="FILE", help="explicit: rules from a file, one per line (# comments)")
    p.add_argument("--mix", type=_mix, metavar="D:P",
                   help="cost: decode to prompt tokens of the workload (default 1:1)")
    p.add_argument("--speeds", metavar="BENCH.json",
                   help="CPU speeds from `moetier bench kernels --json`: its machine limits, and the rate each "
                        "format streamed at in decode (default: the limits measured now on this machine; assumed "
                        "from the inventory with --inventory)")
    p.add_argument("--threads", type=positive_int, metavar="N",
                   help="CPU threads the experts are computed on: the speeds are measured at N threads, and "
                        "--check-decode runs on N (default: the physical cores)")
    p.add_argument("--check-decode", type=positive_int, metavar="LAYERS",
                   help="also run decode through LAYERS random MoE layers of the model's shape on the CPU "
                        "backend and print it beside the prediction (CPU-only plans; predicted from fresh probes "
                        "around each round, or from --speeds)")
    p.add_argument("--json", metavar="PLAN.json", dest="json_out", help="write the plan (only when it fits)")
    p.add_argument("--png", metavar="FILE.png", help="draw the plan: layers x experts coloured by tier "
                                                     "(needs the extra `plot`)")
    add_backend_options(p, backend_help="CPU backend that computes the CPU experts (default: MOETIER_BACKEND, "
                                        "else the one `moetier doctor` chooses)")
    p.set_defaults(func=run)


_OPTION_FLAGS = {"min_per_layer": "--min-per-layer", "max_per_layer": "--max-per-layer", "seed": "--seed",
                 "rules": "--rule/--rules", "decode_share": "--mix"}


def run(args) -> int:
    from ..placement.budgets import default_context, make_budgets
    from ..placement.cost import predict
    from ..placement.models import resolve_model
    from ..placement.planner import fit_hint, make_plan, tier_compute
    from ..placement.rules import read_rules
    from ..placement.speeds import make_speeds
    from ..placement.stats import ActivationStats

    for path, what in ((args.json_out, "plan file"), (args.png, "picture")):
        if path:
            check_writable(path, what)
    if args.png:
        from ..placement.picture import require_matplotlib
        require_matplotlib()
    ctx = load_context(args)
    registry = ctx.registry
    if args.list_strategies:
        console = Console(width=160)
        for name in sorted(registry.placements):
            s = registry.placements[name]
            console.print(f"[bold]{name}[/bold]  {s.description}"
                          f"{'  [dim](needs --stats)[/dim]' if s.needs_stats else ''}")
        return 0
    if args.model is None:
        raise SettingError("name the MODEL to plan (a checkpoint folder, a config.json or a version such as "
                           "DeepSeek-V3)")
    info = resolve_model(named_model(args.model), registry)
    layout, parts = info.layout, info.parts
    if not layout.moe_layers:
        raise SettingError(f"{layout.version} has no MoE layer: nothing to place")
    stats = None
    if args.stats:
        m0 = layout.moe_layers[0].experts
        stats = ActivationStats.load(args.stats, layout.moe_layer_indices, num_hidden_layers=layout.num_hidden_layers,
                                     top_k=m0.top_k)
    strategy = registry.placement(args.strategy or ("cost" if stats is not None else "uniform"))
    options = {"min_per_layer": args.min_per_layer, "max_per_layer": args.max_per_layer, "seed": args.seed,
               "decode_share": args.mix}
    rules = list(args.rule or ())
    if args.rules:
        rules += read_rules(args.rules)
    options["rules"] = rules or None
    for key, value in options.items():
        if value is not None and key not in strategy.options:
            raise SettingError(f"{_OPTION_FLAGS[key]} does not apply to strategy {strategy.name!r} (it reads "
                               f"{', '.join(_OPTION_FLAGS[o] for o in strategy.options) or 'no options'})")
    cpu_backend = ctx.requested[0] if ctx.requested else ctx.selection.for_device("cpu")
    if cpu_backend is None:
        raise SettingError("no CPU backend can run here (see `moetier doctor`)")
    accel = {}
    for spec in sorted(registry.backends.values(), key=lambda s: s.name):
        if spec.device != "cpu":
            accel.setdefault(spec.device, ctx.selection.for_device(spec.device) or spec.name)
    context = args.context or default_context(info.config)
    budgets = make_budgets(parts, ctx.inventory, registry.tiers.values(), gpu_mem=args.gpu_mem, cpu_mem=args.cpu_mem,
                           disk=args.disk, disk_cache=args.disk_cache, context=context, batch=args.batch)
    compute = tier_compute(layout, budgets, cpu_backend=cpu_backend, cpu_formats=registry.backend(cpu_backend).formats,
                           cpu_mixed=registry.backend(cpu_backend).mixed_formats,
                           accelerator_backends=accel, cpu_format=args.cpu_format)
    measure = not args.speeds and args.inventory is None and ctx.inventory.source == "detected"
    speeds = make_speeds(budgets, ctx.inventory, measure=measure, bench_file=args.speeds, threads=args.threads,
                         cpu_backend=cpu_backend)
    plan = make_plan(layout, parts, budgets, strategy, compute, stats=stats, speeds=speeds, options=options,
                     cpu_copies=args.cpu_copies, check=False, notes=(f"model: {info.source}",))
    prediction = predict(plan, parts, speeds, stats)
    console = Console(width=150)
    print_plan(console, plan, info, prediction, speeds)
    plan.check_budgets(hint=fit_hint(layout, parts, budgets, compute))  # exits 2 with the numbers
    if args.check_decode:
        _check_decode(console, args, ctx, plan, parts, stats, speeds)
    if args.json_out:
        plan.save(args.json_out)
        console.print(f"wrote the plan to {args.json_out}")
    if args.png:
        from ..placement.picture import save_png
        save_png(plan, args.png, stats)
        console.print(f"drew the plan to {args.png}")
    return 0


def _check_decode(console, args, ctx, plan, parts, stats, speeds) -> None:
    import statistics

    from ..placement.check import check_decode, same_cpus

    threads = args.threads or max(1, ctx.inventory.cpu.physical_cores)
    with same_cpus(threads), console.status("decode check") as status:
        backend = ctx.registry.backend(plan.shards(plan.moe_layers[0])[0].backend).create(ctx.inventory,
                                                                                          threads=threads)
        rounds = check_decode(plan, parts, backend, ctx.inventory, stats=stats, layers=args.check_decode,
                              batch=args.batch, speeds=speeds if args.speeds else None, progress=status.update)
    for k, r in enumerate(rounds, 1):
        console.print(f"decode check round {k}: read {r.read_gb_per_s:.1f} GB/s, predicted "
                      f"{r.predicted_s * 1e3:.3f} ms per MoE layer, measured {r.measured_s * 1e3:.3f} ms (median; "
                      f"mean {r.mean_s * 1e3:.3f}): error {r.error:+.0%}")
    med = lambda xs: statistics.median(xs)  # noqa: E731
    console.print(f"decode check ({len(rounds)} rounds, {args.check_decode} random MoE layers cycled, batch "
                  f"{args.batch}, {backend.name}): median predicted {med([r.predicted_s for r in rounds]) * 1e3:.3f} "
                  f"ms, measured {med([r.measured_s for r in rounds]) * 1e3:.3f} ms per MoE layer; median error "
                  f"{med([r.error for r in rounds]):+.0%}")


def _gb(n: float) -> str:
    from ..placement.sizes import format_size
    return format_size(n)


def _shipped(quantization) -> str:
    """"q4_k", or per format the MoE layers a file stores in it: "q4_k (layers 1-3), q4_k+q6_k (layers 0, 4)"."""
    from ..placement.plan import compact_ids

    if len({f for _, f in quantization.layers} | {quantization.fmt}) == 1:
        return quantization.fmt
    by_fmt: dict[str, list[int]] = {}
    for i, f in quantization.layers:
        by_fmt.setdefault(f or "a type moetier has no format for", []).append(i)
    return ", ".join(f"{f} (layer{'s' if len(ids) > 1 else ''} {compact_ids(ids)})" for f, ids in by_fmt.items())


def print_plan(console: Console, plan, info, prediction, speeds) -> None:
    lay = info.layout
    m0 = lay.moe_layers[0].experts
    console.print(f"[bold]{lay.version}[/bold] ({lay.family}), {info.source}: {lay.num_hidden_layers} layers "
                  f"({len(lay.moe_layers)} MoE x {m0.num_experts} experts, top {m0.top_k}), hidden {lay.hidden_size}, "
                  f"shipped {_shipped(lay.quantization)}")
    computes: dict[str, dict[str, str]] = {}
    for i in plan.moe_layers:
        for s in plan.shards(i):
            computes.setdefault(s.tier, {})[s.fmt] = s.backend
    computes = {t: ", ".join(f"{f} on {b}" for f, b in computes[t].items()) for t in plan.tier_names if t in computes}
    console.print(f"strategy {plan.strategy}; {plan.batch} sequence(s) x {plan.context} tokens of context; "
                  + "; ".join(f"{t}: {c}" for t, c in computes.items()))
    tiers = list(plan.tier_names)
    usage = plan.usage()
    table = Table(title="tiers", title_justify="left")
    for col in ("tier", "capacity", "reserved (non-expert parts, cache, headroom)", "experts", "used", "of capacity"):
        table.add_column(col, justify="right" if col not in ("tier", "reserved (non-expert parts, cache, headroom)")
                         else "left", overflow="fold")
    for t in plan.tiers:
        reserved = ", ".join(f"{w} {_gb(b)}" for w, b in t.reserved) or "-"
        used = sum(b for _, b in usage.get(t.name, ()))
        n = plan.expert_count(t.name)
        expert_bytes = sum(plan.layer_bytes(i).get(t.name, 0) for i in plan.moe_layers)
        cap = "files" if t.capacity_bytes is None else _gb(t.capacity_bytes)
        pct = "-" if not t.capacity_bytes else f"{used / t.capacity_bytes:.0%}"
        style = "red" if t.capacity_bytes is not None and used > t.capacity_bytes else ""
        table.add_row(f"{t.name} ({t.source})", cap, reserved, f"{n:,} ({_gb(expert_bytes)})", _gb(used),
                      f"[{style}]{pct}[/{style}]" if style else pct)
    console.print(table)

    lt = Table(title="MoE layers (consecutive layers alike share a row)", title_justify="left")
    lt.add_column("layers", justify="right")
    for t in tiers:
        lt.add_column(t, justify="right")
    for col in ("decode ms", "decode bound", "prefill ms", "prefill bound"):
        lt.add_column(col, justify="right" if "ms" in col else "left")
    costs = {c.layer: c for c in prediction.layers}
    rows, prev = [], None
    for i in plan.moe_layers:
        counts = {s.tier: len(s.experts) for s in plan.shards(i)}
        nbytes = plan.layer_bytes(i)
        c = costs[i]
        key = (tuple(counts.get(t, 0) for t in tiers), c.decode_bound, c.prefill_bound,
               round(c.decode_s * 1e4), round(c.prefill_s * 1e2))
        cells = [f"{counts[t]} ({_gb(nbytes[t])})" if counts.get(t) else "-" for t in tiers]
        if prev is not None and prev[0] == key:
            prev[1][1] = i
            continue
        prev = (key, [i, i, cells, c])
        rows.append(prev)
    for _, (first, last, cells, c) in rows:
        lt.add_row(str(first) if first == last else f"{first}-{last}", *cells, f"{c.decode_s * 1e3:.2f}",
                   c.decode_bound, f"{c.prefill_s * 1e3:.1f}", c.prefill_bound)
    console.print(lt)

    def bounds(which: str) -> str:
        b = prediction.bounds(which)
        return ", ".join(f"{k} in {v} of {len(prediction.layers)} layers" for k, v in b.items())

    console.print(f"predicted decode  [bold]{prediction.decode_tokens_per_s:,.1f} tokens/s[/bold] "
                  f"({plan.batch} sequence(s), {prediction.decode_step_s * 1e3:,.1f} ms per step); bound by "
                  f"{bounds('decode')}")
    console.print(f"predicted prefill [bold]{prediction.prefill_tokens_per_s:,.1f} tokens/s[/bold] "
                  f"(a {prediction.prompt_tokens}-token prompt in {prediction.prefill_s:,.2f} s); bound by "
                  f"{bounds('prefill')}")
    for t in tiers:
        console.print(f"[dim]speed {t}: {speeds.of(t).source}[/dim]")
    for note in prediction.notes + plan.notes:
        console.print(f"[dim]assumed: {note}[/dim]" if not note.startswith("model:") else f"[dim]{note}[/dim]")

