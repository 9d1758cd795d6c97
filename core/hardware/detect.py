"""Detect the hardware of this machine. Never crashes, never hangs: each probe is bounded and a failure
becomes a note in the inventory."""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from ..errors import MoetierError
from .inventory import Accelerator, CpuInfo, HardwareInventory, NumaNode

ACCELERATOR_PROBE_TIMEOUT_S = 30.0

# CPUID bit positions (Intel SDM vol. 2A, CPUID; AMD APM vol. 3 agrees for the ones both have).
_L1_ECX = {"fma": 12, "f16c": 29}
_L1_ECX_OSXSAVE, _L1_ECX_AVX = 27, 28
_L7_EBX = {"avx2": 5, "avx512f": 16, "avx512dq": 17, "avx512bw": 30, "avx512vl": 31}
_L7_ECX = {"avx512_vnni": 11}
_L7_EDX = {"amx_bf16": 22, "amx_tile": 24, "amx_int8": 25}
_L7_1_EAX = {"avx_vnni": 4, "avx512_bf16": 5}
# XCR0 state components the OS must save for each register file.
XCR0_AVX = 0b110  # SSE + AVX (YMM upper halves)
XCR0_AVX512 = 0b1110_0000  # opmask, ZMM_Hi256, Hi16_ZMM
XCR0_AMX = (1 << 17) | (1 << 18)  # XTILECFG, XTILEDATA


def x86_features_from_cpuid(regs: dict, xcr0: int, amx_permission_errno: int | None) -> tuple[list[str], list[str]]:
    """Pure decision logic: CPUID registers {(leaf, sub): (a, b, c, d)} + XCR0 -> (features, notes)."""
    def bits(leaf, sub, reg_index, table):
        r = regs.get((leaf, sub), (0, 0, 0, 0))[reg_index]
        return {name for name, bit in table.items() if r >> bit & 1}

    cpu = set()
    cpu |= bits(1, 0, 2, _L1_ECX)
    cpu |= bits(7, 0, 1, _L7_EBX) | bits(7, 0, 2, _L7_ECX) | bits(7, 0, 3, _L7_EDX)
    cpu |= bits(7, 1, 0, _L7_1_EAX)
    ecx1 = regs.get((1, 0), (0, 0, 0, 0))[2]
    notes = []
    features = set()
    os_avx = bool(ecx1 >> _L1_ECX_OSXSAVE & 1) and (xcr0 & XCR0_AVX) == XCR0_AVX
    if not os_avx:
        if cpu & {"avx2", "fma", "f16c"}:
            notes.append("avx: the OS has not enabled the AVX state in XCR0; AVX/AVX2 unusable")
    else:
        features |= cpu & {"avx2", "fma", "f16c", "avx_vnni"}
    avx512 = {f for f in cpu if f.startswith("avx512")}
    if avx512:
        if os_avx and (xcr0 & XCR0_AVX512) == XCR0_AVX512:
            features |= avx512
        else:
            notes.append("avx512: CPUID reports it but XCR0 lacks the opmask/ZMM state; AVX-512 unusable")
    amx = cpu & {"amx_tile", "amx_int8", "amx_bf16"}
    if "amx_tile" not in amx:
        notes.append("amx: CPUID reports no amx_tile (this CPU has no AMX)")
    elif (xcr0 & XCR0_AMX) != XCR0_AMX:
        notes.append("amx: CPUID reports AMX but XCR0 lacks the XTILECFG/XTILEDATA state")
    elif amx_permission_errno != 0:
        notes.append(f"amx: arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA) was refused (errno {amx_permission_errno}); "
                     "the kernel is too old or forbids AMX")
    else:
        features |= amx
    return sorted(features), notes


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def _parse_cpulist(s: str) -> tuple[int, ...]:
    cpus = []
    for part in s.strip().split(","):
        if not part:
            continue
        if "-" in part:
            a, b = part.split("-")
            cpus.extend(range(int(a), int(b) + 1))
        else:
            cpus.append(int(part))
    return tuple(cpus)


def _meminfo(text: str | None) -> dict[str, int]:
    out = {}
    for line in (text or "").splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key.strip()] = int(parts[0]) * (1024 if parts[1:2] == ["kB"] else 1)
    return out


@functools.lru_cache(maxsize=1)
def host_cpu() -> CpuInfo:
    """The CPU running this process, whatever inventory the caller works with: code that executes
    instructions (kernels, probes) is checked against it, never against a recorded inventory."""
    return detect_cpu([])


def detect_cpu(notes: list[str]) -> CpuInfo:
    arch = platform.machine().lower() or "unknown"
    cpuinfo = _read("/proc/cpuinfo") or ""
    model, vendor = "", ""
    arm_features: list[str] = []
    for line in cpuinfo.splitlines():
        k, _, v = line.partition(":")
        k = k.strip()
        if k == "model name" and not model:
            model = v.strip()
        elif k == "vendor_id" and not vendor:
            vendor = v.strip()
        elif k == "Features" and not arm_features:
            arm_features = v.split()
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cores = set()
    for topo in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/topology"):
        core, pkg = _read(str(topo / "core_id")), _read(str(topo / "physical_package_id"))
        if core is not None and pkg is not None:
            cores.add((pkg.strip(), core.strip()))
    physical = len(cores) or logical
    features: list[str] = []
    cpu_notes: list[str] = []
    if arch in ("x86_64", "amd64"):
        try:
            from . import _cpuid
        except ImportError as exc:
            notes.append(f"cpuid module not importable ({exc}); x86 features unknown, assuming none")
        else:
            regs = {(1, 0): _cpuid.cpuid(1, 0), (7, 0): _cpuid.cpuid(7, 0), (7, 1): _cpuid.cpuid(7, 1)}
            vendor = vendor or _cpuid.vendor()
            perm = _cpuid.request_amx_permission() if regs[(7, 0)][3] >> 24 & 1 else None
            features, cpu_notes = x86_features_from_cpuid(regs, _cpuid.xcr0(), perm)
    else:
        features = sorted(arm_features)
        cpu_notes = [f"{arch}: not x86, no x86 instruction-set features"]
    return CpuInfo(arch, vendor or "unknown", model or platform.processor() or "unknown", physical, logical,
                   tuple(features), tuple(cpu_notes))


def _detect_numa(logical_cpus: int) -> tuple[NumaNode, ...]:
    nodes = []
    for d in sorted(Path("/sys/devices/system/node").glob("node[0-9]*"), key=lambda p: int(p.name[4:])):
        cpus = _parse_cpulist(_read(str(d / "cpulist")) or "")
        mem = {}
        for line in (_read(str(d / "meminfo")) or "").splitlines():
            # "Node 0 MemTotal:       24000000 kB"
            parts = line.split()
            if len(parts) >= 4 and parts[3].isdigit():
                mem[parts[2].rstrip(":")] = int(parts[3]) * 1024
        nodes.append(NumaNode(int(d.name[4:]), cpus, mem.get("MemTotal", 0), mem.get("MemFree", 0)))
    if nodes:
        return tuple(nodes)
    info = _meminfo(_read("/proc/meminfo"))
    return (NumaNode(0, tuple(range(logical_cpus)), info.get("MemTotal", 0), info.get("MemAvailable", 0)),)


_ACCEL_SCRIPT = r"""
import json, sys
out = {"accelerators": [], "notes": []}
try:
    import torch
    if torch.cuda.is_available():
        kind = "rocm" if getattr(torch.version, "hip", None) else "cuda"
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            cap = getattr(p, "gcnArchName", None) if kind == "rocm" else f"{p.major}.{p.minor}"
            out["accelerators"].append(dict(kind=kind, index=i, name=p.name, memory_bytes=int(p.total_memory),
                capability=cap, driver=(torch.version.hip if kind == "rocm" else torch.version.cuda)))
except Exception as exc:
    out["notes"].append(f"torch.cuda probe failed: {type(exc).__name__}: {exc}")
if "--npu" in sys.argv:
    try:
        import torch, torch_npu
        for i in range(torch.npu.device_count()):
            p = torch.npu.get_device_properties(i)
            out["accelerators"].append(dict(kind="npu", index=i, name=str(getattr(p, "name", "Ascend")),
                memory_bytes=int(getattr(p, "total_memory", 0)), capability=None, driver=None))
    except Exception as exc:
        out["notes"].append(f"torch_npu probe failed: {type(exc).__name__}: {exc}")
print(json.dumps(out))
"""


def _detect_accelerators(notes: list[str]) -> tuple[Accelerator, ...]:
    try:
        import torch
    except Exception as exc:
        notes.append(f"torch not importable ({exc}); no accelerators probed")
        return ()
    has_gpu_build = bool(getattr(torch.version, "cuda", None) or getattr(torch.version, "hip", None))
    has_npu = importlib.util.find_spec("torch_npu") is not None
    if not has_gpu_build and not has_npu:
        notes.append("torch is a CPU-only build and torch_npu is not installed: no accelerators")
        return ()
    # A broken driver can hang or abort CUDA init: probe in a child process with a deadline.
    args = [sys.executable, "-c", _ACCEL_SCRIPT] + (["--npu"] if has_npu else [])
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=ACCELERATOR_PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        notes.append(f"accelerator probe timed out after {ACCELERATOR_PROBE_TIMEOUT_S:.0f}s (driver hung?)")
        return ()
    try:
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        notes.append(f"accelerator probe crashed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}")
        return ()
    notes.extend(result["notes"])
    return tuple(Accelerator(**a) for a in result["accelerators"])


def detect_inventory() -> HardwareInventory:
    """Probe this machine."""
    notes: list[str] = []
    cpu = detect_cpu(notes)
    numa = _detect_numa(cpu.logical_cores)
    info = _meminfo(_read("/proc/meminfo"))
    accels = _detect_accelerators(notes)
    return HardwareInventory(cpu, numa, info.get("MemTotal", 0), info.get("MemAvailable", 0), accels, tuple(notes))


def load_inventory(path: str | os.PathLike | None = None) -> HardwareInventory:
    """The inventory from `path`, else from the file MOETIER_INVENTORY names, else detected."""
    path = path or os.environ.get("MOETIER_INVENTORY")
    if not path:
        return detect_inventory()
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except OSError as exc:
        raise MoetierError(f"cannot read hardware inventory {p}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise MoetierError(f"hardware inventory {p} is not valid JSON: {exc}") from None
    return HardwareInventory.from_dict(data, source=f"file:{p.name}")
