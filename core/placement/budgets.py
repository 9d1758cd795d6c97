"""Tier budgets: how many bytes of experts each memory tier can take, after what must live there first.

From the hardware inventory (the tier providers of core/tiers.py), overridable:

- accelerators (one tier per device, `cuda:0` ...): their memory (`--gpu-mem` replaces it, and makes a
  tier even where no device is found, to plan for a card this machine lacks), less the parts that run
  there: attention, dense MLPs, shared experts, routers, embeddings, LM head (sized by model_parts), the
  KV cache for `context` tokens x `batch` sequences, activations for one prefill chunk, and a fixed
  allowance for the CUDA context, libraries' workspaces and captured graphs;
- CPU DRAM, one tier per NUMA node (`cpu:numa0` ...): each node's memory less a headroom for the OS and
  other processes (`--cpu-mem` gives the total moetier may use instead, split evenly over the nodes, with
  no headroom taken); the non-expert parts land here when there is no accelerator; the DRAM cache of the
  disk tier is reserved here when the disk tier is on;
- disk (`--disk`): experts left in their checkpoint files (safetensors or GGUF) and read on demand; it takes no new bytes, so
  it has no budget (capacity None).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import SettingError
from ..hardware.inventory import HardwareInventory
from ..tiers import Tier
from .model_parts import PARTS, ModelParts
from .sizes import format_size

GIB = 2**30
# CUDA context, cuBLAS/cuDNN workspaces and captured decode graphs: a round allowance (a CUDA context
# alone takes 300-500 MiB on current drivers).
DEVICE_RUNTIME_BYTES = 1 * GIB
CPU_HEADROOM_FRACTION = 0.05  # of each node's memory, for the OS and other processes
CPU_HEADROOM_MIN = 1 * GIB
PREFILL_CHUNK_TOKENS = 2048  # tokens per prefill step whose activations must fit at once
DISK_CACHE_FRACTION = 0.10  # of the CPU budget, for the disk tier's DRAM cache when --disk is on
ACCELERATOR_KINDS = ("cuda", "rocm", "npu")


@dataclass(frozen=True)
class TierBudget:
    """One tier: its capacity (None: unbounded, the disk tier) and what is reserved on it before any
    expert, as (what, bytes) pairs. `source` says where the capacity came from."""

    name: str
    device: str
    capacity_bytes: int | None
    reserved: tuple[tuple[str, int], ...] = ()
    source: str = ""

    @property
    def reserved_bytes(self) -> int:
        return sum(b for _, b in self.reserved)

    @property
    def free_bytes(self) -> int | None:
        """Bytes left for experts (negative when the reservations alone overflow); None: unbounded."""
        return None if self.capacity_bytes is None else self.capacity_bytes - self.reserved_bytes

    @property
    def kind(self) -> str:
        """"accelerator", "cpu" or "disk": the speed class strategies fill in that order."""
        if self.name == "disk":
            return "disk"
        return "cpu" if self.device == "cpu" else "accelerator"

    def to_dict(self) -> dict:
        return {"name": self.name, "device": self.device, "capacity_bytes": self.capacity_bytes,
                "reserved": {k: v for k, v in self.reserved}, "source": self.source}

    @classmethod
    def from_dict(cls, d: dict) -> TierBudget:
        return cls(str(d["name"]), str(d["device"]), None if d["capacity_bytes"] is None else int(d["capacity_bytes"]),
                   tuple((str(k), int(v)) for k, v in dict(d.get("reserved", {})).items()), str(d.get("source", "")))


@dataclass(frozen=True)
class Budgets:
    """Every tier, fastest class first (accelerators, CPU nodes, disk); `parts_tier` holds the non-expert
    parts and the KV cache."""

    tiers: tuple[TierBudget, ...]
    parts_tier: str
    context: int
    batch: int
    assumptions: tuple[str, ...] = field(default=())

    def tier(self, name: str) -> TierBudget:
        for t in self.tiers:
            if t.name == name:
                return t
        raise SettingError(f"no tier named {name!r}; tiers: {', '.join(t.name for t in self.tiers)}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tiers)

    def of_kind(self, kind: str) -> tuple[TierBudget, ...]:
        return tuple(t for t in self.tiers if t.kind == kind)


def _activation_bytes(parts: ModelParts, context: int, batch: int) -> int:
    """One prefill chunk's live activations (residual, normed input, attention output, the widest MLP's
    gate/up/product in bf16) plus fp32 logits for the last token of each sequence."""
    lay = parts.layout
    widest = max([lay.dense_intermediate_size or 0]
                 + [m.experts.top_k * m.experts.intermediate_size for m in lay.moe_layers])
    chunk = min(context * batch, PREFILL_CHUNK_TOKENS)
    return chunk * (4 * lay.hidden_size + 3 * widest) * 2 + batch * parts.vocab_size * 4


DEFAULT_CONTEXT = 4096


def default_context(config) -> int:
    """The context a plan sizes the KV cache for unless told: DEFAULT_CONTEXT tokens, or fewer when the
    model cannot attend that far (a cache it never fills would overstate the budgets)."""
    from ..hf_config import text_config

    limit = text_config(config).get("max_position_embeddings")
    return min(DEFAULT_CONTEXT, limit) if isinstance(limit, int) and limit > 0 else DEFAULT_CONTEXT


def make_budgets(parts: ModelParts, inventory: HardwareInventory, tier_providers=(), *,
                 gpu_mem: int | None = None, cpu_mem: int | None = None, disk: bool = False,
                 disk_cache: int | None = None, context: int = DEFAULT_CONTEXT, batch: int = 1) -> Budgets:
    """The tier budgets for `parts`' model on `inventory` (see the module docstring for the rules).

    tier_providers: the registry's TierProvider objects (their tiers name the devices and NUMA nodes);
    gpu_mem / cpu_mem / disk_cache in bytes (None: from the inventory / the default).
    """
    if context < 1 or batch < 1:
        raise SettingError(f"--context and --batch must be at least 1, got {context} and {batch}")
    discovered = []
    for provider in tier_providers:
        discovered += list(provider.discover(inventory))
    accel = sorted((t for t in discovered if t.device in ACCELERATOR_KINDS), key=lambda t: t.name)
    nodes = sorted((t for t in discovered if t.device == "cpu" and t.name != "disk"),
                   key=lambda t: (t.numa_node if t.numa_node is not None else 0, t.name))
    if not nodes:  # an inventory without NUMA information: one node with all the DRAM
        nodes = [Tier("cpu:numa0", "cpu", inventory.dram_total_bytes, numa_node=0)]
    assumptions = list(parts.assumptions)

    gpus: list[tuple[str, str, int, str]] = []
    if gpu_mem is not None and gpu_mem > 0:
        if accel:
            gpus = [(t.name, t.device, gpu_mem, "--gpu-mem") for t in accel]
        else:
            gpus = [("cuda:0", "cuda", gpu_mem, "--gpu-mem; none here: planned for one")]
    elif gpu_mem is None:
        gpus = [(t.name, t.device, t.capacity_bytes, "detected") for t in accel]
    # gpu_mem == 0: CPU only, whatever the machine has

    parts_tier = gpus[0][0] if gpus else nodes[0].name
    kv = parts.kv_cache_bytes(context, batch)
    act = _activation_bytes(parts, context, batch)
    part_reserved = tuple((p, parts.part_bytes[p]) for p in PARTS if parts.part_bytes.get(p))
    part_reserved += ((f"KV cache ({context} tokens x {batch})", kv), ("activations", act))

    tiers: list[TierBudget] = []
    for i, (name, device, cap, source) in enumerate(gpus):
        reserved = (("device runtime and graphs", DEVICE_RUNTIME_BYTES),)
        if i == 0:
            reserved = part_reserved + reserved
        tiers.append(TierBudget(name, device, int(cap), reserved, source))
    if gpus:
        assumptions.append(f"accelerator: {format_size(DEVICE_RUNTIME_BYTES)} for the device runtime and graphs; "
                           f"activations of a {PREFILL_CHUNK_TOKENS}-token prefill chunk")

    per_node_cpu = None if cpu_mem is None else cpu_mem // len(nodes)
    cpu_budget_total = 0
    for j, node in enumerate(nodes):
        reserved: tuple[tuple[str, int], ...] = ()
        if per_node_cpu is not None:
            cap, source = per_node_cpu, "--cpu-mem" + (f" / {len(nodes)} nodes" if len(nodes) > 1 else "")
        else:
            cap, source = int(node.capacity_bytes), "detected"
            headroom = max(CPU_HEADROOM_MIN, int(cap * CPU_HEADROOM_FRACTION))
            reserved += (("headroom (OS, other processes)", headroom),)
        if not gpus and j == 0:
            reserved = part_reserved + reserved
        cpu_budget_total += cap - sum(b for _, b in reserved)
        tiers.append(TierBudget(node.name, "cpu", cap, reserved, source))
    if cpu_mem is None:
        assumptions.append(f"CPU headroom: {CPU_HEADROOM_FRACTION:.0%} of each NUMA node, at least "
                           f"{format_size(CPU_HEADROOM_MIN)}")
    if disk:
        cache = disk_cache if disk_cache is not None else max(0, int(cpu_budget_total * DISK_CACHE_FRACTION))
        first = next(k for k, t in enumerate(tiers) if t.device == "cpu")
        t = tiers[first]
        tiers[first] = TierBudget(t.name, t.device, t.capacity_bytes, t.reserved + (("disk cache", cache),), t.source)
        tiers.append(TierBudget("disk", "disk", None, (), "experts stay in their checkpoint files"))
        if disk_cache is None:
            assumptions.append(f"disk cache: {DISK_CACHE_FRACTION:.0%} of the CPU budget")
    return Budgets(tuple(tiers), parts_tier, context, batch, tuple(assumptions))


def disk_cache_bytes(budgets: Budgets) -> int:
    return sum(b for t in budgets.tiers for what, b in t.reserved if what == "disk cache")
