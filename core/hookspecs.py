"""The three plugin hooks of moetier (pluggy project name "moetier").

A plugin is a module (or object) exposed through the `moetier` entry-point group. It implements any of
these hooks with `@moetier.hookimpl` and registers typed, frozen dataclasses through the callback it is
handed. Built-in backends, tiers and families use exactly this path.
"""
from __future__ import annotations

from collections.abc import Callable

import pluggy

hookspec = pluggy.HookspecMarker("moetier")
hookimpl = pluggy.HookimplMarker("moetier")


@hookspec
def moetier_register_backends(register: Callable) -> None:
    """Register expert-compute backends: call `register(BackendSpec(...))` once per backend.

    Example::

        @moetier.hookimpl
        def moetier_register_backends(register):
            register(BackendSpec(
                name="cpu.mykernel", device="cpu", formats=("bf16",),
                probe=lambda inv: Probe(10, "ok") if inv.cpu.has("avx2") else Probe(0, "CPU lacks avx2"),
                factory=lambda inv: __import__("mypkg.backend").backend.MyBackend(),
            ))
    """


@hookspec
def moetier_register_tiers(register: Callable) -> None:
    """Register memory-tier providers: call `register(TierProvider(...))`.

    A provider turns the hardware inventory into concrete tiers (one per NUMA node, one per GPU, ...).

    Example::

        @moetier.hookimpl
        def moetier_register_tiers(register):
            register(TierProvider(name="disk", discover=lambda inv: [Tier("disk", "disk", 2**40)]))
    """


@hookspec
def moetier_register_families(register: Callable) -> None:
    """Register model families: call `register(ModelFamily(...))` once per family.

    A family claims checkpoints by their config.json and turns a claimed config into an MoELayout.

    Example::

        @moetier.hookimpl
        def moetier_register_families(register):
            register(ModelFamily(name="mixtral", versions=("Mixtral-8x7B",),
                                 match=match_mixtral, layout=mixtral_layout))
    """
