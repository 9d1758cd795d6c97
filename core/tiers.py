"""Memory tiers: where prepared experts live (gpu:0, cpu:numa0, disk), with capacity and accounting."""
from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import BudgetError

if TYPE_CHECKING:
    from .hardware.inventory import HardwareInventory


@dataclass(frozen=True)
class Tier:
    """One memory tier. `device` is the backend device kind that computes on it ("disk" is computed by cpu)."""

    name: str
    device: str
    capacity_bytes: int
    numa_node: int | None = None
    device_index: int | None = None


@dataclass(frozen=True)
class TierProvider:
    name: str
    discover: Callable[[HardwareInventory], list[Tier]]


class TierLedger:
    """Byte accounting per tier; reserving past a tier's budget raises BudgetError and changes nothing."""

    def __init__(self, tiers: list[Tier], budgets: dict[str, int] | None = None):
        self.tiers = {t.name: t for t in tiers}
        self.budgets = {t.name: t.capacity_bytes for t in tiers}
        for name, b in (budgets or {}).items():
            if name not in self.tiers:
                raise BudgetError(f"budget given for unknown tier {name!r}; tiers: {', '.join(self.tiers)}")
            self.budgets[name] = b
        self.used = {name: 0 for name in self.tiers}
        self._lock = threading.Lock()

    def reserve(self, tier: str, nbytes: int) -> None:
        with self._lock:
            if tier not in self.tiers:
                raise BudgetError(f"unknown tier {tier!r}; tiers: {', '.join(self.tiers)}")
            if self.used[tier] + nbytes > self.budgets[tier]:
                raise BudgetError(f"tier {tier}: {nbytes} more bytes do not fit "
                                  f"({self.used[tier]} of {self.budgets[tier]} used)")
            self.used[tier] += nbytes

    def release(self, tier: str, nbytes: int) -> None:
        with self._lock:
            self.used[tier] = max(0, self.used[tier] - nbytes)

    def free(self, tier: str) -> int:
        return self.budgets[tier] - self.used[tier]
