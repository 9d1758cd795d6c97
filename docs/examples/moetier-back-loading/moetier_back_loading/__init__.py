"""back-loading: the fast tier takes the latest MoE layers first (the mirror of moetier's front-loading).

Within a layer the hottest experts come first when activation statistics are given, else the ids are
spread evenly (`problem.ranked`). `problem.fill` places the experts in that order into the fastest tier
with room for them.
"""
import moetier
from moetier.placement import PlacementStrategy


def back_loading(problem):
    order = [(layer, e) for layer in reversed(problem.moe_layers) for e in problem.ranked(layer)]
    return problem.fill(order)


@moetier.hookimpl
def moetier_register_placements(register):
    register(PlacementStrategy("back-loading", "the latest MoE layers first (hottest first within a layer)",
                               back_loading))
