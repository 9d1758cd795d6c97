"""Hardware inventory: what this machine has, as plain JSON-round-trippable data."""
from .inventory import Accelerator, CpuInfo, HardwareInventory, NumaNode
from .detect import detect_inventory, load_inventory

__all__ = ["Accelerator", "CpuInfo", "HardwareInventory", "NumaNode", "detect_inventory", "load_inventory"]
