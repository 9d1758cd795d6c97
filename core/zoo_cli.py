"""`moetier zoo`: the model families plugins registered, tiny checkpoints in their real layouts, and a
checkpoint's layout."""
from __future__ import annotations

import json
import sys

from .errors import LayoutError


def register(sub) -> None:
    p = sub.add_parser("zoo", help="model families: list them, write tiny checkpoints, show a checkpoint's layout")
    zsub = p.add_subparsers(dest="zoo_command", required=True, metavar="ZOO_COMMAND")

    q = zsub.add_parser("list", help="families and the versions they claim")
    q.add_argument("--json", action="store_true", help="print machine-readable JSON")
    q.add_argument("--no-plugins", action="store_true", help="load only moetier's own plugins")
    q.set_defaults(func=_cmd_list)

    q = zsub.add_parser("tiny", help="write a small random checkpoint in a family's real on-disk layout")
    q.add_argument("family")
    q.add_argument("out_dir")
    q.add_argument("--version", help="model version (default: the family's first); see `moetier zoo list`")
    q.add_argument("--quant", choices=("fp8", "int4", "none", "default"), default="default",
                   help="quantize: fp8 (128x128 blocks) or int4 (compressed-tensors, routed experts); "
                        "default: what the version ships")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--no-plugins", action="store_true", help="load only moetier's own plugins")
    q.set_defaults(func=_cmd_tiny)

    q = zsub.add_parser("show", help="the MoE layout moetier reads from a checkpoint directory")
    q.add_argument("path", help="checkpoint directory (with config.json), a config.json, or a .gguf file")
    q.add_argument("--verify", action="store_true", help="also check every MoE tensor's presence and shape")
    q.add_argument("--no-plugins", action="store_true", help="load only moetier's own plugins")
    q.set_defaults(func=_cmd_show)

    q = zsub.add_parser("run", help="run every MoE layer of a checkpoint on a backend, checked against float64")
    q.add_argument("path", help="checkpoint directory (with config.json) or a .gguf file")
    q.add_argument("--backend", help="backend to run on (default: the one chosen for the CPU)")
    q.add_argument("--format", help="weight format to compute in (default: the checkpoint's, if the backend has it)")
    q.add_argument("--tokens", type=int, default=16, help="random tokens per layer (default 16)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--inventory", metavar="FILE.json", help="use a recorded hardware inventory")
    q.add_argument("--no-plugins", action="store_true", help="load only moetier's own plugins")
    q.set_defaults(func=_cmd_run)


def _registry(args):
    from .plugins import load_registry
    return load_registry(no_plugins=args.no_plugins)


def _cmd_list(args) -> int:
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
    from rich.console import Console
    from rich.table import Table

    table = Table(title="moetier model families")
    for col in ("family", "versions", "from", "description"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["family"], ", ".join(r["versions"]), f"{r['plugin']} ({r['distribution']})", r["description"])
    Console(width=160).print(table)
    return 0


def _cmd_tiny(args) -> int:
    registry = _registry(args)
    fam = registry.family(args.family)
    if fam.tiny is None:
        raise LayoutError(f"family {fam.name!r} does not write tiny checkpoints")
    version = args.version or fam.versions[0]
    if version not in fam.versions:
        raise LayoutError(f"family {fam.name!r} has no version {version!r}; versions: {', '.join(fam.versions)}")
    quant = None if args.quant == "none" else args.quant
    try:
        layout = fam.tiny(version, args.out_dir, quant=quant, seed=args.seed)
    except ModuleNotFoundError as exc:
        # Tiny checkpoints take their non-MoE tensors from transformers' own model classes.
        print(f"moetier zoo tiny: error: {exc}; install transformers (pip install 'moetier[hf]')", file=sys.stderr)
        return 2
    print(json.dumps({"wrote": args.out_dir, **layout.summary()}, indent=2))
    return 0


def _cmd_show(args) -> int:
    from .checkpoint.gguf import is_gguf
    from .family import load_layout

    if is_gguf(args.path):
        from .gguf_model import show_gguf
        print(json.dumps(show_gguf(args.path, _registry(args), verify=args.verify), indent=2))
        return 0

    layout = load_layout(args.path, _registry(args))
    out = layout.summary()
    if args.verify:
        from .checkpoint import Checkpoint
        from .moe_block import verify_checkpoint

        with Checkpoint(args.path) as ckpt:
            out["verified_matrices"] = verify_checkpoint(ckpt, layout)
    print(json.dumps(out, indent=2))
    return 0


def _cmd_run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from .conformance.runner import instantiate
    from .hardware import load_inventory
    from .selection import select_backends
    from .zoo_run import run_checkpoint

    registry = _registry(args)
    inventory = load_inventory(args.inventory)
    name = args.backend or select_backends(registry, inventory, force=[]).for_device("cpu")
    backend, why = instantiate(name, registry, inventory)
    if backend is None:
        print(f"moetier zoo run: error: backend {name}: {why}", file=sys.stderr)
        return 2
    from .checkpoint.gguf import is_gguf
    from .gguf_model import run_gguf
    run = run_gguf if is_gguf(args.path) else run_checkpoint
    results = run(args.path, backend, tokens=args.tokens, fmt=args.format, seed=args.seed, registry=registry)
    table = Table(title=f"{args.path} on {name}, {args.tokens} tokens per layer", title_justify="left")
    for col in ("layer", "experts", "format", "prepare s", "forward ms", "rel. error vs float64", "bound"):
        table.add_column(col, justify="right")
    for r in results:
        err = f"{r.rel_error:.2e}" if r.ok else f"[red]{r.rel_error:.2e}[/red]"
        table.add_row(str(r.layer), str(r.experts), r.fmt, f"{r.prepare_s:.2f}", f"{r.forward_s * 1e3:.2f}", err,
                      f"{r.tolerance:g}")
    console = Console()
    console.print(table)
    bad = [r.layer for r in results if not r.ok]
    if bad or not results:
        console.print(f"[red]FAILED[/red]: layers {bad} exceed their error bound" if bad else "[red]no MoE layer ran[/red]")
        return 1
    console.print(f"[green]OK[/green]: {len(results)} MoE layers match the float64 reference")
    return 0
