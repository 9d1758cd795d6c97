"""`moetier bench model`: whole-model prefill and decode through transformers' generation, moetier against
transformers on the same weights and against the byte limit of the machine measured in the same run.

- The model: a synthetic checkpoint with the real layer dimensions of Qwen3-30B-A3B (hidden 2048, 128
  experts top-8, expert intermediate 768, 32 query / 4 key-value heads of 128) or of DeepSeek-V3 (hidden
  7168, MLA, top-8 of 8 groups plus a shared expert, expert intermediate 2048, a dense first layer), with
  fewer layers (and for DeepSeek-V3 fewer experts) and a 32k vocabulary, written by the model zoo's
  tiny-checkpoint writer in the family's real safetensors layout (bf16).
- Implementations: `moetier.load` on a CPU backend in each asked format, and transformers' own model on
  the same bf16 weights with its `eager` and `grouped_mm` experts implementations; everything in bf16 on
  the CPU, greedy, a static KV cache.
- Correctness first: before any timing, each implementation's logits over a check prompt are compared
  with transformers' eager model on the weights that implementation computes with (for a quantized format
  moetier's own quantization of the same bf16 weights, dequantized); a run outside the format's bound is
  reported as failed, and its speed is not shown.
- Timing: one generation of `prompt_tokens` prompt tokens and `new_tokens` new ones gives both rates
  (prefill: call to first token; decode: first to last token, at a context of about the prompt length),
  after an untimed warm-up generation; the median of `repeats`.
- The byte limit: the weight bytes one decode token must read (every dense weight once, one embedding row,
  and per MoE layer the top-k experts in the format's packed bytes) divided by the best read bandwidth of
  the multi-threaded probe, measured before and after the implementations.
"""
from __future__ import annotations

import gc
import importlib
import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ..errors import MoetierError, SettingError

SCHEMA = "moetier.bench.model/1"
TRANSFORMERS_IMPLS = ("eager", "grouped_mm")
DEFAULT_FORMATS = ("bf16", "int8", "int4_g64", "fp8_e4m3")
QUICK_FORMATS = ("bf16", "int4_g64")
CHECK_TOKENS = 32  # prompt length of the correctness check


@dataclass(frozen=True)
class MLADims:
    """DeepSeek's multi-head latent attention: the query and key-value compression ranks and the head parts."""

    q_lora_rank: int
    kv_lora_rank: int
    qk_rope_head_dim: int
    qk_nope_head_dim: int
    v_head_dim: int


@dataclass(frozen=True)
class ModelDims:
    """The decoder dimensions of a synthetic model in one family's layout.

    family "qwen3_moe": every layer an MoE layer, grouped-query attention of `heads` / `kv_heads` heads of
    `head_dim`. family "deepseek_v3": the first `dense_layers` layers have a dense MLP of
    `dense_intermediate`, the others `shared_experts` shared experts beside the routed ones and a sigmoid
    router over `n_group` groups (top `topk_group`); attention is MLA (`mla`)."""

    name: str
    hidden: int
    layers: int
    experts: int
    top_k: int
    moe_intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    family: str = "qwen3_moe"
    dense_layers: int = 0
    dense_intermediate: int = 0
    shared_experts: int = 0
    n_group: int = 1
    topk_group: int = 1
    mla: MLADims | None = None

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {self.family!r}")
        if self.layers <= self.dense_layers:
            raise SettingError(f"{self.name}: {self.layers} layers leave no MoE layer after the "
                               f"{self.dense_layers} dense ones")
        if self.experts % self.n_group or self.experts // self.n_group * self.topk_group < self.top_k:
            raise SettingError(f"{self.name}: {self.experts} experts in {self.n_group} groups (top {self.topk_group}) "
                               f"cannot give top-{self.top_k}")

    def describe(self) -> str:
        moe = self.layers - self.dense_layers
        parts = [f"{self.name}: {self.layers} layers"
                 + (f" ({self.dense_layers} dense, {moe} MoE)" if self.dense_layers else ""),
                 f"hidden {self.hidden}", f"{self.experts} experts top-{self.top_k}"
                 + (f" + {self.shared_experts} shared" if self.shared_experts else ""),
                 f"expert intermediate {self.moe_intermediate}"]
        if self.mla:
            m = self.mla
            parts.append(f"MLA {self.heads} heads (q rank {m.q_lora_rank}, kv rank {m.kv_lora_rank}, "
                         f"qk {m.qk_nope_head_dim}+{m.qk_rope_head_dim}, v {m.v_head_dim})")
        else:
            parts.append(f"{self.heads}/{self.kv_heads} heads of {self.head_dim}")
        return ", ".join(parts + [f"vocab {self.vocab}"])


FAMILIES = {"qwen3_moe": ("qwen", "Qwen3-30B-A3B", "Qwen3MoeForCausalLM"),
            "deepseek_v3": ("deepseek", "DeepSeek-V3", "DeepseekV3ForCausalLM")}
DEEPSEEK_V3_MLA = MLADims(1536, 512, 64, 128, 128)

DIMS = {
    # Qwen3-30B-A3B's published config, with 8 of its 48 layers and a 32k vocabulary (the real one is 151k).
    "qwen3-30b-a3b": ModelDims("qwen3-30b-a3b", 2048, 8, 128, 8, 768, 32, 4, 128, 32768),
    # DeepSeek-V3's published layer dimensions (MLA, one shared expert, top-8 of 8 groups, dense MLP first)
    # in a slice: one dense and two MoE layers with 32 of the 256 routed experts (a bf16 MoE layer of all 256
    # is 22.5 GB) and a 32k vocabulary (the real one is 129k). A decode token reads what the real model's
    # layers read (top-8 + the shared expert); prefill spreads its tokens over 8x fewer experts.
    "deepseek-v3": ModelDims("deepseek-v3", 7168, 3, 32, 8, 2048, 128, 128, 128, 32768, family="deepseek_v3",
                             dense_layers=1, dense_intermediate=18432, shared_experts=1, n_group=8, topk_group=4,
                             mla=DEEPSEEK_V3_MLA),
    # For testing the harness only: seconds to write and run.
    "tiny": ModelDims("tiny", 128, 2, 16, 4, 64, 4, 2, 32, 512),
    "tiny-deepseek": ModelDims("tiny-deepseek", 128, 3, 16, 4, 64, 4, 4, 32, 512, family="deepseek_v3",
                               dense_layers=1, dense_intermediate=192, shared_experts=1, n_group=4, topk_group=2,
                               mla=MLADims(64, 32, 16, 32, 32)),
}


def dims_from_config(base: ModelDims, cfg: dict) -> ModelDims:
    """`base` with the dimensions of an existing checkpoint's config.json (a reused --model folder)."""
    family = cfg.get("model_type")
    if family not in FAMILIES:
        raise SettingError(f"the checkpoint is a {family!r} model; bench model writes and reads "
                           f"{' and '.join(FAMILIES)} checkpoints")
    common = dict(family=family, hidden=cfg["hidden_size"], layers=cfg["num_hidden_layers"],
                  experts=cfg.get("n_routed_experts") or cfg.get("num_experts") or cfg["num_local_experts"],
                  top_k=cfg["num_experts_per_tok"], moe_intermediate=cfg["moe_intermediate_size"],
                  heads=cfg["num_attention_heads"], kv_heads=cfg["num_key_value_heads"], vocab=cfg["vocab_size"])
    if family == "qwen3_moe":
        return replace(base, **common, head_dim=cfg["head_dim"], dense_layers=0, dense_intermediate=0,
                       shared_experts=0, n_group=1, topk_group=1, mla=None)
    mla = MLADims(cfg["q_lora_rank"], cfg["kv_lora_rank"], cfg["qk_rope_head_dim"], cfg["qk_nope_head_dim"],
                  cfg["v_head_dim"])
    return replace(base, **common, head_dim=mla.v_head_dim, dense_layers=cfg.get("first_k_dense_replace", 0),
                   dense_intermediate=cfg["intermediate_size"], shared_experts=cfg.get("n_shared_experts", 0),
                   n_group=cfg.get("n_group", 1), topk_group=cfg.get("topk_group", 1), mla=mla)


@dataclass(frozen=True)
class ModelBenchConfig:
    dims: ModelDims
    backend: str
    formats: tuple[str, ...]
    threads: int
    prompt_tokens: int
    new_tokens: int
    repeats: int
    transformers: bool = True
    quick: bool = False
    seed: int = 0
    # moetier's dense layers: "auto" (the model's bf16 on the backend's kernels, moetier.load's default),
    # "same" (each row's expert format), "transformers" (torch's own layers) or a format name.
    dense: str = "auto"
    # GGUF files of this checkpoint's weights (llama.cpp's own quantizations, ci/llama_cpp_bench.sh's files)
    # that moetier also runs as stored: every tensor in the file's types, nothing converted.
    gguf_files: tuple[str, ...] = ()


@dataclass(frozen=True)
class Row:
    """One implementation: rates are medians over the repeats (None when its check failed)."""

    implementation: str  # "moetier <backend>", "transformers eager", "transformers grouped_mm", "llama.cpp"
    format: str
    prefill_tok_s: float | None
    decode_tok_s: float | None
    prefill_runs: tuple[float, ...]
    decode_runs: tuple[float, ...]
    bytes_per_token: float  # weight bytes one decode token reads in this format
    check_relerr: float | None  # experts vs transformers' on the same inputs: max over layers of ||d|| / ||ref||
    check_bound: float | None
    check_ok: bool
    logits_relerr: float | None = None  # max |logits - reference| / max |reference| (whole model; informational)
    load_s: float | None = None
    note: str = ""
    dense: str = "bf16"  # the dense layers' format ("torch": transformers' own bf16 layers)


# ---- the checkpoint ------------------------------------------------------------------------------------

def _hf_config(dims: ModelDims, *, experts: int, moe_intermediate: int, n_group: int | None = None,
               topk_group: int | None = None):
    import transformers as tf

    common = dict(hidden_size=dims.hidden, num_hidden_layers=dims.layers, num_attention_heads=dims.heads,
                  num_key_value_heads=dims.kv_heads, moe_intermediate_size=moe_intermediate,
                  num_experts_per_tok=dims.top_k, norm_topk_prob=True, vocab_size=dims.vocab,
                  max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
                  pad_token_id=None)
    if dims.family == "qwen3_moe":
        return tf.Qwen3MoeConfig(**common, head_dim=dims.head_dim, intermediate_size=6144, num_experts=experts,
                                 decoder_sparse_step=1, mlp_only_layers=[])
    m = dims.mla
    return tf.DeepseekV3Config(**common, intermediate_size=dims.dense_intermediate, n_routed_experts=experts,
                               n_shared_experts=dims.shared_experts, first_k_dense_replace=dims.dense_layers,
                               n_group=dims.n_group if n_group is None else n_group,
                               topk_group=dims.topk_group if topk_group is None else topk_group,
                               routed_scaling_factor=2.5, q_lora_rank=m.q_lora_rank, kv_lora_rank=m.kv_lora_rank,
                               qk_rope_head_dim=m.qk_rope_head_dim, qk_nope_head_dim=m.qk_nope_head_dim,
                               v_head_dim=m.v_head_dim)


def write_model(folder: str | Path, dims: ModelDims, *, registry, seed: int = 0) -> None:
    """Write the synthetic checkpoint with the model zoo's writer (the same one `moetier zoo tiny` uses).
    The transformers model that gives the non-MoE tensors their names is built with one small expert, since
    the MoE blocks are written from the family's layout at the real dimensions."""
    zoo_tiny = importlib.import_module("moetier.model_zoo.tiny")  # the core never imports the zoo statically
    from moetier.model_zoo._deepseek_like import config_dict

    import transformers as tf

    family_name, version, arch = FAMILIES[dims.family]
    family = registry.family(family_name)
    config = config_dict(_hf_config(dims, experts=dims.experts, moe_intermediate=dims.moe_intermediate),
                         version=version, architectures=[arch])
    config["_name_or_path"] = f"synthetic/{dims.name}-{dims.layers}l"
    skeleton = _hf_config(dims, experts=1, moe_intermediate=8, n_group=1, topk_group=1)
    cls = tf.Qwen3MoeForCausalLM if dims.family == "qwen3_moe" else tf.DeepseekV3ForCausalLM

    def build():
        # Initialized in bf16 (what is written) rather than fp32: at DeepSeek-V3's dimensions the fp32
        # skeleton alone would take 6 GB beside the experts being written.
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            return cls(skeleton)
        finally:
            torch.set_default_dtype(default)

    spec = zoo_tiny.TinySpec(version, config, build)
    moe_layers = dims.layers - dims.dense_layers
    expert_bytes = 3 * dims.hidden * dims.moe_intermediate * 2 * (dims.experts + dims.shared_experts) * moe_layers
    zoo_tiny.write_tiny(spec, family.layout, str(folder), quant=None, seed=seed,
                        shards=max(1, math.ceil(expert_bytes / (2 << 30))))


def checkpoint_dims(folder: Path) -> dict:
    import json

    return json.loads((folder / "config.json").read_text())


# ---- bytes per decode token ----------------------------------------------------------------------------

def dense_decode_bytes(model) -> int:
    """Bytes of the weights every decode token reads outside the routed experts: every parameter transformers
    holds (attention, norms, routers, LM head), the embedding table counted as the one row it reads."""
    emb = model.get_input_embeddings().weight
    dense = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." not in n)
    return int(dense - emb.numel() * emb.element_size() + emb.shape[1] * emb.element_size())


def expert_decode_bytes(layout, fmt: str) -> int:
    """Per decode token: each MoE layer's top-k experts in `fmt`'s packed bytes (scales included)."""
    return sum(m.experts.top_k * m.experts.expert_bytes(fmt) for m in layout.moe_layers)


# ---- the correctness check -----------------------------------------------------------------------------

def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids).logits[0].float()


def check_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


def check_bound(fmt: str) -> float:
    """Bound on one layer's experts' relative error against transformers' on the same inputs and weights: the
    conformance suite's per-format bound (bf16 / fp8: 1e-2, for activations rounded to bf16; int8 / int4:
    4e-2, for activations quantized to int8 per token). transformers' bf16 reference rounds its per-expert
    products and sum to bf16 itself (~2e-3 relative), inside those margins. A wrong expert, scale or
    weight moves the error to order 1."""
    from ..conformance.tolerances import tolerance

    return tolerance(fmt)


class _DequantizedExperts:
    """Forward hooks that give transformers' experts modules, one layer at a time, the weights moetier
    computes with in `fmt` (its reference quantizer's codes, dequantized), and restore the bf16 ones after:
    only one layer's converted copy exists at a time."""

    def __init__(self, model, fmt: str):
        from ..formats import dequantize, quantize

        self.handles = []
        self._q = lambda w: dequantize(quantize(w.float(), fmt), torch.float32).to(w.dtype)
        for module in model.modules():
            if hasattr(module, "gate_up_proj") and hasattr(module, "down_proj") and module.gate_up_proj.ndim == 3:
                self.handles.append(module.register_forward_pre_hook(self._swap_in))
                self.handles.append(module.register_forward_hook(self._swap_out))

    def _swap_in(self, module, args):
        gu, dn = module.gate_up_proj.data, module.down_proj.data
        module._moetier_saved = (gu, dn)
        inter = gu.shape[1] // 2
        new_gu, new_dn = torch.empty_like(gu), torch.empty_like(dn)
        for e in range(gu.shape[0]):
            new_gu[e, :inter] = self._q(gu[e, :inter])
            new_gu[e, inter:] = self._q(gu[e, inter:])
            new_dn[e] = self._q(dn[e])
        module.gate_up_proj.data, module.down_proj.data = new_gu, new_dn

    def _swap_out(self, module, args, output):
        module.gate_up_proj.data, module.down_proj.data = module._moetier_saved
        del module._moetier_saved

    def close(self):
        for h in self.handles:
            h.remove()


class _Capture:
    """Forward hooks on every routed-experts module that keep, per decoder layer, its inputs (hidden states,
    top-k ids, top-k weights: transformers' router ran before) and its output."""

    def __init__(self, model):
        from ..integrations.transformers.quantizer import experts_modules

        self.calls: dict[int, tuple] = {}
        self.handles = [module.register_forward_hook(self._hook(i), with_kwargs=True)
                        for i, (_, module) in experts_modules(model).items()]

    def _hook(self, index: int):
        def hook(module, args, kwargs, output):
            inputs = tuple(args) + tuple(kwargs[k] for k in ("hidden_states", "top_k_index", "top_k_weights")
                                         if k in kwargs)
            self.calls[index] = (tuple(t.detach().clone() for t in inputs[:3]), output.detach().float())
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


@dataclass(frozen=True)
class Reference:
    """transformers eager (bf16) on the check prompt, on the weights one format computes with."""

    logits: torch.Tensor
    experts: dict[int, tuple]  # layer -> ((hidden, ids, weights), output fp32)


def reference(model, ids: torch.Tensor, fmt: str) -> Reference:
    """Run transformers' eager model on the weights moetier computes with in `fmt` (its own quantization of
    the checkpoint's bf16 weights, dequantized), keeping every experts call."""
    hooks = None if fmt == "bf16" else _DequantizedExperts(model, fmt)
    capture = _Capture(model)
    try:
        logits = _logits(model, ids)
    finally:
        capture.close()
        if hooks:
            hooks.close()
    return Reference(logits, capture.calls)


def experts_error(model, ref: Reference) -> float:
    """The largest relative Frobenius error, over the MoE layers, of `model`'s experts on the reference's
    own inputs (same hidden states, same routing) against the reference's experts output. Comparing each
    layer on the same routing keeps the check exact where a whole-model comparison is not: a bf16 rounding
    anywhere can flip a near-tie in a later router and change that token's experts."""
    from ..integrations.transformers.quantizer import experts_modules

    worst = 0.0
    modules = experts_modules(model)
    if set(modules) != set(ref.experts):
        raise MoetierError(f"experts in layers {sorted(modules)}, reference in {sorted(ref.experts)}")
    with torch.inference_mode():
        for index, (_, module) in modules.items():
            (hidden, ids, weights), want = ref.experts[index]
            got = module(hidden, ids, weights).float()
            worst = max(worst, float((got - want).norm() / want.norm()))
    return worst


# ---- timing ---------------------------------------------------------------------------------------------

def _prepare_generation(model) -> None:
    gc_ = model.generation_config
    gc_.eos_token_id = None  # random weights: never stop early
    gc_.pad_token_id = 0
    gc_.cache_implementation = "static"


def time_generation(model, ids: torch.Tensor, new_tokens: int, repeats: int,
                    status: Callable[[str], None], label: str) -> tuple[list[float], list[float]]:
    """(prefill tok/s, decode tok/s) per timed repeat, after one untimed warm-up generation."""
    from ..integrations.transformers.generation import generate

    _prepare_generation(model)
    prefill, decode = [], []
    for i in range(repeats + 1):
        status(f"{label}: {'warm-up' if i == 0 else f'repeat {i}/{repeats}'} ({ids.shape[1]} + {new_tokens} tokens)")
        new, times = generate(model, ids, max_new_tokens=new_tokens, pad_token_id=0)
        if new.numel() != new_tokens:
            raise MoetierError(f"{label}: generated {new.numel()} tokens, asked {new_tokens}")
        if i:
            prefill.append(times.prefill_tokens_per_s)
            decode.append(times.decode_tokens_per_s)
    return prefill, decode


# ---- the run --------------------------------------------------------------------------------------------

@dataclass
class ModelBenchResult:
    config: ModelBenchConfig
    rows: list[Row]
    read_gb_per_s: float  # best pass of the read probe at config.threads, before and after each format
    read_runs: list[float]  # every pass
    notes: list[str] = field(default_factory=list)
    dense_bf16_bytes: int = 0  # what transformers' bf16 dense layers read per decode token

    def byte_limit(self, bytes_per_token: float) -> float:
        return self.read_gb_per_s * 1e9 / bytes_per_token


def _read_probe(inventory, threads: int, quick: bool) -> list[float]:
    """GB/s of each pass of the read probe (1 GiB; 256 MiB when quick)."""
    from .probes import DEFAULT_READ_BYTES, QUICK_READ_BYTES, read_bandwidth

    return list(read_bandwidth(inventory, threads, QUICK_READ_BYTES if quick else DEFAULT_READ_BYTES, 3))


def _release(model) -> None:
    """Close a model's experts runtime; the caller drops its references, then memory is collected."""
    experts = getattr(model, "moetier_experts", None)
    if experts is not None:
        experts.close()


def run_model_bench(config: ModelBenchConfig, folder: Path, *, registry, inventory,
                    status: Callable[[str], None] = lambda s: None) -> ModelBenchResult:
    """Check, then time, every implementation on the checkpoint in `folder` (written before)."""
    import time

    from ..family import load_layout
    from ..integrations.transformers import load as moetier_load

    torch.set_num_threads(config.threads)
    layout = load_layout(folder, registry)
    g = torch.Generator().manual_seed(config.seed)
    vocab = config.dims.vocab
    check_ids = torch.randint(0, vocab, (1, CHECK_TOKENS), generator=g)
    prompt = torch.randint(0, vocab, (1, config.prompt_tokens), generator=g)
    reads = []
    status("read bandwidth probe")
    reads += _read_probe(inventory, config.threads, config.quick)
    rows: list[Row] = []
    notes: list[str] = []

    # transformers' eager model: the reference of every check (its own formats' weights dequantized), timed too.
    status("transformers eager: loading")
    t0 = time.perf_counter()
    ref_model = _hf_load(folder, "eager")
    load_s = time.perf_counter() - t0
    ref_model.eval()
    dense = dense_decode_bytes(ref_model)
    refs = {}
    for fmt in ("bf16",) + tuple(f for f in config.formats if f != "bf16"):
        status(f"reference for {fmt} (transformers eager on moetier's {fmt} weights)")
        refs[fmt] = reference(ref_model, check_ids, fmt)
    bf16_bytes = dense + expert_decode_bytes(layout, "bf16")
    if config.transformers:
        for impl in TRANSFORMERS_IMPLS:
            if impl == "eager":
                model, this_load = ref_model, load_s
            else:
                status(f"transformers {impl}: loading")
                t0 = time.perf_counter()
                model = _hf_load(folder, impl)
                this_load = time.perf_counter() - t0
                model.eval()
            bound = check_bound("bf16")
            err = experts_error(model, refs["bf16"])
            logits_err = check_error(_logits(model, check_ids), refs["bf16"].logits)
            ok = err <= bound
            pre, dec = time_generation(model, prompt, config.new_tokens, config.repeats, status,
                                       f"transformers {impl}") if ok else ([], [])
            rows.append(Row(f"transformers {impl}", "bf16", _med(pre), _med(dec), tuple(pre), tuple(dec), bf16_bytes,
                            err, bound, ok, logits_err, this_load, dense="torch"))
            model = ref_model = None
            gc.collect()
    ref_model = None
    gc.collect()

    for fmt in config.formats:
        label = f"moetier {config.backend}"
        status(f"{label} {fmt}: loading")
        t0 = time.perf_counter()
        dense_format = {"auto": None, "same": fmt}.get(config.dense, config.dense)
        model = moetier_load(folder, backend=config.backend, fmt=fmt, threads=config.threads, dtype=torch.bfloat16,
                             device="cpu", registry=registry, inventory=inventory, progress=False,
                             dense_format=dense_format)
        routed = model.moetier_dense
        if model.moetier_fused_decode:
            notes.append(f"{label} {fmt}: {len(model.moetier_fused_decode)} decoder layers fused for decode "
                         "(moetier.integrations.transformers.decode_layer)"
                         + ("; the model's decode forward too (decode_model)" if model.moetier_fused_model else ""))
        this_load = time.perf_counter() - t0
        model.eval()
        bound = check_bound(fmt)
        err = experts_error(model, refs[fmt])
        logits_err = check_error(_logits(model, check_ids), refs[fmt].logits)
        ok = err <= bound
        pre, dec = time_generation(model, prompt, config.new_tokens, config.repeats, status,
                                   f"{label} {fmt}") if ok else ([], [])
        # The routed dense matrices are read in their packed bytes instead of transformers' bf16 ones.
        dense_bytes = dense - routed.replaced_nbytes + routed.nbytes
        rows.append(Row(label, fmt, _med(pre), _med(dec), tuple(pre), tuple(dec),
                        dense_bytes + expert_decode_bytes(layout, fmt), err, bound, ok, logits_err, this_load,
                        dense=routed.fmt or "torch"))
        if not ok:
            notes.append(f"{label} {fmt}: experts differ from transformers' on the same inputs by {err:.2e} "
                         f"(bound {bound:g}): not timed")
        _release(model)
        model = None
        gc.collect()
        status("read bandwidth probe")
        reads += _read_probe(inventory, config.threads, config.quick)
    for path in config.gguf_files:
        rows.append(_gguf_row(Path(path), config, layout, refs["bf16"], check_ids, prompt, registry=registry,
                              inventory=inventory, status=status))
        gc.collect()
        status("read bandwidth probe")
        reads += _read_probe(inventory, config.threads, config.quick)
    return ModelBenchResult(config, rows, max(reads), reads, notes, dense)


def gguf_file_type(gf) -> str:
    """The llama.cpp file type a GGUFFile declares (general.file_type: "Q4_K_M", "BF16", ...), or "GGUF"."""
    import gguf

    code = gf.meta("general.file_type", None)
    try:
        return gguf.LlamaFileType(int(code)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except (TypeError, ValueError):
        return "GGUF"


def gguf_decode_bytes(gf, layout) -> int:
    """Weight bytes one decode token reads from a GGUFFile (its `layout`) as stored: every tensor, but of the
    routed experts top-k of E per layer and of the token embedding one row (the whole table when it is also
    the LM head)."""
    sizes = gf.tensor_bytes()
    moe = {f"blk.{i}.": m.experts for i, m in zip(layout.moe_layer_indices, layout.moe_layers)}
    total = 0.0
    for name, n in sizes.items():
        if "_exps." in name:
            e = moe[name[:name.index(".", 4) + 1]]
            n = n * e.top_k / e.num_experts
        elif name == "token_embd.weight" and "output.weight" in sizes:
            n = n / gf.dims(name)[0]  # one row of the vocabulary
        total += n
    return round(total)


def _gguf_row(path: Path, config: ModelBenchConfig, layout, ref: Reference, check_ids, prompt, *, registry,
              inventory, status) -> Row:
    """moetier on a GGUF file of this checkpoint, every tensor as the file stores it. Its logits are compared
    with transformers' on the checkpoint's bf16 weights (informational: the file's own rounding is in them);
    the file must be of this model (same layers, experts and vocabulary)."""
    import time

    from ..checkpoint.gguf import GGUFFile
    from ..integrations.transformers import load as moetier_load

    with GGUFFile(path) as gf:
        glayout = gf.layout()
        fmt = f"gguf {gguf_file_type(gf)}"
        decode_bytes = gguf_decode_bytes(gf, glayout)
    want = [(m.experts.num_experts, m.experts.hidden_size, m.experts.intermediate_size) for m in layout.moe_layers]
    have = [(m.experts.num_experts, m.experts.hidden_size, m.experts.intermediate_size) for m in glayout.moe_layers]
    if have != want:
        raise SettingError(f"--gguf {path}: its MoE layers (experts, hidden, intermediate) {have} are not this "
                           f"checkpoint's {want}; pass a GGUF file made from this checkpoint (ci/llama_cpp_bench.sh)")
    label = f"moetier {config.backend}"
    status(f"{label} {fmt}: loading {path.name}")
    t0 = time.perf_counter()
    model = moetier_load(path, backend=config.backend, threads=config.threads, dtype=torch.bfloat16, device="cpu",
                         registry=registry, inventory=inventory, progress=False)
    load_s = time.perf_counter() - t0
    model.eval()
    logits = _logits(model, check_ids)
    if logits.shape != ref.logits.shape:
        raise SettingError(f"--gguf {path}: its vocabulary ({logits.shape[-1]}) is not this checkpoint's "
                           f"({ref.logits.shape[-1]})")
    logits_err = check_error(logits, ref.logits)
    pre, dec = time_generation(model, prompt, config.new_tokens, config.repeats, status, f"{label} {fmt}")
    row = Row(label, fmt, _med(pre), _med(dec), tuple(pre), tuple(dec), decode_bytes, None, None,
              True, logits_err, load_s, note=f"{path.name}, every tensor as stored", dense="as stored")
    _release(model)
    return row


def _hf_load(folder: Path, impl: str):
    """transformers' own model in bf16 with the given experts implementation (quietly: no progress bar)."""
    import transformers

    from ..integrations.transformers.loader import _quiet_transformers

    with _quiet_transformers(False):
        return transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16,
                                                                 experts_implementation=impl)


def _med(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


# ---- llama.cpp results (ci/llama_cpp_bench.sh) -----------------------------------------------------------

# The GGUF type whose figures a moetier format is compared with, and the moetier block format whose bytes
# count it (Q4_K_M mixes q4_k and q6_k tensors; its routed experts are counted as q4_k).
LLAMA_CPP_FOR = {"bf16": "BF16", "int8": "Q8_0", "int4_g32": "Q4_0", "int4_g64": "Q4_0", "int4_g128": "Q4_0",
                 "fp8_e4m3": "Q8_0"}
GGUF_BYTES_FORMAT = {"BF16": "bf16", "Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_K_M": "q4_k", "Q3_K_M": "q3_k",
                     "Q2_K": "q2_k"}


def load_llama_cpp(path: str | Path) -> list[dict]:
    """The records `ci/llama_cpp_bench.sh` writes: {"gguf_type", "prefill_tok_s", "decode_tok_s", ...}."""
    import json

    from ..errors import SettingError

    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise SettingError(f"cannot read the llama.cpp results {path}: {exc}") from None
    recs = doc.get("records") if isinstance(doc, dict) else None
    if not isinstance(recs, list) or not all(isinstance(r, dict) and "gguf_type" in r for r in recs):
        raise SettingError(f"{path} is not a llama.cpp results file of ci/llama_cpp_bench.sh (no 'records' with "
                           "'gguf_type')")
    return recs


def llama_cpp_rows(records: list[dict], layout, dense_bf16_bytes: int, embedding_params: int) -> list[Row]:
    """Rows for llama.cpp's records. llama.cpp quantizes the dense weights too (Q8_0 all of them, Q4_K_M to
    q4_K/q6_K), so its bytes per decode token come from its file: the non-expert bytes (file minus every
    expert in the type's block bytes), less the embedding table's share (a token reads one row), plus the
    top-k experts per layer."""
    rows = []
    dense_params = dense_bf16_bytes / 2
    experts = [(m.experts.num_experts, m.experts.top_k) for m in layout.moe_layers]
    for r in records:
        t = r["gguf_type"]
        fmt = GGUF_BYTES_FORMAT.get(t)
        per_token = math.nan
        if fmt and r.get("file_bytes"):
            eb = layout.moe_layers[0].experts.expert_bytes(fmt)
            non_expert = r["file_bytes"] - sum(E for E, _ in experts) * eb
            per_token = non_expert * (1 - embedding_params / (dense_params + embedding_params)) + \
                sum(k for _, k in experts) * eb
        rows.append(Row("llama.cpp", t, r.get("prefill_tok_s"), r.get("decode_tok_s"),
                        tuple(r.get("prefill_runs", ())), tuple(r.get("decode_runs", ())), per_token, None, None, True,
                        None, note=r.get("note", ""), dense=t))
    return rows


# ---- the document and the table -------------------------------------------------------------------------

def document(result: ModelBenchResult, inventory, *, command: list[str], llama: list[Row] = ()) -> dict:
    import datetime as dt
    import os
    import platform

    from .. import __version__

    # llama.cpp's bytes per token are estimated from its file's size; where moetier ran that very file, its
    # count from the file's tensors is exact and replaces the estimate
    exact = {r.format.removeprefix("gguf "): r.bytes_per_token for r in result.rows if r.format.startswith("gguf ")}
    llama = [replace(r, bytes_per_token=exact.get(r.format, r.bytes_per_token)) for r in llama]
    rows = list(result.rows) + llama
    records = []
    tf = {r.implementation: r for r in result.rows if r.implementation.startswith("transformers")}
    best_tf_pre = max((r.prefill_tok_s for r in tf.values() if r.prefill_tok_s), default=None)
    best_tf_dec = max((r.decode_tok_s for r in tf.values() if r.decode_tok_s), default=None)
    by_gguf = {r.format: r for r in llama}
    for r in rows:
        rec = asdict(r)
        limit = result.byte_limit(r.bytes_per_token) if r.bytes_per_token == r.bytes_per_token else None
        peer = None
        if r.implementation.startswith("moetier"):  # a GGUF file's row against llama.cpp on the same type
            peer = by_gguf.get(r.format.removeprefix("gguf ") if r.format.startswith("gguf ") else
                               LLAMA_CPP_FOR.get(r.format, ""))
        rec.update(
            byte_limit_tok_s=limit,
            pct_byte_limit=100 * r.decode_tok_s / limit if r.decode_tok_s and limit else None,
            decode_gb_per_s=r.decode_tok_s * r.bytes_per_token / 1e9 if r.decode_tok_s else None,
            prefill_x_transformers=r.prefill_tok_s / best_tf_pre if r.prefill_tok_s and best_tf_pre else None,
            decode_x_transformers=r.decode_tok_s / best_tf_dec if r.decode_tok_s and best_tf_dec else None,
            llama_cpp_type=peer.format if peer else None,
            prefill_x_llama_cpp=r.prefill_tok_s / peer.prefill_tok_s if peer and r.prefill_tok_s and peer.prefill_tok_s else None,
            decode_x_llama_cpp=r.decode_tok_s / peer.decode_tok_s if peer and r.decode_tok_s and peer.decode_tok_s else None,
        )
        records.append(rec)
    cfg = asdict(result.config)
    return {
        "schema": SCHEMA, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command, "moetier_version": __version__, "torch_version": torch.__version__,
        "transformers_version": importlib.import_module("transformers").__version__,
        "python": platform.python_version(), "machine": inventory.to_dict(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "settings": cfg, "read_gb_per_s": result.read_gb_per_s, "read_runs": result.read_runs,
        "read_gb_per_s_median": statistics.median(result.read_runs),
        "records": records, "notes": list(result.notes),
    }


COLUMNS = ("implementation", "format", "dense", "check", "logits", "prefill tok/s", "x tf", "x llama", "decode tok/s", "x tf",
           "x llama", "GB/s", "byte limit", "% limit")


def _f(v, digits=1, suffix=""):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:,.{digits}f}{suffix}"


def table_rows(doc: dict) -> list[list[str]]:
    out = []
    for r in doc["records"]:
        check = "-" if r["check_relerr"] is None else (
            f"{r['check_relerr']:.1e}" + ("" if r["check_ok"] else " FAIL"))
        out.append([r["implementation"], r["format"], r.get("dense") or "-", check, _f(r["logits_relerr"], 3), _f(r["prefill_tok_s"]),
                    _f(r["prefill_x_transformers"], 2, "x"), _f(r["prefill_x_llama_cpp"], 2, "x"),
                    _f(r["decode_tok_s"]), _f(r["decode_x_transformers"], 2, "x"),
                    _f(r["decode_x_llama_cpp"], 2, "x"), _f(r["decode_gb_per_s"]), _f(r["byte_limit_tok_s"]),
                    _f(r["pct_byte_limit"], 0, "%")])
    return out


def print_report(doc: dict, console) -> None:
    from rich.table import Table

    s = doc["settings"]
    d = s["dims"]
    dims = ModelDims(**{**d, "mla": MLADims(**d["mla"]) if d.get("mla") else None})
    title = (f"{dims.describe()}; prefill {s['prompt_tokens']} tokens, decode {s['new_tokens']} tokens; "
             f"{s['threads']} threads; median of {s['repeats']}")
    t = Table(title=title)
    for c in COLUMNS:
        t.add_column(c, justify="left" if c in ("implementation", "format") else "right")
    for row in table_rows(doc):
        t.add_row(*row)
    console.print(t)
    console.print(f"read bandwidth ({s['threads']} threads, {len(doc['read_runs'])} probe passes in this run): best "
                  f"{doc['read_gb_per_s']:.1f} GB/s, median {doc['read_gb_per_s_median']:.1f} GB/s; byte limit = that / weight bytes per decode token; "
                  "x tf = against the faster transformers; x llama = against llama.cpp's matching GGUF type "
                  "(bf16: BF16, int8: Q8_0, int4: Q4_0; a GGUF file's row: llama.cpp on the same file type); dense = the format of the dense layers (attention, LM head; "
                  "torch: transformers' own bf16 layers; llama.cpp: its type's); check = the experts' largest relative error over the layers "
                  "against transformers eager's on the same inputs and weights (FAIL: over the format's bound, not "
                  "timed); logits = max logit difference / logit scale over the check prompt (whole model, where "
                  "bf16 roundings can flip near-tie routing)")
    for n in doc["notes"]:
        console.print(f"[yellow]note:[/yellow] {n}")


def markdown_table(doc: dict) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in table_rows(doc):
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
