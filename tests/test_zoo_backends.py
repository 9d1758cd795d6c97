"""moe_block runs on any backend: every CPU backend this host can run serves the same layer (read from a
tiny checkpoint) and agrees with cpu.torch within the conformance tolerance of the weight format."""
from __future__ import annotations

import random

import pytest
import torch

from moetier.backends.cpu_torch import TorchBackend
from moetier.checkpoint import Checkpoint
from moetier.conformance import runnable_backends
from moetier.conformance.tolerances import tolerance
from moetier.hardware import load_inventory
from moetier.runtime.moe_block import MoEBlock
from moetier.plugins import load_registry

from zoo.fixtures import tiny_checkpoint  # noqa: F401  (session fixture)

pytest.importorskip("transformers")

REGISTRY = load_registry()
INVENTORY = load_inventory()
OTHERS = [n for n in runnable_backends(REGISTRY, INVENTORY) if n != "cpu.torch"]


@pytest.mark.skipif(not OTHERS, reason="no CPU backend besides cpu.torch runs here")
@pytest.mark.parametrize("backend_name", OTHERS)
@pytest.mark.parametrize("family,version", [("minimax", "MiniMax-M2"), ("kimi", "Kimi-K2.5"),
                                            ("qwen", "Qwen3.5-35B-A3B")])
def test_moe_block_on_every_backend(tiny_checkpoint, backend_name, family, version):
    ckpt_dir, layout = tiny_checkpoint(family, version, "default")
    backend = REGISTRY.backend(backend_name).create(INVENTORY)
    layer = layout.moe_layers[-1]
    fmt = layout.quantization.fmt if layout.quantization.fmt in backend.formats else "bf16"
    if fmt not in backend.formats:
        pytest.skip(f"{backend_name} computes neither {layout.quantization.fmt} nor bf16")
    seed = random.SystemRandom().randrange(2**31)
    x = torch.randn(24, layout.hidden_size, generator=torch.Generator().manual_seed(seed))
    with Checkpoint(str(ckpt_dir)) as ckpt:
        ours = MoEBlock.from_checkpoint(ckpt, layout, layer.index, backend, fmt=fmt)
        ref = MoEBlock.from_checkpoint(ckpt, layout, layer.index, TorchBackend(), fmt=fmt)
        # Half the experts on each backend: ids a backend does not hold contribute nothing.
        E = layer.experts.num_experts
        low = MoEBlock.from_checkpoint(ckpt, layout, layer.index, backend, fmt=fmt, experts=range(E // 2))
        high = MoEBlock.from_checkpoint(ckpt, layout, layer.index, TorchBackend(), fmt=fmt, experts=range(E // 2, E))
    out, want = ours(x), ref(x)
    err = float((out - want).norm() / want.norm())
    assert err <= tolerance(fmt), f"{backend_name} {version} {fmt}: {err:.2e} (seed {seed})"
    ids, w = ref.route(x)
    split = low.routed(x, ids, w) + high.routed(x, ids, w) + (ref.shared(x) if layer.shared else 0)
    err = float((split - want).norm() / want.norm())
    assert err <= tolerance(fmt), f"{backend_name} {version} split across tiers: {err:.2e} (seed {seed})"
