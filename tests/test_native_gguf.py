"""GGUF Q4_0 on the native kernels: Q4_0 is symmetric int4 in groups of 32 with an fp16 scale, so it is
re-encoded exactly as int4_g32 when packed (codes moved between nibbles, the scale widened) and runs on
the int4 kernels. Checked: the re-encoding keeps every value bit for bit, the layer equals the same
kernels on the int4_g32 re-encoding bit for bit, and stays within Q4_0's bound of the float64 reference
on every runnable variant, decode and prefill."""
from __future__ import annotations

import pytest
import torch

from moetier.conformance.tolerances import tolerance
from moetier.experts import ExpertTensors, ExpertWeights
from moetier.formats import convert, dequantize, quantize
from test_native_common import RUNNABLE, make_backend, needs_native, random_layer, reference, rel_err, routing

E, K, H, I = 6, 2, 256, 96


def fresh_seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()).item())


def test_reencoding_keeps_every_value():
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(40, 160, generator=g) * torch.rand(40, 1, generator=g) * 3
    w[3] = 0.0  # an all-zero block: d = 0
    q = quantize(w, "q4_0")
    c = convert(q, "int4_g32")
    assert c.fmt.name == "int4_g32" and c.shape == q.shape
    assert torch.equal(dequantize(c), dequantize(q)), f"seed {seed}"


@needs_native
@pytest.mark.parametrize("variant", RUNNABLE)
@pytest.mark.parametrize("T", [1, 48])  # decode and prefill
def test_q4_0_layer_is_the_int4_g32_kernel_on_the_same_values(variant, T, monkeypatch):
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    layer, w = random_layer(g, "q4_0", E, K, H, I)
    as_int4 = ExpertWeights({e: ExpertTensors(*(convert(m, "int4_g32") for m in (t.gate, t.up, t.down)))
                             for e, t in w.experts.items()})
    held = [e for e in range(E) if e != 2]
    hidden = torch.randn(T, H, generator=g)
    ids, tw = routing(g, T, E, K)
    b = make_backend(variant, monkeypatch)
    out = b.forward(b.prepare(layer, w, held, "q4_0"), hidden, ids, tw)
    ref = reference(layer, w, held, "q4_0", hidden, ids, tw)
    assert rel_err(out, ref) <= tolerance("q4_0"), f"{variant} seed {seed}: {rel_err(out, ref):.3g}"
    same = b.forward(b.prepare(layer, as_int4, held, "int4_g32"), hidden, ids, tw)
    assert torch.equal(out, same), f"{variant} seed {seed}"
