"""Whole models through transformers with moetier serving the routed experts (moetier.load).

Every built-in family and version is written as a tiny checkpoint in its real on-disk layout and
generates 32 greedy tokens twice: with transformers' own eager fp32 model (experts_implementation
"eager", attn_implementation "eager"; for FP8 / INT4 checkpoints on an independently dequantized copy of
the weights) and with `moetier.load`, whose experts run on moetier's runtime. Two expert backends:

- cpu.torch, moetier's fp32 reference backend: the same math as transformers in another summation order,
  so the tokens must be identical and the logits agree to EXACT_BOUND;
- the CPU backend this machine selects (what users get): its kernels may round activations (bf16 for
  vdpbf16ps, int8 for vpdpbusd), so the logits agree to the format's bound (see `kernel_bound`) and the
  tokens are identical except at a reference near-tie that bound can decide either way.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from moetier.errors import BackendUnavailable, CheckpointError, FormatError, LayoutError, SettingError
from moetier.plugins import load_registry

transformers = pytest.importorskip("transformers")

from moetier.integrations.transformers import IMPLEMENTATION, LAYER_ATTR, RUNTIME_ATTR, experts_forward, load  # noqa: E402
from moetier.integrations.transformers.quantizer import experts_modules  # noqa: E402
from moetier.integrations.transformers.generation import generate  # noqa: E402

from zoo.golden import RawTensors, independent_dequantize  # noqa: E402

NEW_TOKENS = 32
PROMPT = [[5, 17, 42, 8, 99, 3]]
# fp32 on both sides; only the summation order differs (per-expert matmuls, attention kernels), ~1e-7
# relative per operation, measured <= 1.5e-6 of the largest logit over every case. A real fault (a wrong
# expert, scale, shared expert or router weight) moves the logits by >= 1e-2 of their scale.
EXACT_BOUND = 2e-5

VERSIONS = {
    "deepseek": ("DeepSeek-V2", "DeepSeek-V2-Lite", "DeepSeek-V3", "DeepSeek-R1", "DeepSeek-V3.1", "DeepSeek-V3.2"),
    "kimi": ("Kimi-K2", "Kimi-K2-Thinking", "Kimi-K2.5"),
    "glm": ("GLM-4.5", "GLM-4.6", "GLM-4.7", "GLM-4.5-Air", "GLM-4.7-Flash", "GLM-5"),
    "qwen": ("Qwen1.5-MoE-A2.7B", "Qwen2-57B-A14B", "Qwen3-30B-A3B", "Qwen3-235B-A22B", "Qwen3-Next-80B-A3B",
             "Qwen3.5-35B-A3B", "Qwen3.5-397B-A17B"),
    "minimax": ("MiniMax-M2", "MiniMax-M2.1", "MiniMax-M2.5", "MiniMax-Text-01"),
}
# (family, version, quant, checkpoint float dtype): every version as shipped (DeepSeek-V3 family, Kimi-K2 and
# MiniMax-M2 in FP8; Kimi-K2-Thinking / K2.5 in compressed-tensors INT4; the rest bf16), one fp32
# checkpoint per family, and the other forms real releases exist in.
CASES = [(f, v, "default", "bf16") for f, vs in VERSIONS.items() for v in vs] + [
    ("deepseek", "DeepSeek-V2-Lite", None, "fp32"), ("kimi", "Kimi-K2", None, "fp32"), ("glm", "GLM-4.7-Flash", None, "fp32"),
    ("qwen", "Qwen3-30B-A3B", None, "fp32"), ("minimax", "MiniMax-M2", None, "fp32"),
    ("deepseek", "DeepSeek-V3", None, "bf16"), ("kimi", "Kimi-K2", None, "bf16"), ("minimax", "MiniMax-M2", None, "bf16"),
    ("glm", "GLM-4.7", "fp8", "bf16"), ("qwen", "Qwen3-30B-A3B", "fp8", "bf16"), ("deepseek", "DeepSeek-V3", "int4", "bf16"),
]
IDS = [f"{v}-{q or 'none'}-{d}" for _, v, q, d in CASES]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread is fastest, and on a shared 2-core machine two threads spinning against other
    processes ran 10-20x slower (measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def registry():
    return load_registry()


def test_every_claimed_version_is_tested(registry):
    for name, versions in VERSIONS.items():
        assert registry.family(name).versions == versions
    assert set(registry.families) >= set(VERSIONS)


# ---- checkpoints and transformers' reference -----------------------------------------------------------

def write_case(registry, family, version, quant, float_dtype, out: Path):
    """The tiny checkpoint (fixed seed: the same weights in every run) and its layout."""
    from moetier.model_zoo.tiny import write_tiny

    fam = registry.family(family)
    spec = fam.extras["tiny_spec"](version)
    if float_dtype == "fp32":  # stored and declared fp32 (the declared dtype is the experts' default format)
        config = dict(spec.config, torch_dtype="float32")
        if "text_config" in config:
            config["text_config"] = dict(config["text_config"], torch_dtype="float32")
        spec = dataclasses.replace(spec, float_dtype=torch.float32, config=config)
    return write_tiny(spec, fam.layout, str(out), quant=quant, seed=1)


def dequantized_copy(src: Path, dst: Path) -> Path:
    """The checkpoint with every FP8 / INT4 matrix replaced by its fp32 value (golden.independent_dequantize,
    written from the format definitions, no moetier code) and no quantization_config: what transformers
    runs as the reference for a quantized checkpoint."""
    from safetensors.torch import save_file

    raw = RawTensors(src)
    quantized = {n.rsplit(".", 1)[0] for n in raw.where if n.endswith((".weight_scale_inv", ".weight_packed"))}
    tensors = {}
    for name in raw.where:
        base, _, leaf = name.rpartition(".")
        if base in quantized:
            if leaf in ("weight", "weight_packed"):
                tensors[base + ".weight"] = independent_dequantize(raw, base).contiguous()
        else:
            tensors[name] = raw.get(name).contiguous()
    dst.mkdir()
    save_file(tensors, str(dst / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization_config", None)
    config.get("text_config", {}).pop("quantization_config", None)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def reference_model(folder: Path, dtype: torch.dtype = torch.float32):
    """transformers' own model of the checkpoint, fp32, eager experts and attention. Multimodal wrappers load
    as their image-text class (the vision tower, not in tiny checkpoints, stays random and unused). Kimi-K2's
    `kimi_k2` is not a transformers model type: it loads through its architecture class as deepseek_v3."""
    from transformers.utils import logging as hf_logging

    raw = json.loads((folder / "config.json").read_text())
    kwargs = dict(dtype=dtype, experts_implementation="eager", attn_implementation="eager")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        if "text_config" in raw:
            return transformers.AutoModelForImageTextToText.from_pretrained(str(folder), **kwargs).eval()
        cls = getattr(transformers, raw["architectures"][0])
        if raw.get("model_type") != cls.config_class.model_type:
            cfg = cls.config_class.from_pretrained(str(folder))
            cfg.model_type = cls.config_class.model_type
            kwargs["config"] = cfg
        return cls.from_pretrained(str(folder), **kwargs).eval()
    finally:
        hf_logging.set_verbosity(verbosity)


def greedy(model) -> tuple[torch.Tensor, torch.Tensor]:
    """(the NEW_TOKENS generated ids, their logits [steps, vocab] in float64)."""
    ids = torch.tensor(PROMPT)
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, attention_mask=torch.ones_like(ids),
                             pad_token_id=0)
    return out.sequences[0, ids.shape[1]:], torch.cat(out.logits).double()


@dataclasses.dataclass
class Prepared:
    folder: Path
    ref_dir: Path
    layout: object
    tokens: torch.Tensor
    logits: torch.Tensor


@pytest.fixture(scope="module")
def prepared(registry, tmp_path_factory):
    """Each case's checkpoint and transformers' greedy run on it, made once for both backends."""
    cache: dict[tuple, Prepared] = {}

    def get(family, version, quant, float_dtype) -> Prepared:
        key = (family, version, quant, float_dtype)
        if key not in cache:
            base = tmp_path_factory.mktemp("-".join(str(k) for k in key).replace(".", "_"))
            folder = base / "ckpt"
            layout = write_case(registry, *key, folder)
            ref_dir = folder if layout.quantization.scheme == "none" else dequantized_copy(folder, base / "dequantized")
            tokens, logits = greedy(reference_model(ref_dir))
            cache[key] = Prepared(folder, ref_dir, layout, tokens, logits)
        return cache[key]

    return get


def kernel_bound(fmt: str) -> float:
    """Logit bound, relative to the largest reference logit, for a backend that may round activations: the
    conformance suite's per-format bound on one MoE layer's relative error (bf16 / fp8: 1e-2 for bf16
    activations; int8 / int4: 4e-2 for int8 activations; fp32: 2e-5). The experts' error enters the
    residual stream once per MoE layer and the rest of the model is fp32, so the logits move by about
    that fraction of their scale; measured at most a third of it (int4 0.9%, bf16 / fp8 0.34%)."""
    from moetier.conformance.tolerances import tolerance

    return tolerance(fmt)


def same_tokens_up_to_a_near_tie(p: Prepared, tokens: torch.Tensor, bound: float, *, near_ties: bool,
                                 label: str) -> int:
    """The steps the tokens agree with the reference's; a difference is allowed (near_ties) only where the
    reference's two best logits are within 2 * bound of its logit scale."""
    scale = float(p.logits.abs().max())
    differ = (tokens != p.tokens).nonzero()
    steps = NEW_TOKENS if differ.numel() == 0 else int(differ[0, 0])
    if steps < NEW_TOKENS:
        top2 = p.logits[steps].topk(2).values
        margin = float(top2[0] - top2[1])
        assert near_ties and margin <= 2 * bound * scale, (
            f"{label}: token {steps} differs ({int(tokens[steps])} vs transformers' {int(p.tokens[steps])}); "
            f"the reference's top-2 margin there is {margin:.2e}, the logit bound {bound * scale:.2e}")
    return steps


def compare(p: Prepared, tokens: torch.Tensor, logits: torch.Tensor, bound: float, *, near_ties: bool, label: str):
    """Tokens identical over NEW_TOKENS steps (with near_ties: up to a step where the reference's two best
    logits are within 2 * bound of each other, a decision the bound cannot fix) and logits within bound."""
    scale = float(p.logits.abs().max())
    steps = same_tokens_up_to_a_near_tie(p, tokens, bound, near_ties=near_ties, label=label)
    # Up to and including the first differing step the two runs saw the same prefix: their logits compare.
    upto = min(steps + 1, NEW_TOKENS)
    diff = float((logits[:upto] - p.logits[:upto]).abs().max())
    assert diff <= bound * scale, f"{label}: logits differ by {diff:.2e} (bound {bound:g} x scale {scale:.3f})"
    return diff / scale, steps


# ---- the generation matrix -----------------------------------------------------------------------------

@pytest.mark.parametrize("family,version,quant,float_dtype", CASES, ids=IDS)
def test_greedy_generation_matches_transformers_exactly(prepared, family, version, quant, float_dtype):
    """cpu.torch computes the experts in fp32 like transformers' eager experts: identical tokens, logits to
    EXACT_BOUND. This checks the integration itself: names, routing, shared experts, layer tags, FP8
    dequantization of the dense layers, the INT4 experts."""
    p = prepared(family, version, quant, float_dtype)
    model = load(p.folder, dtype=torch.float32, backend="cpu.torch", threads=1, progress=False)
    try:
        assert model.moetier_layout == p.layout
        tokens, logits = greedy(model)
    finally:
        model.moetier_experts.close()
    compare(p, tokens, logits, EXACT_BOUND, near_ties=False, label=f"{version} on cpu.torch")


@pytest.mark.parametrize("family,version,quant,float_dtype", CASES, ids=IDS)
def test_greedy_generation_on_the_selected_backend(prepared, family, version, quant, float_dtype):
    """The CPU backend this machine selects, in the checkpoint's format (what `moetier.load` does by default)."""
    p = prepared(family, version, quant, float_dtype)
    model = load(p.folder, dtype=torch.float32, threads=1, progress=False)
    try:
        fmt = next(iter(model.moetier_experts.values())).shards[0].prepared.fmt.name
        assert fmt == p.layout.quantization.fmt or fmt == "bf16"
        tokens, logits = greedy(model)
        # moetier's own generation (what `moetier run` and the benchmark call): a static cache where the
        # model takes one
        model.generation_config.min_new_tokens = NEW_TOKENS  # as greedy(): the end token held off
        static, _ = generate(model, torch.tensor(PROMPT), max_new_tokens=NEW_TOKENS, pad_token_id=0)
    finally:
        model.moetier_experts.close()
    compare(p, tokens, logits, kernel_bound(fmt), near_ties=True, label=f"{version} ({fmt})")
    assert static.numel() == NEW_TOKENS
    same_tokens_up_to_a_near_tie(p, static, kernel_bound(fmt), near_ties=True, label=f"{version} ({fmt}, generate)")


def teacher_forced(model, p: Prepared) -> torch.Tensor:
    """Logits [steps, vocab] (float64) over the reference's sequence: the same positions as its greedy steps."""
    sequence = torch.cat([torch.tensor(PROMPT[0]), p.tokens])[None]
    with torch.inference_mode():
        return model(sequence).logits[0, len(PROMPT[0]) - 1:-1].double()


# A bf16 model rounds every activation (2^-9 relative), and a router near-tie the rounding flips moves a
# whole position: on these tiny random models transformers' own bf16 model lands 2-12% (relative norm)
# from its fp32 logits (measured over four versions), so whole-model logits cannot be held tighter than
# that. The test holds moetier's bf16 model to at most twice transformers' own bf16 distance (measured:
# 0.3x on Qwen3-30B-A3B, 0.8x on DeepSeek-V3), and each layer's experts to the bf16 format bound on the
# same inputs. Eager attention on both sides: transformers' SDPA path in bf16 on the CPU moved these
# logits by ~10% on its own.
BF16_LAYER_BOUND = 1e-2


@pytest.mark.parametrize("family,version,quant", [("qwen", "Qwen3-30B-A3B", "default"),
                                                   ("deepseek", "DeepSeek-V3", "default")])
def test_bf16_model_against_fp32_transformers(prepared, family, version, quant):
    from zoo.golden import mlp_modules, rel_err

    p = prepared(family, version, quant, "bf16")
    ref = reference_model(p.ref_dir)
    own_bf16 = float((teacher_forced(reference_model(p.ref_dir, torch.bfloat16), p) - p.logits).norm() / p.logits.norm())
    model = load(p.folder, dtype=torch.bfloat16, threads=1, progress=False, attn_implementation="eager")
    try:
        # bf16, but for the modules transformers itself keeps in fp32 (DeepSeek-V3's router)
        keep = set(model._keep_in_fp32_modules or ()) | set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
        others = [n for n, t in model.named_parameters()
                  if t.dtype != torch.bfloat16 and not (t.dtype == torch.float32 and any(k in n for k in keep))]
        assert not others, f"parameters neither bf16 nor kept in fp32 by transformers: {others[:4]}"
        rel = float((teacher_forced(model, p) - p.logits).norm() / p.logits.norm())
        gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
        ref_mlps = mlp_modules(ref)
        for index, (_, module) in experts_modules(model).items():
            spec = p.layout.layer(index).experts
            x = torch.randn(16, spec.hidden_size, generator=gen)
            ids = torch.stack([torch.randperm(spec.num_experts, generator=gen)[:spec.top_k] for _ in range(16)])
            w = torch.rand(16, spec.top_k, generator=gen)
            with torch.inference_mode():
                got = module(x.bfloat16(), ids, w)
                want = ref_mlps[index].experts(x, ids, w)
            assert got.dtype == torch.bfloat16
            assert rel_err(got.float(), want) <= BF16_LAYER_BOUND, f"layer {index}: {rel_err(got.float(), want):.2e}"
    finally:
        model.moetier_experts.close()
    print(f"{version} bf16: logits {rel:.2e} from transformers' fp32 (transformers' own bf16: {own_bf16:.2e})")
    assert rel <= 2 * own_bf16, f"{version} in bf16: {rel:.2e} from fp32, transformers' own bf16 {own_bf16:.2e}"


# ---- what the loader guarantees ------------------------------------------------------------------------

@pytest.mark.parametrize("family,version", [("qwen", "Qwen3-30B-A3B"), ("deepseek", "DeepSeek-V3")])
def test_dense_layers_move_onto_the_experts_backend(prepared, family, version):
    """Every CPU linear but the routers becomes a MoetierLinear on the experts' backend, whose packed bytes
    replace the released weights; the routers stay transformers' (their logits pick the experts), and so
    does the kv_b of latent attention that decodes absorbed (its weight is read as two per-head matrices)."""
    from moetier.integrations.transformers.dense import MoetierLinear, routers

    p = prepared(family, version, "default", "bf16")
    model = load(p.folder, dtype=torch.bfloat16, threads=1, progress=False)
    try:
        routing = model.moetier_dense
        backend = next(iter(model.moetier_experts.values())).shards[0].backend
        if "bf16" not in backend.dense_formats:
            assert routing.backend is None and routing.matrices == 0
            pytest.skip(f"{backend.name} computes no dense matrices")
        assert (routing.backend, routing.fmt) == (backend.name, "bf16")
        ours = [m for m in model.modules() if isinstance(m, MoetierLinear)]
        left = {n for n, m in model.named_modules() if type(m) is torch.nn.Linear}
        # MLA's per-head W_kb / W_vb are packed beside the linears (two block-diagonal matrices per module)
        from moetier.integrations.transformers.mla import PACKED_ATTR

        absorbed = [n for n in model.moetier_mla if hasattr(model.get_submodule(n), PACKED_ATTR)]
        assert absorbed == (model.moetier_mla if backend.grouped_dense else [])
        assert routing.matrices == len(ours) + 2 * len(absorbed) and len(ours) > 0
        assert left == routers(model, p.layout) | {f"{n}.kv_b_proj" for n in model.moetier_mla}
        assert all(m.packed.backend == backend.name and m.weight.dtype == torch.bfloat16 for m in ours)
        assert routing.replaced_nbytes <= routing.nbytes <= 1.1 * routing.replaced_nbytes + len(ours) * 65536
    finally:
        model.moetier_experts.close()


def test_decode_forwards_run_torch_on_one_thread_and_keep_the_workers_awake(prepared):
    """With the dense layers on the backend's pool, a decode forward (<= 4 tokens) runs torch on one thread
    and a prefill forward on the caller's count, and the native pool's idle workers spin for the decode
    setting only during decode forwards; both are restored after each forward, also after an error."""
    from moetier.integrations.transformers.dense import DECODE_IDLE_SPIN_US, IDLE_SPIN_US

    p = prepared("qwen", "Qwen3-30B-A3B", "default", "bf16")
    model = load(p.folder, dtype=torch.float32, threads=1, progress=False)
    if model.moetier_dense.backend is None:
        model.moetier_experts.close()
        pytest.skip("no CPU backend here computes dense matrices")
    backend = next(iter(model.moetier_experts.values())).shards[0].backend
    pool = getattr(backend, "_kernel_pool", None)  # the native backends' pool; others have no workers
    spin = (lambda: pool.idle_spin_us) if pool is not None else (lambda: None)
    seen = []
    model.model.norm.register_forward_hook(lambda *a: seen.append((torch.get_num_threads(), spin())))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            model(torch.tensor([PROMPT[0][:8]]))
            model(torch.tensor([PROMPT[0][:1]]))
            assert torch.get_num_threads() == 2
            with pytest.raises(Exception):
                model(torch.tensor([[10**9]]))  # an id past the vocabulary: the embedding raises
        assert [threads for threads, _ in seen] == [2, 1] and torch.get_num_threads() == 2
        if pool is not None:
            assert [us for _, us in seen] == [IDLE_SPIN_US, DECODE_IDLE_SPIN_US] and spin() == IDLE_SPIN_US
    finally:
        torch.set_num_threads(before)
        model.moetier_experts.close()


def test_decode_attention_runs_on_the_experts_backend(prepared):
    """A CPU model's attention modules get the backend's decode attention: greedy tokens over dynamic and
    static caches equal those of the same model on transformers' sdpa (fp32), decode calls reach the
    kernels and prefill calls do not."""
    from moetier.integrations.transformers import attention as attention_mod

    p = prepared("qwen", "Qwen3-30B-A3B", "default", "fp32")
    ours = load(p.folder, dtype=torch.float32, threads=1, progress=False)
    theirs = load(p.folder, dtype=torch.float32, threads=1, progress=False, attn_implementation="sdpa")
    try:
        backend = next(iter(ours.moetier_experts.values())).shards[0].backend
        if torch.float32 not in backend.attention_dtypes:
            assert ours.moetier_attention is None
            pytest.skip(f"{backend.name} computes no attention")
        assert ours.moetier_attention == backend.name and ours.config._attn_implementation == "moetier"
        assert theirs.moetier_attention is None and theirs.config._attn_implementation == "sdpa"
        calls = []
        real = backend.decode_attention
        backend.decode_attention = lambda q, *a, **k: calls.append(q.shape[2]) or real(q, *a, **k)
        for cache in ("dynamic", "static"):
            for model in (ours, theirs):
                model.generation_config.cache_implementation = cache
            calls.clear()
            tokens, logits = greedy(ours)
            want, want_logits = greedy(theirs)
            assert torch.equal(tokens, want), cache
            assert float((logits - want_logits).norm() / want_logits.norm()) < 1e-5
            layers = len(ours.model.layers)
            assert calls == [1] * layers * (NEW_TOKENS - 1), cache  # decode steps only, one call per layer
    finally:
        ours.moetier_experts.close()
        theirs.moetier_experts.close()


def test_prompts_short_enough_for_the_decode_kernels(prepared):
    """A first forward of at most 4 tokens also runs on the attention kernels; over a static cache its keys
    sit at the start and transformers passes no mask (SDPA's causal flag: token t sees keys 0..t). Greedy
    tokens equal the sdpa model's for 1-4 token prompts over both caches."""
    p = prepared("qwen", "Qwen3-30B-A3B", "default", "fp32")
    ours = load(p.folder, dtype=torch.float32, threads=1, progress=False)
    theirs = load(p.folder, dtype=torch.float32, threads=1, progress=False, attn_implementation="sdpa")
    try:
        if ours.moetier_attention is None:
            pytest.skip("no CPU backend here computes attention")
        for n in (1, 2, 4):
            ids = torch.tensor([PROMPT[0][:n]])
            for cache in ("dynamic", "static"):
                got = []
                for model in (ours, theirs):
                    model.generation_config.cache_implementation = cache
                    with torch.inference_mode():
                        got.append(model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                                  pad_token_id=0)[0, n:])
                assert torch.equal(got[0], got[1]), (n, cache)
    finally:
        ours.moetier_experts.close()
        theirs.moetier_experts.close()


def test_attention_settings(prepared):
    p = prepared("qwen", "Qwen3-30B-A3B", "default", "fp32")
    with pytest.raises(SettingError, match="attention implementation 'moetier' needs a CPU backend that computes"):
        load(p.folder, backend="cpu.torch", attn_implementation="moetier", progress=False)
    with pytest.raises(SettingError, match="unknown attention implementation 'bogus'; known: .*moetier.*sdpa"):
        load(p.folder, attn_implementation="bogus", progress=False)
    # Only sdpa is taken over (the kernels fall back to it): a model transformers runs on eager (gpt-oss's
    # attention sinks, which sdpa lacks) keeps it, and insisting on "moetier" there says why not.
    from moetier.integrations.transformers.attention import choose_attention_backend
    from moetier.reference import oracle

    assert choose_attention_backend([oracle()], torch.float32, None, "sdpa") is not None
    assert choose_attention_backend([oracle()], torch.float32, None, "eager") is None
    with pytest.raises(SettingError, match="takes over sdpa attention; transformers runs this model's on eager"):
        choose_attention_backend([oracle()], torch.float32, "moetier", "eager")
    model = load(p.folder, backend="cpu.torch", dtype=torch.float32, progress=False)
    try:
        assert model.moetier_attention is None and model.config._attn_implementation == "sdpa"
    finally:
        model.moetier_experts.close()


def test_dense_format_settings(prepared):
    p = prepared("qwen", "Qwen3-30B-A3B", "default", "bf16")
    with pytest.raises(FormatError, match="int3"):
        load(p.folder, dense_format="int3", progress=False)
    with pytest.raises(SettingError, match="no CPU backend of this model computes dense matrices in int8"):
        load(p.folder, backend="cpu.numba", dense_format="int8", progress=False)
    model = load(p.folder, dense_format="transformers", threads=1, progress=False)
    try:
        assert model.moetier_dense.backend is None
        assert model.model.layers[0].self_attn.q_proj.__class__ is torch.nn.Linear
    finally:
        model.moetier_experts.close()


def test_experts_are_never_materialized_and_know_their_layer(prepared):
    p = prepared("deepseek", "DeepSeek-V3", "default", "bf16")
    model = load(p.folder, dtype=torch.float32, threads=1, progress=False)
    try:
        mods = experts_modules(model)
        assert set(mods) == set(p.layout.moe_layer_indices)
        for index, (name, module) in mods.items():
            assert list(module.parameters()) == [] and list(module.buffers()) == [], name
            assert getattr(module, LAYER_ATTR) == index
            assert getattr(module, RUNTIME_ATTR) is model.moetier_experts[index]
        names = [n for n, _ in model.named_parameters()]
        assert not [n for n in names if ".experts." in n], "routed-expert parameters exist in the model"
        assert any(".shared_experts." in n for n in names)  # shared experts stay with transformers
        # Every parameter transformers holds is a real tensor read from the checkpoint, none left on meta.
        assert all(t.device.type == "cpu" for t in model.parameters())
        packed = model.moetier_experts.bytes_per_tier()
        assert sum(packed.values()) > 0
    finally:
        model.moetier_experts.close()


def test_registered_in_both_experts_registries():
    from transformers.integrations.finegrained_fp8 import ALL_FP8_EXPERTS_FUNCTIONS
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    from moetier.integrations.transformers import register

    register()
    assert ALL_EXPERTS_FUNCTIONS[IMPLEMENTATION] is experts_forward
    assert ALL_FP8_EXPERTS_FUNCTIONS[IMPLEMENTATION] is experts_forward


def test_fp8_experts_module_dispatches_to_moetier(prepared):
    """The module transformers' own FP8 quantizer swaps in (FP8Experts, looking up the FP8 registry) runs
    moetier's experts when the model names the "moetier" implementation."""
    from transformers.integrations.finegrained_fp8 import ALL_FP8_EXPERTS_FUNCTIONS, FP8Experts
    from transformers.integrations.moe import use_experts_implementation

    from moetier.integrations.transformers import register
    from moetier.runtime import load_experts

    register()
    p = prepared("deepseek", "DeepSeek-V3", "default", "bf16")
    cfg = transformers.DeepseekV3Config.from_pretrained(str(p.folder))
    cfg._experts_implementation = IMPLEMENTATION
    cls = use_experts_implementation(FP8Experts, experts_interface=ALL_FP8_EXPERTS_FUNCTIONS)
    with torch.device("meta"):
        module = cls(config=cfg, block_size=(128, 128))
    layer = p.layout.moe_layer_indices[0]
    spec = p.layout.layer(layer).experts
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    hidden = torch.randn(5, spec.hidden_size, generator=gen)
    ids = torch.stack([torch.randperm(spec.num_experts, generator=gen)[:spec.top_k] for _ in range(5)])
    weights = torch.rand(5, spec.top_k, generator=gen)
    with pytest.raises(SettingError, match="moetier.load"):
        module(hidden, ids, weights)
    with load_experts(str(p.folder), layers=[layer], progress=False) as experts:
        setattr(module, RUNTIME_ATTR, experts[layer])
        got = module(hidden, ids, weights)
        assert torch.equal(got, experts[layer](hidden, ids, weights))
        assert got.dtype == hidden.dtype and float(got.abs().sum()) > 0


def test_recorder_sees_every_moe_layer(prepared):
    p = prepared("qwen", "Qwen3-30B-A3B", "default", "bf16")
    seen = []

    class Recorder:
        def add(self, layer_index, topk_ids):
            seen.append((layer_index, tuple(topk_ids.shape)))

    model = load(p.folder, dtype=torch.float32, threads=1, progress=False)
    try:
        model.moetier_experts.set_recorder(Recorder())
        with torch.inference_mode():
            model(torch.tensor(PROMPT))
    finally:
        model.moetier_experts.close()
    k = p.layout.moe_layers[0].experts.top_k
    assert seen == [(i, (len(PROMPT[0]), k)) for i in p.layout.moe_layer_indices]


def test_a_plan_with_experts_on_disk_gives_the_same_logits(prepared):
    from moetier.placement.plan import ShardSpec

    p = prepared("qwen", "Qwen3-30B-A3B", "default", "bf16")

    class HalfOnDisk:
        def shards(self, layer_index):
            n = p.layout.layer(layer_index).experts.num_experts
            return (ShardSpec("cpu:numa0", "cpu.torch", "bf16", tuple(range(0, n, 2))),
                    ShardSpec("disk", "cpu.torch", "bf16", tuple(range(1, n, 2))))

    model = load(p.folder, plan=HalfOnDisk(), dtype=torch.float32, threads=1, cache_bytes=2**20, progress=False)
    try:
        tiers = model.moetier_experts.bytes_per_tier()
        assert tiers["cpu:numa0"] > 0 and "disk cache" in tiers
        tokens, logits = greedy(model)
    finally:
        model.moetier_experts.close()
    compare(p, tokens, logits, EXACT_BOUND, near_ties=False, label="half on disk")


# ---- errors a user can cause ---------------------------------------------------------------------------

def test_remote_code_only_model_types_are_refused_with_the_reason(prepared, tmp_path):
    """MiniMax-Text-01 as released names model_type `minimax_text_01` / MiniMaxText01ForCausalLM, which only
    its remote code defines: transformers 5.24 has no class for them (its own port is `minimax`, which the
    tiny checkpoint above uses), and moetier runs no remote code."""
    p = prepared("minimax", "MiniMax-Text-01", "default", "bf16")
    folder = tmp_path / "text01"
    shutil.copytree(p.folder, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="minimax_text_01", architectures=["MiniMaxText01ForCausalLM"],
                  auto_map={"AutoModelForCausalLM": "modeling_minimax_text_01.MiniMaxText01ForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(LayoutError, match="minimax_text_01.*remote code"):
        load(folder, dtype=torch.float32, progress=False)


def test_a_missing_dense_weight_is_an_error_not_a_random_init(prepared, tmp_path):
    from safetensors.torch import load_file, save_file

    p = prepared("qwen", "Qwen3-30B-A3B", "default", "bf16")
    folder = tmp_path / "broken"
    shutil.copytree(p.folder, folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    name = "model.layers.1.self_attn.q_proj.weight"
    shard = folder / index["weight_map"].pop(name)
    tensors = load_file(str(shard))
    del tensors[name]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="q_proj"):
        load(folder, dtype=torch.float32, progress=False)


def test_bad_settings_are_refused_before_loading(prepared, tmp_path):
    from moetier.hardware import load_inventory

    p = prepared("qwen", "Qwen3-30B-A3B", "default", "bf16")
    with pytest.raises(SettingError, match="float32 or torch.bfloat16"):
        load(p.folder, dtype=torch.float16)
    with pytest.raises(SettingError, match="no such file"):
        load(tmp_path / "nowhere")
    with pytest.raises(SettingError, match="beside it"):
        load(p.folder, plan=object(), backend="cpu.torch")
    arm = load_inventory(Path(__file__).parent / "inventories" / "arm_graviton3.json")
    with pytest.raises(BackendUnavailable, match="cpu.avx2"):
        load(p.folder, backend="cpu.avx2", inventory=arm)
    with pytest.raises(FormatError, match="unknown weight format 'int3'"):
        load(p.folder, backend="cpu.torch", fmt="int3")
    with pytest.raises(SettingError, match="torch device"):
        load(p.folder, device="gpu:7")
    if not torch.cuda.is_available():
        with pytest.raises(SettingError, match="no CUDA device"):
            load(p.folder, device="cuda:0")

