"""What a backend plugin registers: its name, device kind, formats, a cheap probe and a lazy factory."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import BackendUnavailable, MoetierError, PluginError, SettingError

if TYPE_CHECKING:
    from .experts import ExpertBackend
    from .hardware.inventory import HardwareInventory

DEVICE_KINDS = ("cpu", "cuda", "rocm", "npu")


@dataclass(frozen=True)
class Probe:
    """A backend's answer to "can you run here?". score 0 = unusable; reason always says why.

    downgrade=True marks a backend the hardware could run but the software cannot yet (not built, a
    library missing): choosing something else instead is a downgrade, which --strict refuses.
    """

    score: int
    reason: str
    downgrade: bool = False

    @property
    def usable(self) -> bool:
        return self.score > 0


@dataclass(frozen=True)
class BackendSpec:
    """A registered backend. `factory(inventory)` builds it (importing its heavy modules only then);
    nobody calls the factory but `create`, which checks the probe first and the result after."""

    name: str
    device: str
    formats: tuple[str, ...]
    probe: Callable[[HardwareInventory], Probe]
    factory: Callable[[HardwareInventory], ExpertBackend]
    description: str = ""
    mixed_formats: bool = False  # computes mixed formats (gate/up and down in two declared formats)

    def __post_init__(self):
        if self.device not in DEVICE_KINDS:
            raise PluginError(f"backend {self.name!r}: device must be one of {DEVICE_KINDS}, got {self.device!r}")
        if not self.name or not isinstance(self.formats, tuple):
            raise PluginError(f"backend {self.name!r}: needs a name and a tuple of formats")

    def computes(self, fmt) -> bool:
        """Whether the backend computes `fmt` (see moetier.formats.computes)."""
        from .formats import computes
        return computes(self.formats, fmt, mixed=self.mixed_formats)

    def safe_probe(self, inventory: HardwareInventory) -> Probe:
        """The probe, with a crash turned into an unusable verdict that names the exception. A SettingError
        (a user setting the backend cannot honour) propagates."""
        try:
            p = self.probe(inventory)
        except SettingError:
            raise  # the user asked for something impossible: say so instead of choosing another backend
        except Exception as exc:  # a probe must never take the process down
            return Probe(0, f"probe failed: {type(exc).__name__}: {exc}")
        if not isinstance(p, Probe):
            return Probe(0, f"probe returned {type(p).__name__}, not Probe")
        return p

    def create(self, inventory: HardwareInventory, threads: int | None = None) -> ExpertBackend:
        """The one way to build a backend: refuses (BackendUnavailable, with the probe's reason) where it
        cannot run, checks what the factory returned, and sets `threads` (None: the backend's default)."""
        from .experts import ExpertBackend

        probe = self.safe_probe(inventory)
        if not probe.usable:
            raise BackendUnavailable(f"backend {self.name} cannot run here: {probe.reason}")
        try:
            backend = self.factory(inventory)
        except MoetierError:
            raise
        except Exception as exc:
            raise BackendUnavailable(f"backend {self.name}: its factory failed: {type(exc).__name__}: {exc}") from exc
        if not isinstance(backend, ExpertBackend):
            raise PluginError(f"backend {self.name}: its factory returned a {type(backend).__name__}, "
                              "not an ExpertBackend")
        if backend.name != self.name:
            raise PluginError(f"backend {self.name}: its factory built a backend named {backend.name!r}; "
                              "the spec and the instance must agree")
        if backend.mixed_formats != self.mixed_formats:
            raise PluginError(f"backend {self.name}: the spec says mixed_formats={self.mixed_formats}, the instance "
                              f"{backend.mixed_formats}; they must agree")
        if threads is not None:
            backend.set_threads(threads)
        return backend
