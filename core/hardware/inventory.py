"""The hardware inventory as plain data. Selection logic reads only this, so a recorded inventory of a
machine we do not have (a dual-socket AMX server, an Ascend box) exercises it exactly."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import MoetierError

# The x86 features moetier cares about, as the OS enables them (CPUID and XCR0 both agree).
X86_FEATURES = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni",
                "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")


@dataclass(frozen=True)
class CpuInfo:
    arch: str
    vendor: str
    model: str
    physical_cores: int
    logical_cores: int
    features: tuple[str, ...] = ()
    # Why a feature family is absent although the CPU might have it ("amx: CPUID reports no amx_tile").
    notes: tuple[str, ...] = ()

    def has(self, *features: str) -> bool:
        return all(f in self.features for f in features)

    def missing(self, *features: str) -> list[str]:
        return [f for f in features if f not in self.features]

    @property
    def is_x86(self) -> bool:
        return self.arch in ("x86_64", "amd64", "i686", "x86")


@dataclass(frozen=True)
class NumaNode:
    id: int
    cpus: tuple[int, ...]
    memory_total_bytes: int
    memory_free_bytes: int


@dataclass(frozen=True)
class Accelerator:
    kind: str  # "cuda", "rocm", "npu"
    index: int
    name: str
    memory_bytes: int
    capability: str | None = None  # "9.0" for CUDA, "gfx942" for ROCm
    driver: str | None = None


@dataclass(frozen=True)
class HardwareInventory:
    cpu: CpuInfo
    numa_nodes: tuple[NumaNode, ...]
    dram_total_bytes: int
    dram_available_bytes: int
    accelerators: tuple[Accelerator, ...] = ()
    notes: tuple[str, ...] = ()  # what detection could not find out, and why
    source: str = "detected"

    def accelerators_of(self, kind: str) -> tuple[Accelerator, ...]:
        return tuple(a for a in self.accelerators if a.kind == kind)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def from_dict(cls, d: dict, source: str = "file") -> HardwareInventory:
        try:
            cpu = dict(d["cpu"])
            cpu["features"] = tuple(cpu.get("features", ()))
            cpu["notes"] = tuple(cpu.get("notes", ()))
            nodes = tuple(NumaNode(n["id"], tuple(n["cpus"]), int(n["memory_total_bytes"]), int(n["memory_free_bytes"]))
                          for n in d["numa_nodes"])
            accs = tuple(Accelerator(**a) for a in d.get("accelerators", ()))
            return cls(CpuInfo(**cpu), nodes, int(d["dram_total_bytes"]), int(d["dram_available_bytes"]), accs,
                       tuple(d.get("notes", ())), source)
        except (KeyError, TypeError, ValueError) as exc:
            raise MoetierError(f"malformed hardware inventory ({source}): {type(exc).__name__}: {exc}") from None
