"""Shared setup of the native-kernel tests (no tests here): variants this host runs, random layers, oracle."""
from __future__ import annotations

import pytest
import torch

from moetier import ExpertLayerSpec, ExpertWeights
from moetier.backends.native import VARIANTS, is_built, missing_features
from moetier.hardware import detect_inventory
from moetier.reference import oracle

INVENTORY = detect_inventory()
# Every variant this CPU can execute and that is built: the tests run each of them (lower ones forced).
RUNNABLE = [v for v in VARIANTS if is_built(v) and not missing_features(v, INVENTORY)]
BACKEND_OF = {"avx2": "cpu.avx2", "avx512": "cpu.avx512", "avx512_bf16": "cpu.avx512", "amx": "cpu.amx"}
# Variants with vdpbf16ps kernels (bf16 activations: bf16 / fp16 / fp8 prefill, bf16 and fp8 decode). The
# integer dot path (int8 activations) runs on every variant: vpdpbusd on these, vpmaddubsw on the others.
DOT_VARIANTS = ("avx512_bf16", "amx")

needs_native = pytest.mark.skipif(not RUNNABLE, reason="no native kernel variant is built for this CPU "
                                                       "(python setup.py build_ext --inplace)")


def make_backend(variant: str, monkeypatch, threads: int = 2, **kwargs):
    """A backend on `variant`, forcing it through MOETIER_CPU_VARIANT exactly as a user would."""
    from moetier.backends.native.backend import NativeBackend

    monkeypatch.setenv("MOETIER_CPU_VARIANT", variant)
    return NativeBackend(BACKEND_OF[variant], variant, INVENTORY, threads=threads, **kwargs)


def random_layer(gen: torch.Generator, fmt: str, E: int, k: int, H: int, I: int, activation: str = "silu",
                 bias: bool = False):
    layer = ExpertLayerSpec(E, k, H, I, activation=activation, has_bias=bias)
    # Scaled so every intermediate is O(1) (the reference's conditioning assumption).
    g = torch.randn(E, I, H, generator=gen) / H ** 0.5
    u = torch.randn(E, I, H, generator=gen) / H ** 0.5
    d = torch.randn(E, H, I, generator=gen) / I ** 0.5
    b = (torch.randn(E, I, generator=gen), torch.randn(E, I, generator=gen), torch.randn(E, H, generator=gen)) \
        if bias else None
    return layer, ExpertWeights.from_float(g, u, d, fmt, b)


def routing(gen: torch.Generator, T: int, E: int, k: int):
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]) if T else torch.zeros(0, k, dtype=torch.long)
    w = torch.rand(T, k, generator=gen)
    return ids, w


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def reference(layer, weights, held, fmt, hidden, ids, w):
    o = oracle()
    return o.forward(o.prepare(layer, weights, held, fmt), hidden, ids, w)
