"""NativeBackend: an ExpertBackend over one compiled ISA variant of the C++ kernels.

`pack` hands each expert's reference storage (numpy views of the torch tensors: bf16 as uint16 bits, fp8
as bytes) to the extension, which repacks it into its panel layout; `compute` calls the fused forward,
which runs in the extension's own pinned thread pool with the GIL released.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from moetier.errors import FormatError, SettingError
from moetier.experts import ExpertBackend, ExpertLayerSpec, ExpertTensors, ForwardInputs, PreparedExperts
from moetier.formats import WeightFormat

from . import load_variant

NATIVE_FORMATS = ("fp32", "fp16", "bf16", "int8", "int4_g32", "int4_g64", "int4_g128", "fp8_e4m3")


def _bytes(t: torch.Tensor) -> np.ndarray:
    """A contiguous tensor's storage as a numpy array of its raw bytes (no copy when already contiguous)."""
    return t.detach().contiguous().view(torch.uint8).numpy()


def _floats(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().to(torch.float32).contiguous().numpy()


def _core_siblings(cpu: int) -> str:
    try:
        return Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip()
    except OSError:
        return str(cpu)


def worker_cpus(inventory, threads: int) -> tuple[list[int], list[int]]:
    """CPUs to pin `threads` workers to (one per physical core, spread over NUMA nodes) and their nodes.

    Returns empty lists (no pinning) when there are fewer allowed physical cores than threads."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    per_node: list[list[int]] = []
    node_ids: list[int] = []
    seen_cores = set()
    for node in inventory.numa_nodes:
        cpus = []
        for c in sorted(node.cpus):
            core = _core_siblings(c)
            if c in allowed and core not in seen_cores:
                seen_cores.add(core)
                cpus.append(c)
        if cpus:
            per_node.append(cpus)
            node_ids.append(node.id)
    if not per_node:
        return [], []
    cpus, nodes = [], []
    i = 0
    while len(cpus) < threads and any(per_node):
        k = i % len(per_node)
        if per_node[k]:
            cpus.append(per_node[k].pop(0))
            nodes.append(k)  # dense node index 0..n-1, the pool's numbering
        i += 1
    if len(cpus) < threads:
        return [], []
    return cpus, nodes


class NativeBackend(ExpertBackend):
    """Experts computed by the native kernels of one ISA variant (see moetier.backends.native)."""

    formats = NATIVE_FORMATS

    def __init__(self, name: str, variant: str, inventory, *, threads: int | None = None,
                 nan_policy: str = "raise", int8_activations: bool = True, extension: ModuleType | None = None):
        super().__init__(nan_policy=nan_policy)
        if threads is None:
            threads = max(1, inventory.cpu.physical_cores)
        self.name = name
        self.variant = variant
        self.int8_activations = bool(int8_activations)
        # `extension`: an already loaded kernel module of `variant` (the caller vouches that this CPU runs
        # it; the tests use it for a build over the software tile unit). Otherwise the guarded loader.
        self._ext = extension if extension is not None else load_variant(variant, inventory)
        self._inventory = inventory
        self._kernel_pool = None
        self.set_threads(threads)

    def set_threads(self, threads: int) -> None:
        """Compute on `threads` pinned workers from now on. Prepared experts stay valid: the packed layout
        never depends on the thread count (a forward already running keeps its old pool)."""
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            raise SettingError(f"{self.name}: threads must be a positive integer, got {threads!r}")
        cpus, nodes = worker_cpus(self._inventory, threads)
        self._kernel_pool = self._ext.ThreadPool(threads, cpus, nodes)
        self.threads = threads
        self.num_nodes = self._kernel_pool.num_nodes

    def __repr__(self) -> str:
        return f"NativeBackend({self.name}, variant={self.variant}, threads={self.threads})"

    def pack(self, layer: ExpertLayerSpec, fmt: WeightFormat, experts: Mapping[int, ExpertTensors]):
        if fmt.name not in NATIVE_FORMATS:
            raise FormatError(f"backend {self.name} does not compute format {fmt}")
        packed = self._ext.MoELayer(layer.num_experts, layer.hidden_size, layer.intermediate_size, fmt.name,
                                    layer.activation, float(layer.swiglu_alpha), float(layer.swiglu_limit),
                                    bool(layer.has_bias), self.int8_activations)
        ids = sorted(experts)

        def add(i_e):
            i, e = i_e
            t = experts[e]
            packed.add_expert(e, _bytes(t.gate.data), _floats(t.gate.scales), _bytes(t.up.data),
                              _floats(t.up.scales), _bytes(t.down.data), _floats(t.down.scales),
                              _floats(t.gate_bias), _floats(t.up_bias), _floats(t.down_bias),
                              node=i % self.num_nodes, num_nodes=self.num_nodes)

        # add_expert repacks with the GIL released, so large layers pack on every core.
        if len(ids) > 1 and self.threads > 1:
            with ThreadPoolExecutor(max_workers=self.threads) as ex:
                list(ex.map(add, enumerate(ids)))
        else:
            for item in enumerate(ids):
                add(item)
        return packed

    def payload_nbytes(self, payload, layer: ExpertLayerSpec, fmt: WeightFormat, ids) -> int:
        return payload.num_slots * payload.expert_bytes  # panels padded to 16 rows, scales beside them

    def compute(self, prepared: PreparedExperts, inputs: ForwardInputs) -> torch.Tensor:
        hidden = inputs.hidden.detach()
        T, H = hidden.shape
        hidden_bf16 = hidden.dtype == torch.bfloat16
        out = torch.empty(T, H, dtype=inputs.out_dtype)
        out_bf16 = inputs.out_dtype == torch.bfloat16
        prepared.payload.forward(
            self._kernel_pool,
            hidden.view(torch.uint16).numpy() if hidden_bf16 else hidden.numpy(), hidden_bf16,
            inputs.topk_ids.numpy(), inputs.topk_weights.numpy(),
            out.view(torch.uint16).numpy() if out_bf16 else out.numpy(), out_bf16,
        )
        return out
