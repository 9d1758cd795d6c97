"""Session-wide tiny checkpoints: each (family, version, quant) is written once per test run."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """tiny_checkpoint(family, version, quant="default") -> (directory, MoELayout), cached per session."""
    from moetier.plugins import load_registry

    registry = load_registry()
    cache = {}

    def build(family: str, version: str, quant: str | None = "default", registry_=None):
        key = (family, version, quant)
        if key not in cache:
            fam = (registry_ or registry).family(family)
            d = tmp_path_factory.mktemp(f"{family}-{version}-{quant}".replace(".", "_"))
            cache[key] = (d, fam.tiny(version, str(d), quant=quant, seed=len(cache)))
        return cache[key]

    return build
