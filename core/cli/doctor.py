"""`moetier doctor`: what this machine has, every backend's verdict, and the choice per device kind."""
from __future__ import annotations

import json
from dataclasses import asdict

from rich.console import Console
from rich.table import Table

from ..hardware.inventory import HardwareInventory
from ..plugins import Registry
from ..selection import Selection
from .options import add_backend_options, check_writable, load_context


def register(sub) -> None:
    p = sub.add_parser("doctor", help="show the hardware, every backend with its score and reason, the choice per device")
    add_backend_options(p)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of the tables")
    p.add_argument("--save-inventory", metavar="FILE.json",
                   help="also write the hardware inventory to this file (reusable with --inventory)")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.save_inventory:
        check_writable(args.save_inventory, "inventory file")
    ctx = load_context(args)
    if args.save_inventory:
        ctx.inventory.save(args.save_inventory)
    if args.json:
        print(json.dumps(report_dict(ctx.inventory, ctx.registry, ctx.selection), indent=2))
    else:
        print_report(ctx.inventory, ctx.registry, ctx.selection)
    return 0


def report_dict(inventory: HardwareInventory, registry: Registry, selection: Selection) -> dict:
    return {
        "inventory": inventory.to_dict(),
        "backends": [
            {"name": v.name, "device": v.device, "score": v.probe.score, "reason": v.probe.reason,
             "chosen": v.chosen, "forced": v.forced, "formats": list(v.formats)}
            for v in selection.verdicts
        ],
        "chosen": selection.chosen,
        "plugins": [asdict(p) for p in registry.plugins],
        "plugins_failed": [asdict(f) for f in registry.failed],
        "plugins_skipped": [asdict(p) for p in registry.skipped],
        "families": sorted(registry.families),
    }


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def print_report(inventory: HardwareInventory, registry: Registry, selection: Selection,
                 console: Console | None = None) -> None:
    console = console or Console()
    cpu = inventory.cpu
    console.print(f"[bold]CPU[/bold]      {cpu.model} ({cpu.vendor}, {cpu.arch}), "
                  f"{cpu.physical_cores} physical / {cpu.logical_cores} logical cores")
    console.print(f"[bold]ISA[/bold]      {' '.join(cpu.features) or '(none)'}")
    for note in cpu.notes:
        console.print(f"         [dim]{note}[/dim]")
    console.print(f"[bold]Memory[/bold]   {_gib(inventory.dram_total_bytes)} total, "
                  f"{_gib(inventory.dram_available_bytes)} available")
    for n in inventory.numa_nodes:
        console.print(f"[bold]NUMA {n.id}[/bold]   cpus {_cpulist(n.cpus)}, {_gib(n.memory_total_bytes)}")
    if inventory.accelerators:
        for a in inventory.accelerators:
            cap = f", {a.capability}" if a.capability else ""
            console.print(f"[bold]{a.kind.upper()} {a.index}[/bold]   {a.name}, {_gib(a.memory_bytes)}{cap}")
    else:
        console.print("[bold]Accel.[/bold]   none")
    for note in inventory.notes:
        console.print(f"         [dim]{note}[/dim]")
    if inventory.source != "detected":
        console.print(f"[yellow]inventory read from {inventory.source}, not detected[/yellow]")

    table = Table(title="Backends", title_justify="left")
    for col in ("backend", "device", "score", "chosen", "reason"):
        table.add_column(col)
    for v in sorted(selection.verdicts, key=lambda v: (v.device, -v.probe.score, v.name)):
        mark = "[green]yes[/green]" + (" (forced)" if v.forced else "") if v.chosen else ""
        table.add_row(v.name, v.device, str(v.probe.score), mark, v.probe.reason)
    console.print(table)
    chosen = ", ".join(f"{dev}: {name}" for dev, name in sorted(selection.chosen.items())) or "none"
    console.print(f"[bold]Chosen[/bold]   {chosen}")
    console.print(f"[bold]Plugins[/bold]  {', '.join(p.name + ('' if p.builtin else f' ({p.distribution})') for p in registry.plugins)}")
    if registry.families:
        console.print(f"[bold]Families[/bold] {', '.join(sorted(registry.families))}")
    for f in registry.failed:
        console.print(f"[red]plugin {f.name} ({f.distribution}) failed to import: {f.error}[/red]")
    for p in registry.skipped:
        console.print(f"[dim]plugin {p.name} ({p.distribution}) skipped by the plugin allow-list[/dim]")


def _cpulist(cpus) -> str:
    cpus = sorted(cpus)
    if not cpus:
        return "-"
    ranges, start, prev = [], cpus[0], cpus[0]
    for c in cpus[1:] + [None]:
        if c is not None and c == prev + 1:
            prev = c
            continue
        ranges.append(f"{start}-{prev}" if prev != start else f"{start}")
        if c is not None:
            start = prev = c
    return ",".join(ranges)
