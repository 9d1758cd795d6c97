"""Backends a zoo test needs, or a skip saying why."""
from __future__ import annotations


def runnable_native(registry):
    """A native CPU backend this host runs (the first of avx2, avx512, amx), or skip the test."""
    import pytest

    from moetier.errors import BackendUnavailable
    from moetier.hardware import load_inventory

    inv = load_inventory()
    for name in ("cpu.avx2", "cpu.avx512", "cpu.amx"):
        try:
            return registry.backend(name).create(inv)
        except BackendUnavailable:
            continue
    pytest.skip("no native kernel variant runs on this CPU")
