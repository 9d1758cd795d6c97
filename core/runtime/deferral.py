"""Expert deferral (KTransformers' idea, off by default): each token's lowest-weight experts of one MoE
layer are computed in the background and their output is added to the next MoE layer's output, so that
CPU work overlaps the next layer's attention instead of stalling it. The last MoE layer never defers,
so nothing is lost at the end of a step; what changes is that the deferred contribution enters the
residual stream one layer late (the test measures by how much).
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ..errors import SettingError, ShapeError


class Deferral:
    """Shared by the MoE layers of one model: `split` picks the deferred slots, `defer` starts their
    computation, `take` hands the previous layer's result to the next."""

    def __init__(self, max_deferred: int):
        if isinstance(max_deferred, bool) or not isinstance(max_deferred, int) or max_deferred < 1:
            raise SettingError(f"deferred experts per token must be a positive integer, got {max_deferred!r}")
        self.max_deferred = max_deferred
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moetier-deferred")
        self._pending: tuple[int, Future] | None = None  # (layer it came from, its output)

    def split(self, topk_ids: torch.Tensor, topk_weights: torch.Tensor):
        """(ids, weights) computed now and (ids, weights) deferred: per token, the `max_deferred` slots of
        lowest weight are deferred (at least one slot always stays immediate)."""
        k = topk_ids.shape[1]
        d = min(self.max_deferred, k - 1)
        if d == 0:
            return (topk_ids, topk_weights), None
        order = torch.argsort(topk_weights, dim=1, descending=True, stable=True)
        ids, w = topk_ids.gather(1, order), topk_weights.gather(1, order)
        return (ids[:, :k - d].contiguous(), w[:, :k - d].contiguous()), \
               (ids[:, k - d:].contiguous(), w[:, k - d:].contiguous())

    def defer(self, layer_index: int, compute) -> None:
        """Run `compute()` (-> fp32 [T, H]) in the background; the next MoE layer adds its result."""
        if self._pending is not None:
            raise ShapeError(f"layer {layer_index} defers work while layer {self._pending[0]}'s deferred "
                             "output was never taken: MoE layers must run in order")
        self._pending = (layer_index, self._executor.submit(compute))

    def take(self, layer_index: int) -> torch.Tensor | None:
        """The previous MoE layer's deferred output (waiting for it), or None."""
        if self._pending is None:
            return None
        source, fut = self._pending
        self._pending = None
        if source >= layer_index:
            fut.result()  # a new step began before the chain finished: finish it, and drop it loudly
            raise ShapeError(f"layer {layer_index} ran after layer {source} deferred work: MoE layers must run "
                             "in increasing order within a step")
        return fut.result()

    def close(self) -> None:
        self._executor.shutdown(wait=True)
