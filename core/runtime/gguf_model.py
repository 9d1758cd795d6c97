"""A GGUF file as a moetier model: its MoE layers as MoEBlocks, and what `moetier zoo show / run` print for it.

The layout comes from the file's metadata through the zoo's families (moetier.checkpoint.gguf); each MoE
layer's experts are prepared in the format the file stores them in. A layer's down may be stored in
another GGUF type than its gate/up (llama.cpp's Q4_K_M keeps some ffn_down tensors in Q6_K): such a layer
is computed in the mixed format (e.g. q4_k+q6_k), each projection in its own type, with no conversion.
Gate and up in different types have no layer format and need an explicit one to convert to; nothing is
converted silently, and a backend that lacks the file's format is refused rather than replaced.
"""
from __future__ import annotations

import time
from collections import Counter

import torch

from ..checkpoint.gguf import GGUFExperts, GGUFFile, read_router, read_shared, verify_gguf
from ..errors import FormatError
from ..experts import ExpertBackend, why_not
from ..formats import WeightFormat, get_format, mixed_format
from .moe_block import MoEBlock


def layer_format(source: GGUFExperts, backend: ExpertBackend, fmt: str | WeightFormat | None) -> tuple[str, bool]:
    """(the format to prepare the layer in, whether experts of a type without a moetier format may be read
    through the gguf dequantizer). FormatError when the file's own format cannot be used as it is."""
    gf, i = source.gf, source.layer.index
    native = source.formats()
    if fmt is not None:
        return get_format(fmt).name, True
    stored = ", ".join(f"{w} {t}" for w, t in source.type_names().items())
    if any(f is None for f in native.values()):
        raise FormatError(f"{gf.path}: layer {i} stores its experts as {stored}, which moetier cannot compute "
                          "as they are; pass a format to convert them to (e.g. --format bf16)")
    if native["gate"] != native["up"]:
        raise FormatError(f"{gf.path}: layer {i} stores its experts as {stored}; moetier keeps a layer's gate and up "
                          "in one format (down may differ), so pass a format to convert to (--format fp32 is exact, "
                          "bf16 or the larger of the GGUF types are smaller)")
    fmt = mixed_format(native["gate"], native["down"])
    if not backend.computes(fmt):
        stored_as = fmt.name if fmt.split is None else f"{fmt} (gate/up {fmt.gate_up}, down {fmt.down})"
        raise FormatError(f"backend {backend.name} does not compute {stored_as}, the format layer {i} of "
                          f"{gf.path.name} stores its experts in{why_not(backend, fmt)}; choose a backend that does "
                          f"(e.g. cpu.numba) or pass a format to convert to (it computes {', '.join(backend.formats)})")
    return fmt.name, False


def file_formats(gf: GGUFFile, layout, backend: ExpertBackend, fmt: str | WeightFormat | None = None) -> dict[int, str]:
    """MoE layer index -> the format to prepare its experts in on `backend`: each layer's own (see
    `layer_format`: a Q4_K_M file's layers differ), or `fmt` for all of them."""
    return {m.index: layer_format(GGUFExperts(gf, m), backend, fmt)[0] for m in layout.moe_layers}


def gguf_block(gf: GGUFFile, layout, layer_index: int, backend: ExpertBackend, *,
               fmt: str | WeightFormat | None = None, experts=None, progress: bool | None = False) -> MoEBlock:
    """MoE layer `layer_index` of the file as an MoEBlock on `backend` (router, selection bias and shared
    expert in fp32; routed experts prepared in `fmt`, by default the file's own, see `layer_format`)."""
    layer = layout.layer(layer_index)
    source = GGUFExperts(gf, layer, progress=progress)
    used, source.convert = layer_format(source, backend, fmt)
    router, shared = read_router(gf, layer), read_shared(gf, layer)
    ids = range(layer.experts.num_experts) if experts is None else experts
    try:
        prepared = backend.prepare(layer.experts, source, ids, used)
    finally:
        source.done()
    return MoEBlock(layer, router, backend, prepared, shared=shared)


def show_gguf(path, registry=None, *, verify: bool = False) -> dict:
    """The layout summary `moetier zoo show` prints, with the file's architecture and expert formats."""
    with GGUFFile(path) as gf:
        layout = gf.layout(registry)
        out = layout.summary()
        types = Counter()
        for m in layout.moe_layers:
            t = GGUFExperts(gf, m).type_names()
            types[f"{t['gate']}/{t['up']}/{t['down']}".lower()] += 1
        out["quantization"] = "gguf " + ", ".join(f"{k} ({n} layers)" for k, n in sorted(types.items())) \
            + " (gate/up/down)"
        out["gguf_architecture"] = gf.arch
        if verify:
            out["verified_matrices"] = verify_gguf(gf, layout)
    return out


def run_gguf(path, backend: ExpertBackend, *, tokens: int = 16, fmt: str | None = None, seed: int = 0,
             registry=None, progress: bool | None = None):
    """`moetier zoo run` for a GGUF file: each MoE layer on `backend` against the float64 reference on the
    same weights (layer_check.run_checkpoint's check, with the layers read from the GGUF file)."""
    from ..reference import oracle
    from .layer_check import check_block

    ref_backend = oracle()
    g = torch.Generator().manual_seed(seed)
    results = []
    with GGUFFile(path) as gf:
        layout = gf.layout(registry)
        for m in layout.moe_layers:
            t0 = time.perf_counter()
            block = gguf_block(gf, layout, m.index, backend, fmt=fmt, progress=progress)
            prepare_s = time.perf_counter() - t0
            ref = gguf_block(gf, layout, m.index, ref_backend, fmt=block.prepared.fmt.name)
            results.append(check_block(m.index, block, ref, torch.randn(tokens, layout.hidden_size, generator=g),
                                       prepare_s))
            del block, ref
            gf.release()
    return results
