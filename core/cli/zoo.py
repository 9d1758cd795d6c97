"""`moetier zoo`: the model families plugins registered, tiny checkpoints in their real layouts, a
checkpoint's layout, and every MoE layer of a checkpoint run against float64."""
from __future__ import annotations

import json
import os
import shutil
import tempfile

from rich.console import Console
from rich.table import Table

from ..errors import LayoutError, SettingError
from .options import add_backend_options, add_plugin_option, load_context, named_model, positive_int

MODEL_HELP = ("checkpoint folder (with config.json and safetensors), its config.json, a .gguf file, or `default` "
              "for the built-in default model")


def register(sub) -> None:
    p = sub.add_parser("zoo", help="model families: list them, write tiny checkpoints, show or run a checkpoint")
    zsub = p.add_subparsers(dest="zoo_command", required=True, metavar="ZOO_COMMAND")

    q = zsub.add_parser("list", help="families and the versions they claim")
    q.add_argument("--json", action="store_true", help="print machine-readable JSON")
    add_plugin_option(q)
    q.set_defaults(func=run_list)

    q = zsub.add_parser("tiny", help="write a small random checkpoint in a family's real on-disk layout")
    q.add_argument("family", help="model family (see `moetier zoo list`), e.g. qwen or deepseek")
    q.add_argument("out_dir", help="folder to write; it must not exist yet, or be empty")
    q.add_argument("--version", help="model version (default: the family's first); see `moetier zoo list`")
    q.add_argument("--quant", choices=("fp8", "int4", "none", "default"), default="default",
                   help="quantize: fp8 (128x128 blocks) or int4 (compressed-tensors, routed experts); "
                        "default: what the version ships")
    q.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    q.add_argument("--json", action="store_true", help="print the written layout as JSON")
    add_plugin_option(q)
    q.set_defaults(func=run_tiny)

    q = zsub.add_parser("show", help="the MoE layout moetier reads from a checkpoint, and its files checked")
    q.add_argument("path", metavar="MODEL", help=MODEL_HELP)
    q.add_argument("--verify", action="store_true",
                   help="also check every MoE tensor's presence, shape and dtype (from the headers)")
    q.add_argument("--json", action="store_true", help="print machine-readable JSON")
    add_plugin_option(q)
    q.set_defaults(func=run_show)

    q = zsub.add_parser("run", help="run every MoE layer of a checkpoint on a backend, checked against float64")
    q.add_argument("path", metavar="MODEL", help=MODEL_HELP)
    add_backend_options(q, backend_help="backend to run on (default: MOETIER_BACKEND, else the CPU backend "
                                        "`moetier doctor` chooses)")
    q.add_argument("--format", help="weight format to compute in (default: the checkpoint's, if the backend has it, "
                                    "else bf16)")
    q.add_argument("--plan", metavar="PLAN.json",
                   help="compute each expert where this placement plan puts it (from `moetier plan --json`); "
                        "the plan names the backends and formats, so --backend and --format do not apply")
    q.add_argument("--tokens", type=positive_int, default=16, help="random tokens per layer (default 16)")
    q.add_argument("--seed", type=int, default=0, help="seed of the random tokens (default 0)")
    q.set_defaults(func=run_layers)


def _registry(args):
    from ..plugins import load_registry
    return load_registry(no_plugins=args.no_plugins)


def run_list(args) -> int:
    registry = _registry(args)
    dists = {p.name: p.distribution for p in registry.plugins}
    rows = []
    for name in sorted(registry.families):
        fam = registry.families[name]
        plugin = registry.owners.get(("family", name), "?")
        rows.append({"family": name, "versions": list(fam.versions), "description": fam.description,
                     "plugin": plugin, "distribution": dists.get(plugin, "?"), "tiny": fam.tiny is not None})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(title="moetier model families")
    for col in ("family", "versions", "from", "description"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["family"], ", ".join(r["versions"]), f"{r['plugin']} ({r['distribution']})", r["description"])
    Console(width=160).print(table)
    return 0


def run_tiny(args) -> int:
    registry = _registry(args)
    fam = registry.family(args.family)
    if fam.tiny is None:
        raise LayoutError(f"family {fam.name!r} does not write tiny checkpoints")
    version = args.version or fam.versions[0]
    if version not in fam.versions:
        raise LayoutError(f"family {fam.name!r} has no version {version!r}; versions: {', '.join(fam.versions)}")
    out = os.path.abspath(args.out_dir)
    if os.path.exists(out) and not os.path.isdir(out):
        raise SettingError(f"{args.out_dir} exists and is not a folder; name a new folder")
    if os.path.isdir(out) and os.listdir(out):
        raise SettingError(f"{args.out_dir} is not empty; name a new or empty folder (nothing is overwritten)")
    parent = os.path.dirname(out)
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise SettingError(f"cannot write {args.out_dir}: {parent} is not a folder")
    os.makedirs(parent, exist_ok=True)
    quant = None if args.quant == "none" else args.quant
    # Written next to its destination and renamed at the end: an interrupted run leaves nothing half-written.
    staging = tempfile.mkdtemp(prefix=".moetier-tiny-", dir=parent)
    try:
        try:
            layout = fam.tiny(version, staging, quant=quant, seed=args.seed)
        except ModuleNotFoundError as exc:
            # Tiny checkpoints take their non-MoE tensors from transformers' own model classes.
            raise SettingError(f"{exc}; install transformers (pip install 'moetier[hf]')") from None
        if os.path.isdir(out):
            os.rmdir(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    summary = layout.summary()
    if args.json:
        print(json.dumps({"wrote": args.out_dir, **summary}, indent=2))
        return 0
    console = Console(soft_wrap=True)
    console.print(f"wrote a tiny random [bold]{summary['version']}[/bold] ({summary['family']}) to {args.out_dir}")
    _print_summary(console, summary)
    return 0


def _print_summary(console: Console, s: dict) -> None:
    dense = f", dense: {', '.join(map(str, s['dense_layers']))}" if s["dense_layers"] else ""
    console.print(f"  layers        {s['layers']} ({s['moe_layers']} MoE{dense}), hidden {s['hidden']}")
    if "experts" in s:
        console.print(f"  experts       {s['experts']} per MoE layer, top {s['top_k']}, width {s['expert_intermediate']}"
                      f"{', fused on disk' if s.get('fused') else ''}")
        console.print(f"  router        {s['router']}")
        console.print(f"  shared        {s['shared'] or 'none'}")
    console.print(f"  quantization  {s['quantization']}")
    if s["skipped"]:
        console.print(f"  not run       {', '.join(s['skipped'])}")


def run_show(args) -> int:
    args.path = named_model(args.path)
    from ..checkpoint import Checkpoint
    from ..checkpoint.experts import verify_checkpoint
    from ..checkpoint.gguf import is_gguf
    from ..family import load_layout

    if is_gguf(args.path):  # a GGUF file: layout from its metadata (moetier.runtime.gguf_model)
        from ..runtime.gguf_model import show_gguf
        out = show_gguf(args.path, _registry(args), verify=args.verify)
        if args.json:
            print(json.dumps(out, indent=2))
            return 0
        console = Console()
        console.print(f"[bold]{out['version']}[/bold] ({out['family']}) at {args.path}: GGUF, "
                      f"architecture {out['gguf_architecture']}")
        _print_summary(console, out)
        if args.verify:
            console.print(f"  verified      {out['verified_matrices']} expert tensors present with the shapes "
                          "the metadata gives")
        return 0
    layout = load_layout(args.path, _registry(args))
    out = layout.summary()
    with Checkpoint(args.path) as ckpt:
        tensors = ckpt.verify_files()  # every shard's header against its size: cheap, always done
        out["files"] = {"shards": len(ckpt.files), "tensors": tensors, "bytes": ckpt.total_bytes}
        if args.verify:
            report = verify_checkpoint(ckpt, layout)
            out["verified_matrices"] = report.matrices
            out["dtype_differs"] = [{"tensor": d.name, "stored": d.stored, "declared": d.declared}
                                    for d in report.differs]
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    console = Console(soft_wrap=True)
    console.print(f"[bold]{out['version']}[/bold] ({out['family']}) at {args.path}")
    _print_summary(console, out)
    f = out["files"]
    console.print(f"  files         {f['shards']} safetensors file(s), {f['tensors']} tensors, "
                  f"{f['bytes'] / 2**20:.1f} MiB: every header checked against its file's size")
    if not args.verify:
        console.print("  [dim]not verified: which MoE tensors exist, their shapes and dtypes (use --verify)[/dim]")
        return 0
    console.print(f"  verified      {out['verified_matrices']} MoE matrices present with the shapes the config gives")
    differs = out["dtype_differs"]
    if differs:
        console.print(f"  [yellow]{len(differs)} tensor(s) stored in another format than the declared "
                      f"{layout.quantization.fmt} (they are computed, converted on load):[/yellow]")
        for d in differs[:20]:
            console.print(f"    {d['tensor']}: {d['stored']}")
        if len(differs) > 20:
            console.print(f"    ... and {len(differs) - 20} more (see --json)")
    else:
        console.print(f"  dtypes        every MoE matrix stored as the declared {layout.quantization.fmt}")
    return 0


def run_layers(args) -> int:
    args.path = named_model(args.path)
    from ..checkpoint.gguf import is_gguf
    from ..runtime.gguf_model import run_gguf
    from ..runtime.layer_check import run_checkpoint, run_with_plan

    ctx = load_context(args)
    if args.plan is not None:
        from ..placement.plan import PlacementPlan

        if args.backend or args.format:
            raise SettingError("--plan names the backend and format of every expert; drop --backend/--format")
        if is_gguf(args.path):
            raise SettingError("--plan runs safetensors checkpoints; a GGUF file runs on one backend")
        plan = PlacementPlan.load(args.plan)
        results = run_with_plan(args.path, plan, tokens=args.tokens, seed=args.seed, registry=ctx.registry,
                                inventory=ctx.inventory)
        return _print_layers(results, f"{args.path} placed by {args.plan}, {args.tokens} random tokens per layer")
    if len(ctx.requested) > 1:
        raise SettingError(f"zoo run computes on one backend; {len(ctx.requested)} were named: "
                           f"{', '.join(ctx.requested)}")
    name = ctx.requested[0] if ctx.requested else ctx.selection.for_device("cpu")
    if name is None:
        raise SettingError("no CPU backend can run here (see `moetier doctor`)")
    backend = ctx.registry.backend(name).create(ctx.inventory)
    if args.format is not None and not backend.computes(args.format):
        raise SettingError(f"backend {name} does not compute format {args.format!r}; it computes "
                           f"{', '.join(backend.formats)}")
    run = run_gguf if is_gguf(args.path) else run_checkpoint
    results = run(args.path, backend, tokens=args.tokens, fmt=args.format, seed=args.seed, registry=ctx.registry)
    return _print_layers(results, f"{args.path} on {name}, {args.tokens} random tokens per layer")


def _print_layers(results, title: str) -> int:
    table = Table(title=title, title_justify="left")
    for col in ("layer", "experts", "format", "prepare s", "forward ms", "rel. error vs float64", "bound"):
        table.add_column(col, justify="right")
    for r in results:
        err = f"{r.rel_error:.2e}" if r.ok else f"[red]{r.rel_error:.2e}[/red]"
        table.add_row(str(r.layer), str(r.experts), r.fmt, f"{r.prepare_s:.2f}", f"{r.forward_s * 1e3:.2f}", err,
                      f"{r.tolerance:g}")
    console = Console(soft_wrap=True)
    console.print(table)
    console.print("[dim]prepare s: reading the layer's experts and packing them for the backend; forward ms: the "
                  "routed experts on those tokens; bound: the largest relative error the format allows "
                  "(`moetier conformance` uses the same bounds)[/dim]")
    bad = [r.layer for r in results if not r.ok]
    if not results:
        console.print("[red]FAILED[/red]: the checkpoint has no MoE layer to run")
        return 1
    if bad:
        console.print(f"[red]FAILED[/red]: layers {bad} exceed their error bound")
        return 1
    console.print(f"[green]OK[/green]: {len(results)} MoE layers match the float64 reference")
    return 0
