"""`moetier conformance`: run the suite on backends and print (and save) the per-format report."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

from ..errors import SettingError
from .options import add_backend_options, check_writable, load_context


def register(sub) -> None:
    p = sub.add_parser("conformance", help="run the backend conformance suite (default: the backend chosen for each "
                                           "device kind)")
    add_backend_options(p, backend_help="backend to test (repeatable, or comma-separated; default: MOETIER_BACKEND, "
                                        "else the backend chosen for each device kind)")
    p.add_argument("--all", action="store_true", help="test every backend that can run on this host")
    p.add_argument("--format", action="append", metavar="FMT", dest="formats",
                   help="only this weight format (repeatable; see `moetier zoo list` for the formats moetier knows)")
    p.add_argument("--seed", type=int, help="seed of the random inputs, to reproduce a run (the report prints it)")
    p.add_argument("--report", metavar="FILE.json", help="also write the full report as JSON to this file")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..conformance.cases import build_cases
    from ..conformance.runner import run_suite, runnable_backends
    from ..errors import FormatError
    from ..formats import get_format

    if args.report:
        check_writable(args.report, "report")
    for fmt in args.formats or ():
        try:
            get_format(fmt)  # a format name, or a mixed GATEUP+DOWN one
        except FormatError as exc:
            raise SettingError(str(exc)) from None
    ctx = load_context(args)
    if ctx.requested:
        names = list(ctx.requested)
    elif args.all:
        names = runnable_backends(ctx.registry, ctx.inventory)
    else:
        names = sorted(ctx.selection.chosen.values())
    if not names:
        raise SettingError("no backend can run on this host; nothing to test (see `moetier doctor`)")
    for name in names:
        declared = ctx.registry.backends[name].formats
        lacking = [f for f in args.formats or () if not ctx.registry.backends[name].computes(f)]
        if lacking:
            raise SettingError(f"backend {name} does not compute {', '.join(lacking)}; it computes "
                               f"{', '.join(declared) or 'nothing yet'}")
    console = Console()
    progress = None
    if not args.quiet:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=Console(stderr=True),
                       transient=True)
        totals = {n: len(build_cases(tuple(args.formats or ctx.registry.backends[n].formats))) for n in names}
        tasks = {}
        bar.start()

        def progress(result):
            if result.backend not in tasks:
                tasks[result.backend] = bar.add_task(result.backend, total=totals.get(result.backend))
            bar.advance(tasks[result.backend])
    try:
        report = run_suite(names, registry=ctx.registry, inventory=ctx.inventory, seed=args.seed,
                           formats=args.formats, progress=progress)
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
