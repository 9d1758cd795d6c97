"""Plugin loading: every built-in and third-party plugin comes through the `moetier` entry-point group.

Loading is strict: a hook implementation that matches no hookspec, or two plugins registering one name,
raise PluginError naming the plugins. A plugin whose import fails is skipped with a warning that names
it and is kept in `Registry.failed`, which `moetier doctor` shows.
"""
from __future__ import annotations

import importlib.metadata as md
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import pluggy

from . import hookspecs
from .backend_spec import BackendSpec
from .errors import PluginError
from .family import ModelFamily
from .placement.strategy import PlacementStrategy
from .tiers import TierProvider

ENTRY_POINT_GROUP = "moetier"
BUILTIN_DIST = "moetier"


@dataclass(frozen=True)
class PluginInfo:
    name: str
    module: str
    distribution: str
    builtin: bool


@dataclass(frozen=True)
class PluginFailure:
    name: str
    distribution: str
    error: str


@dataclass
class Registry:
    backends: dict[str, BackendSpec] = field(default_factory=dict)
    tiers: dict[str, TierProvider] = field(default_factory=dict)
    families: dict[str, ModelFamily] = field(default_factory=dict)
    placements: dict[str, PlacementStrategy] = field(default_factory=dict)
    owners: dict[tuple[str, str], str] = field(default_factory=dict)  # (kind, name) -> plugin
    plugins: list[PluginInfo] = field(default_factory=list)
    failed: list[PluginFailure] = field(default_factory=list)
    skipped: list[PluginInfo] = field(default_factory=list)

    def _add(self, kind: str, table: dict, cls: type, plugin: str, obj: Any) -> None:
        if not isinstance(obj, cls):
            raise PluginError(f"plugin {plugin!r} registered a {type(obj).__name__} as a {kind}; expected {cls.__name__}")
        key = (kind, obj.name)
        if key in self.owners:
            raise PluginError(f"{kind} name {obj.name!r} is registered twice: by plugin {self.owners[key]!r} "
                              f"and by plugin {plugin!r}")
        self.owners[key] = plugin
        table[obj.name] = obj

    def backend(self, name: str) -> BackendSpec:
        try:
            return self.backends[name]
        except KeyError:
            raise PluginError(f"no backend named {name!r}; registered: {', '.join(sorted(self.backends))}") from None

    def family(self, name: str) -> ModelFamily:
        try:
            return self.families[name]
        except KeyError:
            raise PluginError(f"no model family named {name!r}; registered: {', '.join(sorted(self.families))}") from None

    def placement(self, name: str) -> PlacementStrategy:
        try:
            return self.placements[name]
        except KeyError:
            raise PluginError(f"no placement strategy named {name!r}; registered: "
                              f"{', '.join(sorted(self.placements))}") from None


def new_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    return pm


def _allow_list(allow: list[str] | None) -> set[str] | None:
    if allow is not None:
        return set(allow)
    env = os.environ.get("MOETIER_PLUGINS")
    if env is None:
        return None
    return {p.strip() for p in env.split(",") if p.strip()}


def load_registry(*, no_plugins: bool = False, allow: list[str] | None = None,
                  extra_plugins: dict[str, Any] | None = None) -> Registry:
    """Load every plugin of the `moetier` entry-point group and collect what they register.

    no_plugins: load only moetier's own plugins. allow: names of outside plugins to load (default: the
    comma-separated MOETIER_PLUGINS, or all). extra_plugins: objects registered directly (name -> module
    or object), for tests and embedding.
    """
    registry = Registry()
    pm = new_plugin_manager()
    allowed = _allow_list(allow)
    for ep in sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        dist = ep.dist.name if ep.dist is not None else "?"
        builtin = dist == BUILTIN_DIST
        info = PluginInfo(ep.name, ep.value, dist, builtin)
        if not builtin and (no_plugins or (allowed is not None and ep.name not in allowed)):
            registry.skipped.append(info)
            continue
        if pm.has_plugin(ep.name):
            raise PluginError(f"two plugins are named {ep.name!r} in the moetier entry-point group "
                              f"(one from distribution {dist!r}); plugin names must be unique")
        try:
            obj = ep.load()
        except Exception as exc:
            msg = f"{type(exc).__name__}: {exc}"
            registry.failed.append(PluginFailure(ep.name, dist, msg))
            warnings.warn(f"moetier plugin {ep.name!r} (from {dist}) failed to import and is skipped: {msg}",
                          RuntimeWarning, stacklevel=2)
            continue
        _register(pm, ep.name, obj)
        registry.plugins.append(info)
    for name, obj in (extra_plugins or {}).items():
        _register(pm, name, obj)
        registry.plugins.append(PluginInfo(name, getattr(obj, "__name__", type(obj).__name__), "(direct)", False))
    _collect(pm, registry)
    return registry


def _register(pm: pluggy.PluginManager, name: str, obj: Any) -> None:
    try:
        pm.register(obj, name=name)
    except ValueError as exc:  # pluggy: same name or same object twice
        raise PluginError(f"plugin {name!r} cannot be registered: {exc}") from None
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin {name!r} is invalid: {exc}") from None
    # Strict: a hookimpl whose name matches no hookspec (a typo, a stale hook) is an error, not a no-op.
    for hook_name, _ in _hookimpl_names(pm, obj):
        if not hook_name.startswith("moetier_"):
            continue
        caller = getattr(pm.hook, hook_name, None)
        if caller is None or not caller.has_spec():
            pm.unregister(obj)
            known = ", ".join(n for n in dir(hookspecs) if n.startswith("moetier_"))
            raise PluginError(f"plugin {name!r} implements unknown hook {hook_name!r}; known hooks: {known}")


def _hookimpl_names(pm: pluggy.PluginManager, obj: Any):
    for attr in dir(obj):
        if pm.parse_hookimpl_opts(obj, attr) is not None:
            yield attr, getattr(obj, attr)


def _collect(pm: pluggy.PluginManager, registry: Registry) -> None:
    for hook_name, kind, table, cls in (
        ("moetier_register_backends", "backend", registry.backends, BackendSpec),
        ("moetier_register_tiers", "tier", registry.tiers, TierProvider),
        ("moetier_register_families", "family", registry.families, ModelFamily),
        ("moetier_register_placements", "placement strategy", registry.placements, PlacementStrategy),
    ):
        hook = getattr(pm.hook, hook_name)
        for impl in hook.get_hookimpls():
            plugin = pm.get_name(impl.plugin)

            def register(obj, _plugin=plugin, _kind=kind, _table=table, _cls=cls):
                registry._add(_kind, _table, _cls, _plugin, obj)

            try:
                impl.function(register=register)
            except PluginError:
                raise
            except Exception as exc:
                raise PluginError(f"plugin {plugin!r} failed in {hook_name}: {type(exc).__name__}: {exc}") from exc


_DEFAULT: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, loaded on first use with the default settings."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = load_registry()
    return _DEFAULT
