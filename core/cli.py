"""The `moetier` command line."""
from __future__ import annotations

import argparse
import json
import sys

from .errors import MoetierError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--inventory", metavar="FILE.json",
                   help="use a recorded hardware inventory instead of detecting this machine (or MOETIER_INVENTORY)")
    p.add_argument("--no-plugins", action="store_true", help="load only moetier's own plugins")
    p.add_argument("--backend", action="append", metavar="NAME",
                   help="force a backend for its device kind (repeatable; or MOETIER_BACKEND)")
    p.add_argument("--strict", action="store_true", help="fail instead of silently using a lesser backend")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moetier", description="Tiered runtime for Mixture-of-Experts models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("doctor", help="show the hardware, every backend with its score and reason, the choice per device")
    _common(p)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--save-inventory", metavar="FILE.json", help="write the detected inventory to a file")
    p.set_defaults(func=_cmd_doctor)

    from .conformance import cli as conformance_cli
    conformance_cli.register(sub, _common)
    from .bench import cli as bench_cli
    bench_cli.register(sub, _common)
    from . import zoo_cli
    zoo_cli.register(sub)
    return parser


def _context(args):
    from .hardware import load_inventory
    from .plugins import load_registry
    from .selection import select_backends

    inventory = load_inventory(args.inventory)
    registry = load_registry(no_plugins=args.no_plugins)
    selection = select_backends(registry, inventory, force=args.backend, strict=args.strict)
    return inventory, registry, selection


def _cmd_doctor(args) -> int:
    from . import doctor

    inventory, registry, selection = _context(args)
    if args.save_inventory:
        inventory.save(args.save_inventory)
    if args.json:
        print(json.dumps(doctor.report_dict(inventory, registry, selection), indent=2))
    else:
        doctor.print_report(inventory, registry, selection)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except MoetierError as exc:
        print(f"moetier {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`moetier ... | head`): not an error worth a traceback.
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
