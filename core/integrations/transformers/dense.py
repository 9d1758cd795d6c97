"""transformers' dense linear layers on a moetier CPU backend's kernels.

On a CPU-only machine a decode step reads every dense weight once, as many bytes as its routed experts,
and torch's bf16 matrix-vector products reach a fraction of the memory bandwidth (measured 4-30 GB/s on
Qwen3-30B-A3B's projections against 35-55 GB/s for the native kernels, 2 threads). `route_dense` swaps
each `torch.nn.Linear` on the CPU (attention projections, dense MLPs, shared experts, the LM head; never
a router, whose logits pick the experts) for a `MoetierLinear` holding the matrix packed by the backend,
in the model's own dtype or a format asked for. The replaced weights are released.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import SettingError
from ...formats import get_format, quantize

# `dense_format` values that are not formats: leave transformers' own linear layers in place.
KEEP = "transformers"
# A forward of at most this many new tokens per sequence is a decode step (the kernels' decode path).
DECODE_TOKENS = 4
# Microseconds kernel workers spin between calls during decode forwards (longer than the Python between
# two calls of a step, and between steps), and otherwise (the pool's default).
DECODE_IDLE_SPIN_US = 2000
IDLE_SPIN_US = 50


class MoetierLinear(torch.nn.Module):
    """y = x W^T + b over the last dimension, W packed by `backend` (moetier.dense.PackedLinear)."""

    def __init__(self, backend, packed, dtype: torch.dtype):
        super().__init__()
        self.backend, self.packed = backend, packed
        self.in_features, self.out_features = packed.in_features, packed.out_features
        # Model code reads a linear's weight.dtype / .shape / .device (to cast its input): a stand-in with
        # those and one element of storage (the matrix itself lives packed in the backend).
        self.weight = torch.zeros((), dtype=dtype).expand(packed.out_features, packed.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.backend.linear(self.packed, x.reshape(-1, self.in_features))
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        p = self.packed
        return f"in_features={p.in_features}, out_features={p.out_features}, bias={p.has_bias}, " \
               f"format={p.fmt}, backend={p.backend}"


@dataclass(frozen=True)
class DenseRouting:
    """What `route_dense` did: which backend computes the dense matrices, in which format, how many."""

    backend: str | None  # None: transformers' own layers (nothing routed)
    fmt: str | None
    matrices: int = 0
    nbytes: int = 0  # packed bytes of the routed matrices
    replaced_nbytes: int = 0  # bytes of the weights they replaced


def routers(model: torch.nn.Module, layout) -> set[str]:
    """Names of the router linears: in each MoE block (the experts module's parent), the linear layers
    that produce one logit per routed expert."""
    from .quantizer import experts_modules

    out = set()
    for index, (name, _) in experts_modules(model).items():
        block = name.rpartition(".")[0]
        E = layout.layer(index).experts.num_experts
        for sub, m in model.get_submodule(block).named_modules():
            if isinstance(m, torch.nn.Linear) and m.out_features == E:
                out.add(f"{block}.{sub}")
    return out


def dtype_format(dtype: torch.dtype) -> str:
    """The weight format that holds a bf16 or fp32 model's matrices as they are."""
    return "bf16" if dtype == torch.bfloat16 else "fp32"


def choose_dense_backend(backends, dense_format: str | None, dtype: torch.dtype):
    """The CPU backend (of those computing the experts) that takes the dense matrices, and their format.

    dense_format None: the model's own dtype (bf16 or fp32) on the first CPU backend that computes it,
    else transformers' layers; a format name: that format, an error when no CPU backend computes it;
    "transformers": transformers' own layers."""
    if dense_format == KEEP:
        return None, None
    fmt = get_format(dense_format).name if dense_format is not None else dtype_format(dtype)
    for b in backends:
        if b.device.type == "cpu" and fmt in b.dense_formats:
            return b, fmt
    if dense_format is None:
        return None, None
    names = ", ".join(f"{b.name} ({', '.join(b.dense_formats) or 'none'})" for b in backends if b.device.type == "cpu")
    raise SettingError(f"no CPU backend of this model computes dense matrices in {fmt}: {names or 'no CPU backend'}; "
                       f"pick another format or dense_format='{KEEP}'")


def route_dense(model: torch.nn.Module, layout, backend, fmt: str, keep=(), stored=None) -> DenseRouting:
    """Swap every CPU `nn.Linear` of `model` but the routers (and the linears named in `keep`, whose weight
    other code reads) for a MoetierLinear on `backend` in `fmt`. stored: a function of a linear's name giving
    its weight as the checkpoint stores it (a GGUF file's Q4_K, Q6_K, ... matrices), or None; a stored matrix
    in a format the backend computes is packed as it is instead (DenseRouting.fmt then lists the formats)."""
    skip = routers(model, layout) | set(keep)
    todo = [(name, m) for name, m in model.named_modules()
            if type(m) is torch.nn.Linear and name not in skip and m.weight.device.type == "cpu"]
    matrices = nbytes = replaced = 0
    used = set()
    for name, m in todo:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        w = m.weight.detach()
        q = stored(name) if stored is not None else None
        if q is None or q.fmt.name not in backend.dense_formats or tuple(q.shape) != tuple(w.shape):
            q = quantize(w, fmt)
        packed = backend.pack_linear(q, None if m.bias is None else m.bias.detach())
        setattr(parent, child, MoetierLinear(backend, packed, w.dtype))
        used.add(q.fmt.name)
        matrices += 1
        nbytes += packed.nbytes
        replaced += w.numel() * w.element_size()
    return DenseRouting(backend.name, "+".join(sorted(used)) or fmt, matrices, nbytes, replaced)


class DecodeThreads:
    """Thread settings for the decode forwards of a model whose dense layers or attention run on moetier's
    pool: torch on one thread, and the backends' idle workers spinning between calls.

    What a decode step leaves to torch then is small (norms, rotary embeddings, the cache update,
    sampling). With spinning OpenMP workers (torch imported before moetier: see moetier.openmp) they hold
    the cores the kernels' pinned pool is about to need: a 2-core decode ran 3-4x slower with torch on two
    threads than on one. With sleeping workers the two are within noise (docs/benchmarks.md). A decode step
    calls the kernels ~50 times with a few hundred microseconds of Python between calls, and waking a
    parked kernel worker costs a futex round trip each time (measured 55 us per call on a 2-core VM, a few
    ms per token): during decode forwards the backends' workers spin for DECODE_IDLE_SPIN_US before
    parking, and are set back after. Prefill forwards (more than DECODE_TOKENS tokens) keep torch's own
    thread count, which their attention needs. The hooks restore both settings after each forward, also
    when the forward raises."""

    def __init__(self, model: torch.nn.Module, backends=()):
        self._saved: list[int] = []
        self.backends = tuple(backends)
        self.handles = (model.register_forward_pre_hook(self._pre, with_kwargs=True),
                        model.register_forward_hook(self._post, always_call=True))

    @staticmethod
    def _tokens(args, kwargs) -> int | None:
        for key in ("input_ids", "inputs_embeds"):
            t = kwargs.get(key)
            if isinstance(t, torch.Tensor):
                return t.shape[1] if t.ndim >= 2 else t.shape[0]
        if args and isinstance(args[0], torch.Tensor) and args[0].ndim >= 2:
            return args[0].shape[1]
        return None

    def _pre(self, module, args, kwargs):
        self._saved.append(torch.get_num_threads())
        tokens = self._tokens(args, kwargs)
        if tokens is not None and tokens <= DECODE_TOKENS:
            torch.set_num_threads(1)
            for b in self.backends:
                b.set_idle_spin_us(DECODE_IDLE_SPIN_US)

    def _post(self, module, args, output):
        if self._saved:
            torch.set_num_threads(self._saved.pop())
        for b in self.backends:
            b.set_idle_spin_us(IDLE_SPIN_US)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
