"""pytest integration: `pytest --moetier-backend NAME` runs the conformance cases on NAME.

Any test that takes the `conformance_case` fixture is parametrized over every case of every selected
backend (default: every CPU backend that runs on this host). `moetier.conformance.testing` holds the
one-line test a third party imports into its own test module.
"""
from __future__ import annotations

import pytest

_CONTEXTS: dict = {}


def pytest_addoption(parser):
    group = parser.getgroup("moetier")
    group.addoption("--moetier-backend", action="append", default=None, metavar="NAME",
                    help="run the moetier conformance cases on this backend (repeatable)")
    group.addoption("--moetier-seed", type=int, default=None, help="seed of the conformance inputs")


def pytest_generate_tests(metafunc):
    if "conformance_case" not in metafunc.fixturenames:
        return
    import secrets

    from .cases import Context, build_cases
    from ..errors import MoetierError
    from ..hardware import load_inventory
    from ..plugins import get_registry
    from ..reference import oracle
    from .runner import runnable_backends

    names = metafunc.config.getoption("--moetier-backend") or runnable_backends()
    seed = metafunc.config.getoption("--moetier-seed")
    if seed is None:
        seed = metafunc.config.stash.setdefault(_SEED_KEY, secrets.randbits(31))
    params, ids = [], []
    for name in names:
        if name not in _CONTEXTS:
            try:
                backend = get_registry().backend(name).create(load_inventory())
            except MoetierError as exc:
                raise pytest.UsageError(f"--moetier-backend {name}: {exc}") from None
            _CONTEXTS[name] = Context(backend, oracle(), seed)
        ctx = _CONTEXTS[name]
        for case in build_cases(tuple(ctx.backend.formats)):
            params.append((name, case))
            ids.append(f"{name}:{case.id}")
    if not params:
        raise pytest.UsageError("moetier conformance: no case to run (no backend selected or runnable)")
    metafunc.parametrize("conformance_case", params, ids=ids)


_SEED_KEY = pytest.StashKey[int]()


@pytest.fixture
def conformance_context():
    return _CONTEXTS


def pytest_report_header(config):
    seed = config.stash.get(_SEED_KEY, None)
    return None if seed is None else f"moetier conformance seed: {seed}"
