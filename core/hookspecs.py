"""The four plugin hooks of moetier (pluggy project name "moetier").

A plugin is a module (or object) exposed through the `moetier` entry-point group. It implements any of
these hooks with `@moetier.hookimpl` and registers typed, frozen dataclasses through the callback it is
handed. Built-in backends, tiers, families and placement strategies use exactly this path.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .placement.strategy import PlacementStrategy

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


@hookspec
def moetier_register_placements(register: Callable[[PlacementStrategy], None]) -> None:
    """Register placement strategies: call `register(PlacementStrategy(...))` once per strategy.

    A strategy decides which tier each routed expert lives on; `moetier plan --strategy NAME` uses it.

    Example::

        @moetier.hookimpl
        def moetier_register_placements(register):
            def last_layers_first(problem):
                order = [(i, e) for i in reversed(problem.moe_layers) for e in problem.ranked(i)]
                return problem.fill(order)

            register(PlacementStrategy(name="back-loading", description="latest MoE layers first",
                                       place=last_layers_first))
    """
