"""The disk tier: experts left in their checkpoint files, read on a miss into a bounded DRAM cache of
packed experts, then computed on a CPU backend; and a prefetcher that reads ahead the experts the next
MoE layer will probably use.

The prediction applies the next layer's router to the current layer's hidden state (the idea of
Pre-gated MoE and AdapMoE: consecutive layers' inputs differ by one residual update, so the next
router's choice on them is a good guess). Reads go through the checkpoint's memory map one expert at a
time, so resident memory is the cache budget plus the experts being computed.
"""
from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from ..errors import BudgetError
from ..experts import ExpertBackend, ExpertLayerSpec, ExpertSource, PreparedExperts
from ..formats import WeightFormat, get_format

Key = tuple[int, int]  # (MoE layer index, expert id)
_DRAIN = (-1, -1)


@dataclass
class CacheCounters:
    """hits: the expert was in the cache when needed; waits: it was being read ahead and the forward
    waited for the rest of the read; misses: read on demand. prefetched: read ahead; prefetch_used: of
    those, needed before being evicted."""

    hits: int = 0
    waits: int = 0
    misses: int = 0
    bytes_read: int = 0
    prefetched: int = 0
    prefetch_used: int = 0
    evictions: int = 0

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.waits + self.misses
        return self.hits / n if n else 0.0

    @property
    def prefetch_precision(self) -> float:
        return self.prefetch_used / self.prefetched if self.prefetched else 0.0


@dataclass(eq=False)
class _Entry:
    prepared: PreparedExperts
    nbytes: int
    prefetched: bool


class ExpertCache:
    """Packed experts by (layer, expert), least recently used evicted first, within `budget_bytes`.
    Thread-safe: the prefetcher fills it while the forward reads it. An expert being computed stays
    alive (the forward holds it) even if evicted meanwhile."""

    def __init__(self, budget_bytes: int):
        if budget_bytes < 0:
            raise BudgetError(f"expert cache budget must be >= 0 bytes, got {budget_bytes}")
        self.budget_bytes = int(budget_bytes)
        self.used_bytes = 0
        self.counters = CacheCounters()
        self._entries: OrderedDict[Key, _Entry] = OrderedDict()
        self._inflight: dict[Key, Future] = {}
        self._claimed: set[Key] = set()  # read-ahead still in flight that a forward already waits for
        self._lock = threading.Lock()

    def __contains__(self, key: Key) -> bool:
        with self._lock:
            return key in self._entries or key in self._inflight

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Key, load: Callable[[], PreparedExperts], *, prefetch: bool = False) -> PreparedExperts | None:
        """The packed expert, read with `load` if absent. For a prefetch, returns None when it is already
        present or being read, and never counts as a hit or miss."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                if prefetch:
                    return None
                self._entries.move_to_end(key)
                self.counters.hits += 1
                if entry.prefetched:
                    entry.prefetched = False
                    self.counters.prefetch_used += 1
                return entry.prepared
            fut = self._inflight.get(key)
            if fut is not None:
                if prefetch:
                    return None
                self.counters.waits += 1  # read ahead and still arriving: the wait is shorter than a read
                self.counters.prefetch_used += 1
                self._claimed.add(key)
                waiting = True
            else:
                fut = Future()
                self._inflight[key] = fut
                waiting = False
                if prefetch:
                    self.counters.prefetched += 1
                else:
                    self.counters.misses += 1
        if waiting:
            return fut.result()
        try:
            prepared = load()
        except BaseException as exc:
            with self._lock:
                del self._inflight[key]
                self._claimed.discard(key)
            fut.set_exception(exc)
            raise
        with self._lock:
            del self._inflight[key]
            claimed = key in self._claimed
            self._claimed.discard(key)
            self.counters.bytes_read += prepared.nbytes
            self._insert(key, _Entry(prepared, prepared.nbytes, prefetched=prefetch and not claimed))
        fut.set_result(prepared)
        return prepared

    def _insert(self, key: Key, entry: _Entry) -> None:
        if entry.nbytes > self.budget_bytes:
            return  # computed this once, never cached: it alone exceeds the budget
        while self._entries and self.used_bytes + entry.nbytes > self.budget_bytes:
            _, old = self._entries.popitem(last=False)
            self.used_bytes -= old.nbytes
            self.counters.evictions += 1
        self._entries[key] = entry
        self.used_bytes += entry.nbytes


class Prefetcher:
    """One background thread reading requested experts into the cache, in request order."""

    def __init__(self, cache: ExpertCache):
        self.cache = cache
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._closed = False

    def request(self, key: Key, load: Callable[[], PreparedExperts]) -> None:
        if self._closed or key in self.cache:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="moetier-prefetch", daemon=True)
            self._thread.start()
        self._queue.put((key, load))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            key, load = item
            if key == _DRAIN:
                load()
                continue
            try:
                self.cache.get(key, load, prefetch=True)
            except Exception:  # a failed read-ahead is retried, and reported, by the forward that needs it
                pass

    def drain(self) -> None:
        """Wait until every request so far was served (tests, and the end of a run)."""
        if self._thread is None:
            return
        done = threading.Event()
        self._queue.put((_DRAIN, done.set))
        done.wait()

    def close(self) -> None:
        self._closed = True
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None


class DiskShard:
    """The experts of one layer that stay on disk: each read from `source` (one expert's bytes),
    prepared on `backend` in `fmt` and kept in the shared cache, then computed."""

    def __init__(self, layer_index: int, spec: ExpertLayerSpec, expert_ids, source: ExpertSource,
                 backend: ExpertBackend, fmt: str | WeightFormat, cache: ExpertCache,
                 prefetcher: Prefetcher | None = None):
        self.layer_index, self.spec = layer_index, spec
        self.expert_ids = tuple(sorted(int(e) for e in expert_ids))
        self._held = frozenset(self.expert_ids)
        self.source, self.backend, self.fmt = source, backend, get_format(fmt)
        self.cache, self.prefetcher = cache, prefetcher

    def _loader(self, e: int) -> Callable[[], PreparedExperts]:
        return lambda: self.backend.prepare(self.spec, self.source, (e,), self.fmt)

    def forward(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """fp32 [T, H]: the part of the layer's output from the disk experts the tokens routed to."""
        out = torch.zeros(hidden.shape[0], self.spec.hidden_size, dtype=torch.float32)
        if hidden.shape[0] == 0:
            return out
        needed = [e for e in torch.unique(topk_ids).tolist() if e in self._held]
        for e in needed:
            prepared = self.cache.get((self.layer_index, e), self._loader(e))
            out += self.backend.forward(prepared, hidden, topk_ids, topk_weights, out_dtype=torch.float32)
        return out

    def prefetch(self, expert_ids) -> None:
        """Read these experts ahead (those this shard holds), in the background."""
        if self.prefetcher is None:
            return
        for e in expert_ids:
            if e in self._held:
                self.prefetcher.request((self.layer_index, e), self._loader(e))
