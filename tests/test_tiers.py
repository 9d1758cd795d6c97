"""Memory tiers from an inventory, and byte accounting that refuses what does not fit."""
import pytest

from moetier.errors import BudgetError
from moetier.hardware import load_inventory
from moetier.plugins import load_registry
from moetier.tiers import TierLedger

from conftest import INVENTORIES


def tiers_of(inventory_file):
    inv = load_inventory(INVENTORIES / inventory_file)
    reg = load_registry(no_plugins=True)
    return [t for p in reg.tiers.values() for t in p.discover(inv)]


def test_tiers_per_numa_node_and_gpu():
    tiers = {t.name: t for t in tiers_of("xeon_amx_2socket_rtx4090.json")}
    assert {"cpu:numa0", "cpu:numa1", "cuda:0", "disk"} <= set(tiers)
    assert tiers["cuda:0"].capacity_bytes == 24 * 2**30 and tiers["cuda:0"].device == "cuda"
    assert tiers["cpu:numa1"].numa_node == 1 and tiers["cpu:numa1"].capacity_bytes == 512 * 2**30


def test_ledger_refuses_what_does_not_fit_and_changes_nothing():
    ledger = TierLedger(tiers_of("xeon_amx_2socket_rtx4090.json"), budgets={"cuda:0": 1000})
    ledger.reserve("cuda:0", 600)
    with pytest.raises(BudgetError, match="cuda:0: 500 more bytes do not fit \\(600 of 1000 used\\)"):
        ledger.reserve("cuda:0", 500)
    assert ledger.free("cuda:0") == 400
    ledger.release("cuda:0", 600)
    assert ledger.free("cuda:0") == 1000
    with pytest.raises(BudgetError, match="unknown tier 'cuda:7'"):
        ledger.reserve("cuda:7", 1)
    with pytest.raises(BudgetError, match="budget given for unknown tier"):
        TierLedger([], budgets={"gpu": 1})
