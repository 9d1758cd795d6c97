"""Absorbed MLA decode (moetier.integrations.transformers.mla): a decode step attends over the cached latents
without running kv_b_proj over the cache, and computes what transformers' expanded attention computes.

On every MLA family's tiny checkpoint (DeepSeek-V3 and V2-Lite: cos/sin and complex rotary; Kimi-K2;
GLM-4.7-Flash), in fp32: 16 greedy tokens with the absorbed path equal those with transformers' own forward,
the logits of every step within 1e-5 of their scale (the same sums in another order: fp32 rounding over
a few hundred terms), and kv_b_proj runs in the prefill only. The greedy-generation tests against
transformers' own model (test_integration_transformers.py) run the absorbed path too."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import moetier  # noqa: E402
from moetier.integrations.transformers.mla import mla_modules  # noqa: E402
from moetier.plugins import load_registry  # noqa: E402

CASES = [("deepseek", "DeepSeek-V3"), ("deepseek", "DeepSeek-V2-Lite"), ("kimi", "Kimi-K2"), ("glm", "GLM-4.7-Flash")]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def greedy(model, ids, steps):
    """Greedy tokens and per-step logits through a static cache (as `moetier run` generates)."""
    model.generation_config.cache_implementation = "static"
    out = model.generate(ids, max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True,
                         pad_token_id=0, eos_token_id=None)
    return out.sequences[0, ids.shape[1]:], torch.stack(out.logits)[:, 0].float()


@pytest.mark.parametrize("family,version", CASES)
def test_absorbed_decode_is_transformers_decode(tmp_path, family, version):
    registry = load_registry()
    fam = registry.family(family)
    fam.tiny(version, str(tmp_path), quant=None, seed=3)
    model = moetier.load(tmp_path, backend="cpu.torch", dtype=torch.float32, device="cpu", progress=False)
    mods = mla_modules(model)
    assert mods and sorted(mods) == model.moetier_mla
    kv_b_rows = []
    for m in mods.values():
        m.kv_b_proj.register_forward_hook(lambda mod, args, out: kv_b_rows.append(args[0].shape[-2]))
    ids = torch.randint(0, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(0))
    absorbed, logits = greedy(model, ids, 16)
    # kv_b ran once per layer, in the prefill (over the static cache's 7 + 16 - 1 slots); each decode step read
    # the latents as they are.
    assert kv_b_rows == [7 + 16 - 1] * len(mods)
    for m in mods.values():
        m.forward = m._moetier_expanded_forward
    expanded, want = greedy(model, ids, 16)
    model.moetier_experts.close()
    assert torch.equal(absorbed, expanded), (absorbed, expanded)
    err = ((logits - want).abs().amax(-1) / want.abs().amax(-1)).max()
    assert err <= 1e-5, err


@pytest.mark.parametrize("family,version", CASES)
def test_absorbed_decode_on_the_dense_kernels_is_transformers_decode(tmp_path, family, version):
    """With the dense layers on a native backend, W_kb / W_vb are packed there as one block per head
    (moetier.dense.PackedLinear.groups) and the decode reads them instead of kv_b; in fp32 (the kernels' exact
    fp32 path at these widths) greedy tokens equal transformers' expanded forward and the logits agree within
    1e-5 of their scale, as the torch products do."""
    from moetier.integrations.transformers.mla import PACKED_ATTR

    registry = load_registry()
    registry.family(family).tiny(version, str(tmp_path), quant=None, seed=3)
    model = moetier.load(tmp_path, dtype=torch.float32, device="cpu", progress=False, threads=1)
    try:
        routing, mods = model.moetier_dense, mla_modules(model)
        backend = next(iter(model.moetier_experts.values())).shards[0].backend
        if not getattr(backend, "grouped_dense", False):
            pytest.skip(f"{backend.name} computes no grouped dense matrices")
        packed = [getattr(m, PACKED_ATTR) for m in mods.values()]
        assert len(packed) == len(mods) > 0
        for (be, w_k, w_v), m in zip(packed, mods.values()):
            assert be is backend and w_k.groups == w_v.groups == m.num_heads
            assert (w_k.in_features, w_k.out_features) == (m.num_heads * m.qk_nope_head_dim, m.num_heads * m.kv_lora_rank)
            assert (w_v.in_features, w_v.out_features) == (m.num_heads * m.kv_lora_rank, m.num_heads * m.v_head_dim)
        assert routing.backend == backend.name and routing.matrices >= 2 * len(mods)
        ids = torch.randint(0, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(0))
        absorbed, logits = greedy(model, ids, 16)
        for m in mods.values():
            m.forward = m._moetier_expanded_forward
        expanded, want = greedy(model, ids, 16)
    finally:
        model.moetier_experts.close()
    assert torch.equal(absorbed, expanded), (absorbed, expanded)
    err = ((logits - want).abs().amax(-1) / want.abs().amax(-1)).max()
    assert err <= 1e-5, err
