"""Backend selection: probe every registered backend, keep the best per device kind, and keep every
loser's reason so `moetier doctor` can say why it lost."""
from __future__ import annotations

import os
from dataclasses import dataclass

from .backend_spec import BackendSpec, Probe
from .errors import BackendUnavailable, SelectionError
from .hardware.inventory import HardwareInventory
from .plugins import Registry


@dataclass(frozen=True)
class BackendVerdict:
    name: str
    device: str
    formats: tuple[str, ...]
    probe: Probe
    chosen: bool
    forced: bool = False


@dataclass(frozen=True)
class Selection:
    verdicts: tuple[BackendVerdict, ...]

    @property
    def chosen(self) -> dict[str, str]:
        """device kind -> chosen backend name."""
        return {v.device: v.name for v in self.verdicts if v.chosen}

    def for_device(self, device: str) -> str | None:
        return self.chosen.get(device)

    def verdict(self, name: str) -> BackendVerdict:
        for v in self.verdicts:
            if v.name == name:
                return v
        raise BackendUnavailable(f"no backend named {name!r}")


def select_backends(registry: Registry, inventory: HardwareInventory, *, force: list[str] | str | None = None,
                    strict: bool = False) -> Selection:
    """Choose one backend per device kind.

    force: backend name(s) to use for their device kinds (default: MOETIER_BACKEND, comma-separated);
    a forced backend that its probe calls unusable raises BackendUnavailable with the probe's reason.
    strict: raise SelectionError when a kind's choice is a downgrade, i.e. a backend that this hardware
    could run (probe.downgrade) is unusable for a software reason.
    """
    if force is None:
        env = os.environ.get("MOETIER_BACKEND", "")
        force = [n.strip() for n in env.split(",") if n.strip()]
    elif isinstance(force, str):
        force = [force]
    probes: dict[str, tuple[BackendSpec, Probe]] = {
        name: (spec, spec.safe_probe(inventory)) for name, spec in sorted(registry.backends.items())
    }
    forced_by_device: dict[str, str] = {}
    for name in force:
        if name not in probes:
            raise BackendUnavailable(f"backend {name!r} was requested but is not registered; "
                                     f"registered: {', '.join(sorted(probes))}")
        spec, probe = probes[name]
        if not probe.usable:
            raise BackendUnavailable(f"backend {name!r} was requested but cannot run here: {probe.reason}")
        if spec.device in forced_by_device:
            raise SelectionError(f"two backends forced for device {spec.device}: {forced_by_device[spec.device]}, {name}")
        forced_by_device[spec.device] = name
    best: dict[str, str] = {}
    for name, (spec, probe) in probes.items():
        if not probe.usable:
            continue
        cur = best.get(spec.device)
        if cur is None or probe.score > probes[cur][1].score:
            best[spec.device] = name
    best.update(forced_by_device)
    if strict:
        for name, (spec, probe) in probes.items():
            chosen = best.get(spec.device)
            if probe.downgrade and name != chosen:
                raise SelectionError(f"--strict: {spec.device} would be downgraded to {chosen or 'nothing'} because "
                                     f"{name} cannot be used: {probe.reason}")
    verdicts = tuple(
        BackendVerdict(name, spec.device, spec.formats, probe, chosen=best.get(spec.device) == name,
                       forced=forced_by_device.get(spec.device) == name)
        for name, (spec, probe) in probes.items()
    )
    return Selection(verdicts)
