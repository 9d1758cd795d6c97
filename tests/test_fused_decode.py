"""Fused decode layers (moetier.integrations.transformers.decode_layer) and the kernels they call:
RMSNorm (moetier.norm) and the rotary embedding with per-head norms (moetier.rotary).

The kernels are held to transformers' own modules on fresh random inputs: bf16 bit for bit (the same
operators and roundings), fp32 to a few ulps (only the sum of squares' order differs). The fused layer is
held to the same model with the fusion undone: identical greedy tokens and logits within the bf16 /
fp32 rounding of a differently ordered router sum.
"""
from __future__ import annotations

import os

import pytest
import torch

from moetier.errors import DeviceError, DTypeError, ShapeError
from moetier.norm import reference_rms_norm
from moetier.rotary import reference_rotary
from moetier.reference import ReferenceBackend

transformers = pytest.importorskip("transformers")
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRMSNorm, apply_rotary_pos_emb  # noqa: E402

from test_native_common import RUNNABLE, make_backend  # noqa: E402
from test_integration_transformers import NEW_TOKENS, PROMPT, greedy, prepared, registry  # noqa: E402,F401
from moetier.integrations.transformers import load  # noqa: E402
from moetier.integrations.transformers.generation import generate  # noqa: E402


@pytest.fixture(params=["reference", *RUNNABLE])
def backend(request, monkeypatch):
    """The reference backend, and a native backend on every kernel variant this CPU runs."""
    if request.param == "reference":
        return ReferenceBackend(precision=torch.float32)
    return make_backend(request.param, monkeypatch, threads=2)


def _gen():
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))


def _flips_allowed(numel: int, D: int) -> int:
    """How many bf16 elements may differ by one rounding from transformers' module when only the order of
    the fp32 sum of squares over D values differs. The two sums differ by at most ~D * 2^-24 relative
    (the worst case of a length-D fp32 sum, each side), which moves the scaled value by as much and flips
    its bf16 rounding (ulp 2^-8 relative) with probability <= 2 * D * 2^-24 / 2^-8 = D * 2^-15 per
    element; a row's elements share one sum, so their flips come together (measured: 15 of a 2048-wide
    row once; 3.7e-6 of the elements over 300 draws of 130 x 96). The one-ulp limit beside this count
    is what catches a wrong rounding."""
    return 4 + int(numel * D * 2 ** -15)


def _ulps(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest difference in units of the dtype's epsilon times the reference's magnitude (at least 1)."""
    eps = torch.finfo(want.dtype).eps
    return float(((got.double() - want.double()).abs() / (want.double().abs().clamp(min=1e-3) * eps)).max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 1, 2048), (1, 1, 32, 128), (130, 96), (3, 7)])
def test_rms_norm_is_transformers_rmsnorm(backend, dtype, shape):
    g = _gen()
    D = shape[-1]
    module = Qwen3MoeRMSNorm(D, eps=1e-6).to(dtype)
    with torch.no_grad():
        module.weight.copy_(torch.randn(D, generator=g) * 0.5 + 1)
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    with torch.inference_mode():
        want = module(x)
    got = backend.rms_norm(x, module.weight, eps=1e-6)
    assert got.shape == x.shape and got.dtype == dtype
    exact = reference_rms_norm(x, module.weight.detach(), 1e-6)
    bound = 2 ** -7 if dtype == torch.bfloat16 else 1e-6  # two bf16 roundings / fp32 ulps
    assert float(((got.double() - exact).abs() / exact.abs().max()).max()) <= bound
    if isinstance(backend, ReferenceBackend):
        return  # the float64 math rounded once, not transformers' two roundings
    if dtype == torch.bfloat16:
        # The same roundings; a sum of squares in another order may move n across a bf16 rounding boundary.
        differ, ulps = (got != want).sum().item(), _ulps(got, want)
        assert differ <= _flips_allowed(x.numel(), D) and ulps <= 2, \
            f"seed {g.initial_seed()}: {differ} elements differ, by up to {ulps:.2f} ulps"
    else:
        assert _ulps(got, want) <= 8  # fp32: sum order and one division, a few ulps


def _rope_reference(x, cos, sin, norm):
    """transformers' own: the q/k norm module, then apply_rotary_pos_emb on the first R dims."""
    x = norm(x) if norm is not None else x  # [T, H, D]
    R = cos.shape[-1]
    xt = x.transpose(0, 1)[None]  # [1, H, T, D]
    rot, _ = apply_rotary_pos_emb(xt[..., :R], xt[..., :R], cos[None], sin[None])
    return torch.cat([rot, xt[..., R:]], -1)[0].transpose(0, 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("T,H,D,R,with_norm", [(1, 32, 128, 128, True), (3, 4, 128, 64, False), (2, 5, 64, 32, True),
                                               (1, 2, 10, 10, False)])
def test_rotary_is_transformers_rope(backend, dtype, T, H, D, R, with_norm):
    g = _gen()
    norm = None
    if with_norm:
        norm = Qwen3MoeRMSNorm(D, eps=1e-6).to(dtype)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(D, generator=g) * 0.3 + 1)
    x = (torch.randn(T, H, D, generator=g) * 2).to(dtype)
    pos = torch.randint(0, 4000, (T,), generator=g)
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, R, 2, dtype=torch.float32) / R))
    angles = pos[:, None].float() * inv_freq
    emb = torch.cat((angles, angles), -1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    with torch.inference_mode():
        want = _rope_reference(x, cos, sin, norm)
    got = backend.rotary(x, cos, sin, norm_weight=None if norm is None else norm.weight, eps=1e-6)
    assert got.shape == x.shape and got.dtype == dtype
    exact = reference_rotary(x, cos, sin, None if norm is None else norm.weight.detach(), 1e-6)
    # bf16: up to four roundings of values up to the head's scale (norm, weight, products, sum)
    bound = 2 ** -6 if dtype == torch.bfloat16 else 1e-6
    assert float((got.double() - exact).abs().max() / exact.abs().max()) <= bound
    if isinstance(backend, ReferenceBackend):
        return
    if dtype == torch.bfloat16 or not with_norm:
        # bf16: the same operators and roundings; fp32 without a norm: products and sums alike
        assert torch.equal(got, want) or (with_norm and (got != want).sum() <= _flips_allowed(x.numel(), D)
                                          and (got - want).abs().max() <= 2 * 2 ** -8 * want.abs().max())
    else:
        assert float((got - want).abs().max()) <= 8 * torch.finfo(dtype).eps * float(want.abs().max())


def test_rotary_reads_strided_heads(backend):
    """q as the projection's output viewed [T, H, D] and heads picked with a stride: read in place."""
    g = _gen()
    x = torch.randn(2, 8, 64, generator=g).bfloat16()
    cos, sin = torch.rand(2, 64, generator=g).bfloat16(), torch.rand(2, 64, generator=g).bfloat16()
    view = x[:, ::2]
    assert torch.equal(backend.rotary(view, cos, sin), backend.rotary(view.contiguous(), cos, sin))


def test_typed_errors(backend):
    x = torch.randn(2, 4, 16)
    w = torch.ones(16)
    with pytest.raises(DTypeError, match="one dtype"):
        backend.rms_norm(x, w.bfloat16(), eps=1e-6)
    with pytest.raises(ShapeError, match=r"\[D\]"):
        backend.rms_norm(x, torch.ones(8), eps=1e-6)
    with pytest.raises(DTypeError, match="eps"):
        backend.rms_norm(x, w, eps=float("nan"))
    with pytest.raises(DTypeError, match="float16"):
        backend.rms_norm(x.half(), w.half(), eps=1e-6)
    cos = torch.ones(2, 16)
    with pytest.raises(ShapeError, match="even"):
        backend.rotary(x, cos[:, :15], cos[:, :15])
    with pytest.raises(ShapeError, match=r"\[T, heads, D\]"):
        backend.rotary(x, cos[:1], cos[:1])
    with pytest.raises(ShapeError, match=r"\[D\]"):
        backend.rotary(x, cos, cos, norm_weight=torch.ones(8))
    with pytest.raises(DTypeError, match="one dtype"):
        backend.rotary(x, cos.bfloat16(), cos.bfloat16())
    if torch.cuda.is_available():
        with pytest.raises(DeviceError):
            backend.rms_norm(x.cuda(), w.cuda(), eps=1e-6)


def test_backends_without_the_ops_say_so():
    from moetier.backends.cpu_torch import TorchBackend

    b = TorchBackend()
    with pytest.raises(DTypeError, match="computes RMSNorm on .* none"):
        b.rms_norm(torch.randn(2, 8), torch.ones(8), eps=1e-6)
    with pytest.raises(DTypeError, match="none"):
        b.rotary(torch.randn(1, 2, 8), torch.ones(1, 8), torch.ones(1, 8))


# ---- the fused layers in a whole model -------------------------------------------------------------------

def _unfuse(model) -> None:
    """Back to transformers' own layer and model forwards (the fusions are instance attributes over the
    classes')."""
    for name in model.moetier_fused_decode:
        del model.get_submodule(name).forward
    if model.moetier_fused_model:
        del model.forward


# Each fused layer class with what sets it apart: Qwen3 per-head q/k norms and the fused router; Qwen2-MoE
# q/k/v biases, a shared expert with its sigmoid gate and sliding-window layer types; GLM-4.5-Air partial
# rotary, dense first layers and a sigmoid router with shared experts (its own module); GLM-4.7 per-head
# q/k norms (use_qk_norm); MiniMax-M2 q/k norms over all heads and partial rotary. Multi-head latent
# attention (FusedMLADecode): DeepSeek-V3 (interleaved rotary, q LoRA, dense first layer, grouped sigmoid
# router with shared experts), Kimi-K2 (its layout of the same classes), GLM-4.7-Flash (Glm4MoeLite).
FUSED_MODELS = [("qwen", "Qwen3-30B-A3B", "default"), ("qwen", "Qwen1.5-MoE-A2.7B", "default"),
                ("glm", "GLM-4.5-Air", "default"), ("glm", "GLM-4.7", "default"), ("minimax", "MiniMax-M2", None),
                ("deepseek", "DeepSeek-V3", None), ("kimi", "Kimi-K2", None), ("glm", "GLM-4.7-Flash", None)]


@pytest.mark.parametrize("family,version,quant", FUSED_MODELS, ids=[v for _, v, _ in FUSED_MODELS])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_fused_layers_generate_what_the_layers_do(prepared, family, version, quant, dtype):
    """On the selected backend every decoder layer of these families is fused, and so is the model's decode
    forward; decode steps (and only those) take the fused path, one rotary call for q and one for k per
    layer and step, the model's own wrapper skipped on every step over a static cache (generate's 4D
    masks) and on none over a dynamic one (2D masks: the model makes them); greedy tokens over both
    caches equal those of the same model with both fusions undone, and the logits agree within the
    dtype's rounding of sums taken in another order (the router's)."""
    p = prepared(family, version, quant, "bf16")
    model = load(p.folder, dtype=dtype, threads=1, progress=False)
    try:
        backend = next(iter(model.moetier_experts.values())).shards[0].backend
        if dtype not in backend.rotary_dtypes or model.moetier_attention is None:
            assert model.moetier_fused_decode == []
            pytest.skip(f"{backend.name} does not compute the fused decode's operations")
        layers = len(model.model.layers)
        assert model.moetier_fused_decode == [f"model.layers.{i}" for i in range(layers)]
        assert model.moetier_fused_model
        calls, steps = [], []
        real = backend.compute_rotary
        backend.compute_rotary = lambda x, *a: calls.append(x.shape[0]) or real(x, *a)
        step = model.forward.fused
        real_step = step.forward
        step.forward = lambda ids, *a: steps.append(ids.shape[1]) or real_step(ids, *a)
        runs = {}
        for fused in (True, False):
            if not fused:
                _unfuse(model)
            for cache in ("static", "dynamic"):
                model.generation_config.cache_implementation = cache
                calls.clear()
                steps.clear()
                runs[fused, cache] = greedy(model)
                assert calls == ([1] * 2 * layers * (NEW_TOKENS - 1) if fused else []), (fused, cache)
                assert steps == ([1] * (NEW_TOKENS - 1) if fused and cache == "static" else []), (fused, cache)
        bound = 2e-2 if dtype == torch.bfloat16 else 1e-5
        for cache in ("static", "dynamic"):
            (tokens, logits), (want, want_logits) = runs[True, cache], runs[False, cache]
            assert torch.equal(tokens, want), cache
            assert float((logits - want_logits).abs().max() / want_logits.abs().max()) <= bound, cache
    finally:
        model.moetier_experts.close()


def test_fused_layers_in_moetiers_generate(prepared):
    """moetier's own generation (a static cache, what `moetier run` and the benchmark use) on fused layers:
    the tokens of the unfused model."""
    p = prepared("qwen", "Qwen3-30B-A3B", "default", "bf16")
    model = load(p.folder, dtype=torch.bfloat16, threads=1, progress=False)
    try:
        if not model.moetier_fused_decode:
            pytest.skip("no fused layers on this machine's backend")
        model.generation_config.min_new_tokens = NEW_TOKENS
        fused, _ = generate(model, torch.tensor(PROMPT), max_new_tokens=NEW_TOKENS, pad_token_id=0)
        _unfuse(model)
        plain, _ = generate(model, torch.tensor(PROMPT), max_new_tokens=NEW_TOKENS, pad_token_id=0)
        assert torch.equal(fused, plain)
    finally:
        model.moetier_experts.close()


@pytest.mark.parametrize("family,version,quant", FUSED_MODELS, ids=[v for _, v, _ in FUSED_MODELS])
def test_moetiers_greedy_loop_is_transformers_greedy_search(prepared, family, version, quant):
    """moetier's generate runs its own greedy loop over the fused model forward where transformers' greedy
    search would be an argmax per step (full attention, no logits processors): the same tokens as
    transformers' generate on the same model, an end token stops both (and is kept), the streamer gets
    the prompt then each token. Sliding-window layers or a repetition penalty leave it to transformers."""
    from moetier.integrations.transformers import generation

    p = prepared(family, version, quant, "bf16")
    model = load(p.folder, dtype=torch.bfloat16, threads=1, progress=False)
    try:
        if not model.moetier_fused_model:
            pytest.skip("no fused model forward on this machine's backend")
        config = model.config.get_text_config()
        full = all(t == "full_attention" for t in getattr(config, "layer_types", None) or ())
        assert generation._own_greedy_loop(model) == full
        ids = torch.tensor(PROMPT)
        with torch.inference_mode():
            want = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                                  attention_mask=torch.ones_like(ids))[0, ids.shape[1]:]
        hf_calls = []
        real_generate = model.generate
        model.generate = lambda *a, **k: hf_calls.append(1) or real_generate(*a, **k)

        class Tokens:
            def __init__(self):
                self.seen, self.ended = [], False

            def put(self, value):
                self.seen.append(value.reshape(-1).tolist())

            def end(self):
                self.ended = True

        stream = Tokens()
        got, times = generate(model, ids, max_new_tokens=NEW_TOKENS, pad_token_id=0, streamer=stream)
        assert hf_calls == ([] if full else [1])
        assert torch.equal(got, want)
        assert times.new_tokens == want.numel() and stream.ended  # (want may end at the config's end token)
        assert stream.seen == [PROMPT[0]] + [[int(t)] for t in want]
        stop = int(want[want.numel() // 2])
        first = int((want == stop).nonzero()[0, 0])
        got, _ = generate(model, ids, max_new_tokens=NEW_TOKENS, pad_token_id=0, eos_token_id=stop)
        assert torch.equal(got, want[:first + 1])
        model.generation_config.repetition_penalty = 1.3
        assert not generation._own_greedy_loop(model)
    finally:
        model.moetier_experts.close()


def test_fused_model_forward_leaves_other_forwards_to_the_model(prepared):
    """Decode forwards that ask for more than the logits (hidden states here) run the model's own forward:
    its outputs are all there, and the fused step never ran. Plain ones take the fused step, and the
    prompt's forward computes the LM head on its last token only, as for the model itself."""
    p = prepared("qwen", "Qwen3-30B-A3B", "default", "bf16")
    model = load(p.folder, dtype=torch.bfloat16, threads=1, progress=False)
    try:
        if not model.moetier_fused_model:
            pytest.skip("no fused model forward on this machine's backend")
        steps = []
        step = model.forward.fused
        real_step = step.forward
        step.forward = lambda ids, *a: steps.append(ids.shape[1]) or real_step(ids, *a)
        model.generation_config.cache_implementation = "static"
        ids = torch.tensor(PROMPT)
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0,
                                 output_hidden_states=True, return_dict_in_generate=True)
        assert steps == [] and len(out.hidden_states) == 4
        assert len(out.hidden_states[-1]) == len(model.model.layers) + 1
        # generate still sees the model's signature: the prompt's logits on its last token only.
        rows = []
        real_head = model.lm_head.forward
        model.lm_head.forward = lambda x: rows.append(x.shape[1]) or real_head(x)
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
        assert steps == [1, 1, 1] and rows == [1, 1, 1, 1]
    finally:
        model.moetier_experts.close()


def test_other_layers_and_settings_are_not_fused(prepared):
    """Families the fusion does not reproduce keep their layers (DeepSeek-V2's complex rotary); so does a
    model whose attention stays on transformers' sdpa (the fused layer calls the kernels' attention)."""
    p = prepared("deepseek", "DeepSeek-V2-Lite", None, "bf16")
    model = load(p.folder, dtype=torch.bfloat16, threads=1, progress=False)
    try:
        assert model.moetier_fused_decode == []
    finally:
        model.moetier_experts.close()
    p = prepared("qwen", "Qwen3-30B-A3B", "default", "bf16")
    model = load(p.folder, dtype=torch.bfloat16, threads=1, progress=False, attn_implementation="sdpa")
    try:
        assert model.moetier_fused_decode == []
    finally:
        model.moetier_experts.close()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_fused_mla_layers_with_rotate_half_rotary(registry, tmp_path, dtype):
    """DeepSeek-V3's layers with rope_interleave off (the rotary dims in rotate-half order, read as they
    lie): fused, they generate the unfused model's tokens, the logits within the dtype's rounding."""
    import json

    registry.family("deepseek").tiny("DeepSeek-V3", str(tmp_path), quant=None, seed=5)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_interleave"] = False
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = load(tmp_path, dtype=dtype, threads=1, progress=False)
    try:
        backend = next(iter(model.moetier_experts.values())).shards[0].backend
        if dtype not in backend.rotary_dtypes or model.moetier_dense.backend is None:
            assert model.moetier_fused_decode == []
            pytest.skip(f"{backend.name} does not compute the fused decode's operations")
        assert model.moetier_fused_decode == [f"model.layers.{i}" for i in range(len(model.model.layers))]
        assert model.model.layers[0].self_attn.config.rope_interleave is False
        model.generation_config.cache_implementation = "static"
        tokens, logits = greedy(model)
        _unfuse(model)
        want, want_logits = greedy(model)
    finally:
        model.moetier_experts.close()
    assert torch.equal(tokens, want)
    bound = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert float((logits - want_logits).abs().max() / want_logits.abs().max()) <= bound
