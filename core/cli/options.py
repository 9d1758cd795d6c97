"""What every `moetier` subcommand shares: the argument parser with one-line errors, the backend option
set (`--inventory`, `--no-plugins`, `--backend`, `--strict`, honouring MOETIER_INVENTORY and
MOETIER_BACKEND the same way everywhere), and the checks made before any work starts."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import SettingError
from ..hardware.inventory import HardwareInventory
from ..plugins import Registry
from ..selection import Selection

ENV_BACKEND = "MOETIER_BACKEND"


class Parser(argparse.ArgumentParser):
    """argparse with a usage error as one line on stderr (exit 2) that says where help is."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def positive_int(text: str) -> int:
    return _int_at_least(text, 1, "a positive integer", "must be at least 1")


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0, "a whole number", "must not be negative")


def _int_at_least(text: str, low: int, expected: str, bound: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{bound}, got {value}")
    return value


def add_plugin_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-plugins", action="store_true",
                   help="load only moetier's own plugins (default: every installed plugin, or those "
                        "MOETIER_PLUGINS lists)")


def add_backend_options(p: argparse.ArgumentParser, *, backend_help: str | None = None) -> None:
    """The option set of every subcommand that selects a backend."""
    p.add_argument("--inventory", metavar="FILE.json",
                   help="use a recorded hardware inventory instead of detecting this machine "
                        "(default: the file MOETIER_INVENTORY names, else detection)")
    add_plugin_option(p)
    p.add_argument("--backend", action="append", metavar="NAME",
                   help=backend_help or "use this backend for its device kind (repeatable; default: "
                                        f"{ENV_BACKEND}, comma-separated, else the best one `moetier doctor` shows)")
    p.add_argument("--strict", action="store_true",
                   help="fail instead of using a lesser backend when a better one is present but cannot run")


def requested_backends(args) -> list[str]:
    """The backends the user named: --backend (repeatable, comma-separated allowed), else MOETIER_BACKEND."""
    items = args.backend if args.backend else [os.environ.get(ENV_BACKEND, "")]
    return [n.strip() for item in items for n in item.split(",") if n.strip()]


@dataclass(frozen=True)
class Context:
    inventory: HardwareInventory
    registry: Registry
    selection: Selection
    requested: tuple[str, ...]


def load_context(args) -> Context:
    """Inventory, plugins and the backend selection, from the shared options. Every named backend must
    exist and be able to run here, and --strict refuses a downgrade: each as a typed error."""
    from ..hardware import load_inventory
    from ..plugins import load_registry
    from ..selection import select_backends

    inventory = load_inventory(args.inventory)
    registry = load_registry(no_plugins=args.no_plugins)
    requested = tuple(requested_backends(args))
    for name in requested:
        registry.backend(name)  # unknown: PluginError listing the registered ones
    # Several backends of one device kind may be named (to test or time each); selection forces the first.
    per_device: dict[str, str] = {}
    for name in requested:
        per_device.setdefault(registry.backends[name].device, name)
    selection = select_backends(registry, inventory, force=list(per_device.values()), strict=args.strict)
    for name in requested:
        verdict = selection.verdict(name)
        if not verdict.probe.usable:
            raise SettingError(f"backend {name} was requested but cannot run here: {verdict.probe.reason}")
    return Context(inventory, registry, selection, requested)


def check_writable(path: str, what: str) -> Path:
    """Refuse, before any work, an output file that cannot be written: its folder must exist and be
    writable, and the path must not be a folder."""
    p = Path(path)
    folder = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise SettingError(f"{what} {path} is a folder; give a file name")
    if not folder.is_dir():
        raise SettingError(f"cannot write {what} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise SettingError(f"cannot write {what} {path}: permission denied")
    return p


DEFAULT_MODEL = "default"


def named_model(name: str) -> str:
    """MODEL as a path: `default` is the built-in default model's folder (a folder called default is
    ./default); any other name is returned as given."""
    if name != DEFAULT_MODEL:
        return name
    import importlib

    try:  # the default model ships with the model zoo; found by its documented module path
        default_model = importlib.import_module("moetier.model_zoo.default_model")
    except ImportError:
        raise SettingError("the built-in default model is not part of this installation; name a checkpoint "
                           "folder (with config.json, safetensors and a tokenizer) instead") from None
    return str(default_model.checkpoint_dir())
