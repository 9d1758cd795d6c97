"""When a large prefill should stream CPU-resident experts to the accelerator instead of computing them
on the CPU: the n* rule, per layer, from measured (or inventory) speeds.

Streaming one expert costs B / P seconds (B = 3 * H * I * bytes-per-param, P the host-to-device link's
bytes/s); computing n of its tokens on the CPU costs max(B / D, n * 6 * H * I / F) (D the DRAM bytes/s
the CPU kernels reach, F their FLOP/s). Compute-bound, streaming wins above

    n* = bytes-per-param * F / (2 * P)        tokens per expert.

Pure functions of numbers: the caller brings F, P and D from `moetier bench` probes or an inventory.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .errors import ShapeError
from .experts import ExpertLayerSpec
from .formats import WeightFormat, get_format


def bytes_per_param(layer: ExpertLayerSpec, fmt: str | WeightFormat) -> float:
    """Bytes per weight of one expert in `fmt`, scales included."""
    return layer.expert_bytes(fmt) / (3 * layer.hidden_size * layer.intermediate_size)


def n_star(bytes_per_param: float, cpu_flops: float, link_bytes_per_s: float) -> float:
    """Tokens per expert above which streaming an expert to the accelerator beats computing it on the CPU."""
    for name, v in (("bytes_per_param", bytes_per_param), ("cpu_flops", cpu_flops),
                    ("link_bytes_per_s", link_bytes_per_s)):
        if not v > 0:
            raise ShapeError(f"{name} must be positive, got {v!r}")
    return bytes_per_param * cpu_flops / (2.0 * link_bytes_per_s)


@dataclass(frozen=True)
class StreamDecision:
    """The verdict for one layer and one batch: stream (True) or compute on the CPU, with the numbers."""

    stream: bool
    n_star: float
    mean_tokens_per_used_expert: float
    used_experts: int
    cpu_seconds: float
    stream_seconds: float

    @property
    def reason(self) -> str:
        where = "stream the used experts to the accelerator" if self.stream else "compute on the CPU"
        return (f"{where}: {self.used_experts} experts used, {self.mean_tokens_per_used_expert:.1f} tokens each "
                f"(n* = {self.n_star:.1f}); CPU {self.cpu_seconds * 1e3:.3f} ms vs stream {self.stream_seconds * 1e3:.3f} ms")


def decide_stream(layer: ExpertLayerSpec, fmt: str | WeightFormat, tokens_per_expert: Sequence[int], *,
                  cpu_flops: float, link_bytes_per_s: float, dram_bytes_per_s: float | None = None) -> StreamDecision:
    """Stream this layer's used CPU experts for this batch, or compute them on the CPU?

    tokens_per_expert: routed tokens per CPU-resident expert (zeros for unused ones). Only used experts
    are streamed (llama.cpp's PR 15346). Accelerator compute time is left out: it is far below both.
    dram_bytes_per_s: the CPU's expert-streaming bandwidth (a memory-bound floor); None ignores it.
    """
    fmt = get_format(fmt)
    counts = [int(c) for c in tokens_per_expert]
    if any(c < 0 for c in counts):
        raise ShapeError("tokens_per_expert must be non-negative counts")
    bpp = bytes_per_param(layer, fmt)
    ns = n_star(bpp, cpu_flops, link_bytes_per_s)
    if dram_bytes_per_s is not None and not dram_bytes_per_s > 0:
        raise ShapeError(f"dram_bytes_per_s must be positive, got {dram_bytes_per_s!r}")
    used = [c for c in counts if c > 0]
    expert_bytes = layer.expert_bytes(fmt)
    flops_per_token = 6 * layer.hidden_size * layer.intermediate_size
    cpu = 0.0
    for c in used:
        t = c * flops_per_token / cpu_flops
        if dram_bytes_per_s is not None:
            t = max(t, expert_bytes / dram_bytes_per_s)
        cpu += t
    stream = len(used) * expert_bytes / link_bytes_per_s
    mean = sum(used) / len(used) if used else 0.0
    return StreamDecision(bool(used) and stream < cpu, ns, mean, len(used), cpu, stream)
