"""The built-in memory tiers: one per NUMA node, one per accelerator, and memory-mapped disk."""
from __future__ import annotations

import shutil

from moetier import Tier, TierProvider, hookimpl


def _dram(inv):
    return [Tier(f"cpu:numa{n.id}", "cpu", n.memory_total_bytes, numa_node=n.id) for n in inv.numa_nodes]


def _accelerators(inv):
    return [Tier(f"{a.kind}:{a.index}", a.kind, a.memory_bytes, device_index=a.index) for a in inv.accelerators]


def _disk(inv):
    return [Tier("disk", "cpu", shutil.disk_usage(".").free)]


@hookimpl
def moetier_register_tiers(register):
    register(TierProvider("dram", _dram))
    register(TierProvider("accelerator-memory", _accelerators))
    register(TierProvider("disk", _disk))
