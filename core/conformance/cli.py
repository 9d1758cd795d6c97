"""`moetier conformance`: run the suite on backends and print (and save) the per-format report."""
from __future__ import annotations

import sys

from rich.console import Console
from rich.table import Table


def register(sub, common):
    p = sub.add_parser("conformance", help="run the backend conformance suite (default: the backend chosen for each device)")
    p.add_argument("--backend", action="append", metavar="NAME", help="backend to test (repeatable)")
    p.add_argument("--all", action="store_true", help="test every backend that can run on this host")
    p.add_argument("--format", action="append", metavar="FMT", dest="formats", help="only this weight format (repeatable)")
    p.add_argument("--seed", type=int, help="reproduce a run (the report prints its seed)")
    p.add_argument("--report", metavar="FILE.json", help="write the full report as JSON")
    p.add_argument("--inventory", metavar="FILE.json", help="use a recorded hardware inventory")
    p.add_argument("--no-plugins", action="store_true", help="load only moetier's own plugins")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..hardware import load_inventory
    from ..plugins import load_registry
    from .runner import run_suite, runnable_backends

    console = Console(stderr=False)
    inventory = load_inventory(args.inventory)
    registry = load_registry(no_plugins=args.no_plugins)
    if args.backend:
        names = args.backend
    elif args.all:
        names = runnable_backends(registry, inventory)
    else:
        from ..selection import select_backends
        names = sorted(select_backends(registry, inventory, force=[]).chosen.values())
    if not names:
        console.print("[red]no backend can run on this host; nothing to test[/red]")
        return 1
    progress = None
    if not args.quiet:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
        from .cases import build_cases

        bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=Console(stderr=True),
                       transient=True)
        totals = {}
        for n in names:
            spec = registry.backends.get(n)
            fmts = tuple(f for f in (args.formats or spec.formats if spec else ()) if spec and f in spec.formats)
            totals[n] = len(build_cases(fmts))
        tasks = {}
        bar.start()

        def progress(result):
            if result.backend not in tasks:
                tasks[result.backend] = bar.add_task(result.backend, total=totals.get(result.backend))
            bar.advance(tasks[result.backend])
    try:
        report = run_suite(names, registry=registry, inventory=inventory, seed=args.seed, formats=args.formats,
                           progress=progress)
    finally:
        if progress is not None:
            bar.stop()
    print_report(report, console)
    if args.report:
        report.save(args.report)
        console.print(f"report written to {args.report}")
    return 0 if report.ok else 1


def print_report(report, console: Console) -> None:
    table = Table(title=f"Conformance (seed {report.seed})", title_justify="left")
    for col in ("backend", "format", "run", "passed", "failed", "skipped", "max rel. error"):
        table.add_column(col, justify="right" if col not in ("backend", "format") else "left")
    worst = {}
    for r in report.results:
        if r.rel_error is not None:
            key = (r.backend, r.fmt)
            worst[key] = max(worst.get(key, 0.0), r.rel_error)
    for backend, per_fmt in report.summary().items():
        for fmt, s in per_fmt.items():
            failed = f"[red]{s['failed']}[/red]" if s["failed"] else "0"
            table.add_row(backend, fmt, str(s["run"]), str(s["passed"]), failed, str(s["skipped"]),
                          f"{worst.get((backend, fmt), 0.0):.2e}")
    console.print(table)
    for r in report.results:
        if r.status == "failed":
            console.print(f"[red]FAILED[/red] {r.backend} {r.case}: {r.detail}")
    for name, why in report.unavailable.items():
        console.print(f"[red]UNAVAILABLE[/red] {name}: {why}")
    if report.n_run == 0:
        console.print("[red]no case ran: a conformance run that tests nothing is a failure[/red]")
    verdict = "[green]PASSED[/green]" if report.ok else "[red]FAILED[/red]"
    console.print(f"{verdict}: {report.n_run} cases run, {report.n_failed} failed")
