"""The conformance test a backend author imports into a pytest module:

    from moetier.conformance.testing import test_conformance  # noqa: F401

then runs `pytest --moetier-backend my.backend`.
"""
from .cases import CaseFailure
from .pytest_plugin import _CONTEXTS


def test_conformance(conformance_case):
    name, case = conformance_case
    ctx = _CONTEXTS[name]
    try:
        case.run(ctx)
    except CaseFailure as exc:
        raise AssertionError(f"{name} {case.id}: {exc}") from None
