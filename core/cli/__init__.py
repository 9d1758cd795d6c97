"""The `moetier` command line: one module per subcommand, one shared option set (options.py).

A CLI module parses and prints; the work it starts lives in the room it belongs to. Every error moetier
raises on purpose ends the command with one line on stderr and exit status 2; a check that ran and
failed (a conformance case, a layer off its bound) exits 1.
"""
from __future__ import annotations

import sys

from ..errors import MoetierError
from . import bench, conformance, doctor, plan, zoo
from .options import Parser

COMMANDS = (doctor, conformance, bench, zoo, plan)


def build_parser() -> Parser:
    from .. import __version__

    parser = Parser(prog="moetier", description="Tiered runtime for giant Mixture-of-Experts models: hot experts "
                    "on the accelerator, the cold bulk on CPU kernels tuned per instruction set.")
    parser.add_argument("--version", action="version", version=f"moetier {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except MoetierError as exc:
        print(f"moetier {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moetier {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`moetier ... | head`): not an error worth a traceback.
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
