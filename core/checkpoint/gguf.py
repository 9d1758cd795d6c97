"""GGUF files (llama.cpp's format) read directly: no conversion step.

`GGUFFile(path)` parses a file (or the shards of a `gguf-split` model) with the `gguf` package's
GGUFReader, which memory-maps it: nothing but the header is read until a tensor is asked for.

- `config()`: an HF-style config dict built from `general.architecture` and the `<arch>.*` metadata
  keys (gguf.Keys.LLM), which the zoo's families turn into an MoELayout exactly as they do a config.json
  (`layout()`). Mapped architectures and the family each lands in: ARCHITECTURES below.
- Tensors by llama.cpp's names (gguf.TENSOR_NAMES): routed experts fused per layer,
  `blk.{i}.ffn_{gate,up}_exps.weight` [E, I, H] and `blk.{i}.ffn_down_exps.weight` [E, H, I] (PyTorch
  order; GGUF lists the dimensions the other way round), the router `blk.{i}.ffn_gate_inp.weight` [E, H],
  the selection bias `blk.{i}.exp_probs_b.bias` [E], shared experts `blk.{i}.ffn_{gate,up,down}_shexp`
  and Qwen's shared-expert gate `blk.{i}.ffn_gate_inp_shexp.weight` [H].
- `GGUFExperts`: the ExpertSource of one MoE layer. Expert e's three matrices come back in their native
  GGUF format (the types of `ggml_blocks.BLOCK_TYPES`, or f32/f16/bf16) as moetier QuantizedTensors whose data are
  the bytes of that expert's slice only, copied out of the mapping.

Tensor types moetier has no format for (IQ1-IQ3, TQ*, ...) are refused for routed experts unless a
conversion is asked for (then the gguf package's own dequantizer reads them); other tensors (router,
shared expert) are dequantized to fp32 with the same dequantizer.
"""
from __future__ import annotations

import dataclasses
import math
import mmap
import os
import re
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError, ExpertIdError, FormatError, LayoutError, SettingError
from ..experts import ExpertTensors
from ..formats import FORMATS, QuantizedTensor, WeightFormat, mixed_format
from ..ggml_blocks import BY_GGML_TYPE
from ..layout import Quantization
from .errors import CorruptFileError, MissingShardError, MissingTensorError, TensorShapeError
from .experts import RouterTensors, SharedTensors
from .matrices import convert_to
from .progress import track
from .reader import drop_cached

MAGIC = b"GGUF"
TOKEN_EMBD, OUTPUT = "token_embd", "output"  # llama.cpp's names of the embedding table and the LM head
# GGMLQuantizationType F32, F16, BF16 -> the float format they are
FLOAT_TYPES = {0: "fp32", 1: "fp16", 30: "bf16"}
_SPLIT = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def is_gguf(path) -> bool:
    """Whether `path` is a file starting with the GGUF magic."""
    p = Path(path)
    if not p.is_file():
        return False
    try:
        with open(p, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def gguf_package():
    """The `gguf` package, or a CheckpointError saying how to install it."""
    try:
        import gguf
    except ImportError as exc:
        raise CheckpointError(f"reading GGUF files needs the gguf package ({exc}); "
                              "install it with: pip install 'moetier[gguf]'") from None
    return gguf


def _names():
    """llama.cpp's tensor names for the MoE parts, from the gguf package's own table."""
    g = gguf_package()
    T, N = g.MODEL_TENSOR, g.TENSOR_NAMES
    gate_up = getattr(T, "FFN_GATE_UP_EXP", None)  # newer gguf only (Qwen3.5's fused experts)
    return {
        "gate": N[T.FFN_GATE_EXP] + ".weight", "up": N[T.FFN_UP_EXP] + ".weight",
        "down": N[T.FFN_DOWN_EXP] + ".weight", "gate_up": N.get(gate_up, "blk.{bid}.ffn_gate_up_exps") + ".weight",
        "router": N[T.FFN_GATE_INP] + ".weight", "router_bias": N[T.FFN_GATE_INP] + ".bias",
        "selection_bias": N[T.FFN_EXP_PROBS_B] + ".bias",
        "shared_gate": N[T.FFN_GATE_SHEXP] + ".weight", "shared_up": N[T.FFN_UP_SHEXP] + ".weight",
        "shared_down": N[T.FFN_DOWN_SHEXP] + ".weight", "shared_gate_inp": N[T.FFN_GATE_INP_SHEXP] + ".weight",
    }


# ---- metadata -> HF-style config ---------------------------------------------------------------------

# The `<arch>.` keys read below (gguf.Keys.LLM spells each as "{arch}.<key>"; a test holds them equal).
KEYS_READ = ("block_count", "embedding_length", "feed_forward_length", "expert_count", "expert_used_count",
             "expert_feed_forward_length", "expert_shared_feed_forward_length", "expert_shared_count",
             "leading_dense_block_count", "expert_weights_scale", "expert_weights_norm", "expert_gating_func",
             "expert_group_count", "expert_group_used_count", "nextn_predict_layers")

# Model-level keys, read for whole-model loading (gguf.Keys.LLM / Attention / Rope spell each "{arch}.<key>").
MODEL_KEYS_READ = ("context_length", "attention.head_count", "attention.head_count_kv", "attention.key_length",
                   "attention.value_length", "attention.layer_norm_rms_epsilon", "attention.q_lora_rank",
                   "attention.kv_lora_rank", "attention.key_length_mla", "attention.value_length_mla",
                   "rope.freq_base", "rope.dimension_count", "rope.scaling.type", "rope.scaling.factor",
                   "rope.scaling.original_context_length", "rope.scaling.yarn_log_multiplier")
# llama.cpp's converter writes DeepSeek's yarn as rope.scaling.yarn_log_multiplier = 0.1 * mscale_all_dim.
YARN_LOG_MUL_PER_MSCALE = 0.1


def _f32(v) -> float:
    """A float32 metadata value as the shortest decimal that is the same float32 (2.827, not 2.8269999...),
    as the config.json it was converted from said."""
    return float(np.format_float_positional(np.float32(v), unique=True))


def _qwen(f: GGUFFile, kind: str) -> dict:
    cfg = {"model_type": kind, "architectures": ["Qwen3MoeForCausalLM" if kind == "qwen3_moe" else "Qwen2MoeForCausalLM"],
           "num_experts": f.llm("expert_count"), "num_experts_per_tok": f.llm("expert_used_count"),
           "moe_intermediate_size": f.llm("expert_feed_forward_length"),
           # llama.cpp renormalizes Qwen3-MoE's top-k weights and not Qwen2-MoE's unless the key says so
           "norm_topk_prob": bool(f.llm("expert_weights_norm", kind == "qwen3_moe"))}
    # No metadata key says which blocks are dense (Qwen's mlp_only_layers): the blocks without a router are.
    n_layers = int(f.llm("block_count")) - int(f.llm("nextn_predict_layers", 0))
    router = _names()["router"]
    dense = [i for i in range(n_layers) if not f.has(router.format(bid=i))]
    if dense:
        cfg["mlp_only_layers"] = dense
    if kind == "qwen2_moe":
        shared = f.llm("expert_shared_feed_forward_length", None)
        if shared is None and f.has(_names()["shared_gate"].format(bid=f.first_moe_block())):
            shared = f.dims(_names()["shared_gate"].format(bid=f.first_moe_block()))[0]
        cfg["shared_expert_intermediate_size"] = shared or 0
    return cfg


def _deepseek2(f: GGUFFile) -> dict:
    gating = f.gating("softmax")  # llama.cpp's default for deepseek2 files that predate the key
    n_group = f.llm("expert_group_count", 1)
    cfg = {"n_routed_experts": f.llm("expert_count"), "num_experts_per_tok": f.llm("expert_used_count"),
           "moe_intermediate_size": f.llm("expert_feed_forward_length"),
           "n_shared_experts": f.llm("expert_shared_count", 0),
           "first_k_dense_replace": f.llm("leading_dense_block_count", 0),
           "routed_scaling_factor": _f32(f.llm("expert_weights_scale", 1.0)),
           "norm_topk_prob": bool(f.llm("expert_weights_norm", False)),
           "n_group": n_group, "topk_group": f.llm("expert_group_used_count", 1), "scoring_func": gating}
    if gating == "softmax":  # DeepSeek-V2 / V2-Lite
        cfg.update(model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"],
                   topk_method="group_limited_greedy" if n_group > 1 else "greedy")
    else:  # DeepSeek-V3 / R1 / V3.1 and Kimi-K2 (llama.cpp converts both to deepseek2)
        kimi = "kimi" in f.model_name().lower()
        cfg.update(model_type="kimi_k2" if kimi else "deepseek_v3", architectures=["DeepseekV3ForCausalLM"],
                   topk_method="noaux_tc")
    return cfg


def _glm4moe(f: GGUFFile) -> dict:
    return {"model_type": "glm4_moe", "architectures": ["Glm4MoeForCausalLM"],
            "n_routed_experts": f.llm("expert_count"), "num_experts_per_tok": f.llm("expert_used_count"),
            "moe_intermediate_size": f.llm("expert_feed_forward_length"),
            "n_shared_experts": f.llm("expert_shared_count", 0),
            "first_k_dense_replace": f.llm("leading_dense_block_count", 0),
            "routed_scaling_factor": _f32(f.llm("expert_weights_scale", 1.0)),
            "norm_topk_prob": bool(f.llm("expert_weights_norm", True)),
            "n_group": f.llm("expert_group_count", 1), "topk_group": f.llm("expert_group_used_count", 1),
            "scoring_func": f.gating("sigmoid"), "topk_method": "noaux_tc"}


def _minimax_m2(f: GGUFFile) -> dict:
    return {"model_type": "minimax_m2", "architectures": ["MiniMaxM2ForCausalLM"],
            "num_local_experts": f.llm("expert_count"), "num_experts_per_tok": f.llm("expert_used_count"),
            "intermediate_size": f.llm("expert_feed_forward_length"), "scoring_func": f.gating("sigmoid"),
            "use_routing_bias": f.has(_names()["selection_bias"].format(bid=f.first_moe_block())),
            "routed_scaling_factor": _f32(f.llm("expert_weights_scale", 1.0))}


def _rope(f: GGUFFile) -> dict:
    """transformers' rope_parameters from the rope keys: default, or DeepSeek's yarn as llama.cpp writes it."""
    params = {"rope_type": "default", "rope_theta": _f32(f.llm("rope.freq_base", 10000.0))}
    kind = f.llm("rope.scaling.type", None)
    if kind == "yarn":
        mscale = _f32(f.llm("rope.scaling.yarn_log_multiplier", 0.0)) / YARN_LOG_MUL_PER_MSCALE
        params.update(rope_type="yarn", factor=_f32(f.llm("rope.scaling.factor")),
                      original_max_position_embeddings=int(f.llm("rope.scaling.original_context_length")),
                      mscale=mscale, mscale_all_dim=mscale, beta_fast=32.0, beta_slow=1.0)
    elif kind not in (None, "none"):
        raise LayoutError(f"{f.path}: {f.arch}.rope.scaling.type = {kind!r} is not mapped for whole-model loading; "
                          "known: none, yarn")
    return params


def _common_model(f: GGUFFile) -> dict:
    embd = f.dims(f"{TOKEN_EMBD}.weight")
    return {"vocab_size": embd[0], "max_position_embeddings": int(f.llm("context_length")),
            "rms_norm_eps": _f32(f.llm("attention.layer_norm_rms_epsilon")), "rope_parameters": _rope(f),
            "num_attention_heads": int(f.llm("attention.head_count")),
            "tie_word_embeddings": not f.has(f"{OUTPUT}.weight"), "bos_token_id": f.meta("tokenizer.ggml.bos_token_id", None),
            "eos_token_id": f.meta("tokenizer.ggml.eos_token_id", None)}


def _qwen_model(f: GGUFFile) -> dict:
    heads = int(f.llm("attention.head_count"))
    # Qwen2-MoE files may omit the key length: the heads then split the embedding evenly.
    head_dim = int(f.llm("attention.key_length", int(f.llm("embedding_length")) // heads))
    cfg = {**_common_model(f), "num_key_value_heads": int(f.llm("attention.head_count_kv")), "head_dim": head_dim}
    if f.arch == "qwen2moe":  # q/k/v biases when the file has them (Qwen1.5-MoE and Qwen2-57B do)
        cfg["qkv_bias"] = f.has("blk.0.attn_q.bias")
    return cfg


def _partial_rotary_model(f: GGUFFile) -> dict:
    """Grouped-query attention with the rotary embedding on the first rope.dimension_count values of each
    head (GLM-4.5..4.7, MiniMax-M2)."""
    head_dim = int(f.llm("attention.key_length"))
    cfg = {**_common_model(f), "num_key_value_heads": int(f.llm("attention.head_count_kv")), "head_dim": head_dim}
    cfg["rope_parameters"] = {**cfg["rope_parameters"],
                              "partial_rotary_factor": int(f.llm("rope.dimension_count", head_dim)) / head_dim}
    return cfg


def _glm4moe_model(f: GGUFFile) -> dict:
    """GLM-4.5/4.6/4.7: q/k/v biases and q/k norms when the file has them."""
    return {**_partial_rotary_model(f), "attention_bias": f.has("blk.0.attn_q.bias"),
            "use_qk_norm": f.has("blk.0.attn_q_norm.weight")}


def _deepseek2_model(f: GGUFFile) -> dict:
    """MLA dimensions: llama.cpp's absorbed form (attention.key_length_mla / value_length_mla, one kv head)
    or the older files' (key_length = nope + rope, value_length = v, a kv head per head)."""
    rope = int(f.llm("rope.dimension_count"))
    k_mla, v_mla = f.llm("attention.key_length_mla", None), f.llm("attention.value_length_mla", None)
    k_len = int(k_mla if k_mla is not None else f.llm("attention.key_length"))
    v_len = int(v_mla if v_mla is not None else f.llm("attention.value_length"))
    q_rank = int(f.llm("attention.q_lora_rank", 0)) or None
    heads = int(f.llm("attention.head_count"))
    return {**_common_model(f), "num_key_value_heads": heads, "q_lora_rank": q_rank,
            "kv_lora_rank": int(f.llm("attention.kv_lora_rank")), "qk_rope_head_dim": rope,
            "qk_nope_head_dim": k_len - rope, "v_head_dim": v_len, "head_dim": rope}


# general.architecture -> model-level config builder, for the architectures whole-model loading reads
MODEL_ARCHITECTURES = {"qwen3moe": _qwen_model, "qwen2moe": _qwen_model, "glm4moe": _glm4moe_model,
                       "minimax-m2": _partial_rotary_model, "deepseek2": _deepseek2_model}

# general.architecture -> (config builder, the zoo family its config lands in, for docs and errors)
ARCHITECTURES = {
    "qwen3moe": (lambda f: _qwen(f, "qwen3_moe"), "qwen (Qwen3-MoE)"),
    "qwen2moe": (lambda f: _qwen(f, "qwen2_moe"), "qwen (Qwen1.5-MoE, Qwen2-57B)"),
    "deepseek2": (_deepseek2, "deepseek (V2 with softmax gating, V3/R1 with sigmoid), kimi (Kimi-K2 by name)"),
    "glm4moe": (_glm4moe, "glm (GLM-4.5/4.6/4.7, 4.5-Air)"),
    "minimax-m2": (_minimax_m2, "minimax (MiniMax-M2)"),
}


class GGUFFile:
    """A GGUF model file (or all shards of a split one), memory-mapped. Use as a context manager."""

    def __init__(self, path, *, drop_page_cache: bool = False):
        """drop_page_cache: after each expert read, unmap its pages and tell the OS to drop them from its page
        cache (the disk tier: what it reads lives in its own bounded cache, not twice in memory)."""
        g = gguf_package()
        self.path = Path(path)
        self.drop_page_cache = drop_page_cache and hasattr(os, "posix_fadvise")
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such GGUF file")
        if not is_gguf(self.path):
            raise CorruptFileError(f"{self.path}: not a GGUF file (no GGUF magic at its start)")
        self._readers = [self._open(g, self.path)]
        self.reader = self._readers[0]
        count = self._meta_of(self.reader, "split.count", 1)
        if count > 1:
            self._open_shards(g, count)
        self._tensors, self._reader_of = {}, {}
        for r in self._readers:
            for t in r.tensors:
                if t.name in self._tensors:
                    raise CorruptFileError(f"{self.path}: tensor {t.name!r} appears in two shards")
                self._tensors[t.name] = t
                self._reader_of[t.name] = r
        self.arch = str(self.meta("general.architecture"))

    @staticmethod
    def _open(g, path: Path):
        try:
            return g.GGUFReader(str(path), "r")
        except (ValueError, KeyError, IndexError, OSError) as exc:  # truncated, corrupt, unknown types
            raise CorruptFileError(f"{path}: not a readable GGUF file: {type(exc).__name__}: {exc}") from None

    def _open_shards(self, g, count: int) -> None:
        m = _SPLIT.match(self.path.name)
        if m is None or int(m["count"]) != count:
            raise CorruptFileError(f"{self.path}: metadata says the model is split into {count} files, but the file "
                                   "name is not <name>-0000N-of-0000M.gguf")
        for no in range(1, count + 1):
            p = self.path.with_name(f"{m['prefix']}-{no:05d}-of-{count:05d}.gguf")
            if p == self.path:
                continue
            if not p.is_file():
                raise MissingShardError(f"{self.path}: shard {p.name} of the {count}-file model is missing")
            self._readers.append(self._open(g, p))
        # the first shard holds the model's metadata
        self._readers.sort(key=lambda r: self._meta_of(r, "split.no", 0))
        self.reader = self._readers[0]

    # -- metadata ----------------------------------------------------------------------------------

    @staticmethod
    def _meta_of(reader, key: str, default=LookupError):
        field = reader.get_field(key)
        if field is None:
            if default is LookupError:
                raise LayoutError(f"GGUF metadata lacks {key!r}")
            return default
        return field.contents()

    def meta(self, key: str, default=LookupError):
        """Metadata value `key` (str, int, float, bool or list); LayoutError naming it if absent and no default."""
        try:
            return self._meta_of(self.reader, key, default)
        except LayoutError as exc:
            raise LayoutError(f"{self.path}: {exc}") from None

    def llm(self, key: str, default=LookupError):
        """`<arch>.<key>` (gguf.Keys.LLM names, e.g. "expert_count")."""
        assert key in KEYS_READ or key in MODEL_KEYS_READ, key
        return self.meta(f"{self.arch}.{key}", default)

    def gating(self, default: str) -> str:
        g = gguf_package()
        v = self.llm("expert_gating_func", None)
        if v is None:
            return default
        names = {int(g.ExpertGatingFuncType.SOFTMAX): "softmax", int(g.ExpertGatingFuncType.SIGMOID): "sigmoid"}
        if v not in names:
            raise LayoutError(f"{self.path}: {self.arch}.expert_gating_func = {v!r} is not implemented; "
                              f"known: {names}")
        return names[v]

    def model_name(self) -> str:
        return str(self.meta("general.basename", None) or self.meta("general.name", None) or "")

    def first_moe_block(self) -> int:
        """The first block holding routed experts (for keys some converters leave out)."""
        gate = _names()["gate"]
        for i in range(int(self.llm("block_count"))):
            if gate.format(bid=i) in self._tensors:
                return i
        return 0

    def config(self) -> dict:
        """An HF-style config.json dict for this file (see ARCHITECTURES)."""
        if self.arch not in ARCHITECTURES:
            raise LayoutError(f"{self.path}: GGUF architecture {self.arch!r} is not mapped to a moetier model family; "
                              f"mapped: {', '.join(ARCHITECTURES)}")
        n_mtp = int(self.llm("nextn_predict_layers", 0))
        ff = self.llm("feed_forward_length", None)
        if isinstance(ff, list):  # per-layer lengths: the dense layers' one is the largest
            ff = max(ff) or None
        cfg = {"num_hidden_layers": int(self.llm("block_count")) - n_mtp, "hidden_size": self.llm("embedding_length"),
               "_name_or_path": self.model_name(), "torch_dtype": "bfloat16", "hidden_act": "silu"}
        if ff:
            cfg["intermediate_size"] = ff
        if n_mtp:
            cfg["num_nextn_predict_layers"] = n_mtp
        cfg.update(ARCHITECTURES[self.arch][0](self))
        return cfg

    def model_config(self) -> dict:
        """`config()` plus what transformers needs to build the whole model (attention, rope, vocabulary);
        LayoutError for an architecture whole-model loading does not map yet."""
        if self.arch not in MODEL_ARCHITECTURES:
            raise LayoutError(f"{self.path}: whole-model loading reads GGUF architectures "
                              f"{', '.join(MODEL_ARCHITECTURES)}; this one is {self.arch!r} (its MoE layers run with "
                              f"`moetier zoo run`)")
        return {**self.config(), **MODEL_ARCHITECTURES[self.arch](self)}

    def layout(self, registry=None):
        """The MoELayout the zoo's family gives this file's config, its quantization the types the file
        stores each MoE layer's experts in (`stored_formats`)."""
        from ..family import load_layout
        layout = load_layout(self.config(), registry)
        return dataclasses.replace(layout, quantization=self.stored_formats(layout))

    def stored_formats(self, layout) -> Quantization:
        """Quantization scheme "gguf": each MoE layer's routed experts in the moetier format the file stores
        them in (`mixed_format(gate, down)`: a Q4_K_M file's layers differ), None for a layer in types moetier
        has no format for, or with gate and up in different types; `fmt` the format most layers store."""
        names = _names()
        per_layer = []
        for m in layout.moe_layers:
            gate, up, down = (self.native_format(n) if self.has(n) else None
                              for n in (names[w].format(bid=m.index) for w in ("gate", "up", "down")))
            same = None not in (gate, up, down) and gate == up
            per_layer.append((m.index, mixed_format(gate, down).name if same else None))
        counts = Counter(f for _, f in per_layer if f is not None)
        most = counts.most_common(1)[0][0] if counts else layout.quantization.fmt
        return Quantization("gguf", most, "experts", tuple(per_layer))  # other tensors: each its own type

    # -- tensors -----------------------------------------------------------------------------------

    def has(self, name: str) -> bool:
        return name in self._tensors

    def tensor_bytes(self) -> dict[str, int]:
        """Every tensor's bytes in the file (all shards), by name."""
        return {name: int(t.n_bytes) for name, t in self._tensors.items()}

    def other_bytes(self) -> int:
        """Bytes the file's tensors other than the routed experts take."""
        return sum(n for name, n in self.tensor_bytes().items() if "_exps." not in name)

    def tensor(self, name: str):
        t = self._tensors.get(name)
        if t is None:
            import difflib
            close = difflib.get_close_matches(name, list(self._tensors), n=5, cutoff=0.6)
            hint = f"; close names: {', '.join(close)}" if close else ""
            raise MissingTensorError(f"{self.path}: no tensor {name!r}{hint}")
        return t

    def dims(self, name: str) -> tuple[int, ...]:
        """A tensor's shape in PyTorch order (GGUF stores the innermost dimension first)."""
        return tuple(int(d) for d in reversed(self.tensor(name).shape.tolist()))

    def type_name(self, name: str) -> str:
        return gguf_package().GGMLQuantizationType(int(self.tensor(name).tensor_type)).name

    def native_format(self, name: str) -> WeightFormat | None:
        """The moetier format a tensor's bytes are, or None (a GGML type moetier has no format for)."""
        ttype = int(self.tensor(name).tensor_type)
        if ttype in FLOAT_TYPES:
            return FORMATS[FLOAT_TYPES[ttype]]
        bt = BY_GGML_TYPE.get(ttype)
        return None if bt is None else FORMATS[bt.name]

    def expert_matrix(self, name: str, expert: int, shape: tuple[int, int], *, convert: bool = False) -> QuantizedTensor:
        """Matrix `expert` [out, in] of a fused [E, out, in] tensor, its bytes only, in the native format. A type
        without a moetier format is dequantized to fp32 by the gguf package when `convert`, refused otherwise."""
        t = self.tensor(name)
        dims = self.dims(name)
        if len(dims) != 3 or dims[1:] != tuple(shape):
            raise TensorShapeError(f"{self.path}: tensor {name!r} has shape {list(dims)}, "
                                   f"expected [E, {shape[0]}, {shape[1]}]")
        if not 0 <= expert < dims[0]:
            raise ExpertIdError(f"{self.path}: tensor {name!r} holds experts 0..{dims[0] - 1}, asked for {expert}")
        fmt = self.native_format(name)
        raw = np.array(t.data[expert])  # copies this expert's bytes (and only those) out of the mapping
        if self.drop_page_cache:
            self._drop(name, int(t.data_offset) + expert * raw.nbytes, raw.nbytes)
        if fmt is None:
            if not convert:
                raise FormatError(f"{self.path}: tensor {name!r} is stored as {self.type_name(name)}, which moetier "
                                  "cannot compute; formats it reads natively: " + ", ".join(self.native_names())
                                  + "; pass a format to convert these experts to (e.g. bf16)")
            w = self._gguf_dequantize(name, raw)
            return QuantizedTensor(FORMATS["fp32"], shape, torch.from_numpy(np.ascontiguousarray(w, np.float32)))
        return _as_stored(fmt, shape, raw)

    def matrix(self, name: str) -> QuantizedTensor | None:
        """A tensor [..., in] as the matrix of its rows [out, in] (a dense layer's weight; DeepSeek's per-head
        k_b / v_b stacked) in its native format, its bytes as stored; None for a type moetier has no format for."""
        dims = self.dims(name)
        if len(dims) < 2:
            raise TensorShapeError(f"{self.path}: tensor {name!r} has shape {list(dims)}, expected a matrix")
        fmt = self.native_format(name)
        shape = (math.prod(dims[:-1]), dims[-1])
        return None if fmt is None else _as_stored(fmt, shape, np.array(self.tensor(name).data))

    @staticmethod
    def native_names() -> list[str]:
        return list(FLOAT_TYPES.values()) + [b.name for b in BY_GGML_TYPE.values()]

    def read_float(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """A whole tensor dequantized to fp32 (routers, biases, shared experts; any type gguf can decode)."""
        t = self.tensor(name)
        dims = self.dims(name)
        if shape is not None and dims != tuple(shape):
            raise TensorShapeError(f"{self.path}: tensor {name!r} has shape {list(dims)}, expected {list(shape)}")
        raw = np.array(t.data)
        fmt = self.native_format(name)
        if fmt is not None and fmt.kind == "gguf":
            from ..formats import dequantize
            rows = int(np.prod(dims[:-1])) if len(dims) > 1 else 1
            q = QuantizedTensor(fmt, (rows, dims[-1]), torch.from_numpy(raw.reshape(rows, -1)))
            return dequantize(q, torch.float32).reshape(dims)
        w = self._gguf_dequantize(name, raw)
        return torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)).reshape(dims)

    def _gguf_dequantize(self, name: str, raw: np.ndarray) -> np.ndarray:
        """The gguf package's own dequantizer, for the types moetier has no format for."""
        g = gguf_package()
        try:
            return g.quants.dequantize(raw, g.GGMLQuantizationType(int(self.tensor(name).tensor_type)))
        except NotImplementedError:
            raise FormatError(f"{self.path}: tensor {name!r} is stored as {self.type_name(name)}, which neither moetier "
                              "nor the gguf package can decode") from None

    # -- lifetime ----------------------------------------------------------------------------------

    def _drop(self, name: str, offset: int, nbytes: int) -> None:
        """Unmap bytes [offset, offset + nbytes) of the file holding tensor `name` and drop them from the page cache."""
        reader = self._reader_of[name]
        page = mmap.PAGESIZE
        start = offset // page * page
        m = getattr(reader.data, "_mmap", None)
        if m is not None and hasattr(mmap, "MADV_DONTNEED"):
            try:
                m.madvise(mmap.MADV_DONTNEED, start, min(offset + nbytes, len(m)) - start)
            except (OSError, ValueError):
                pass
        drop_cached(reader.data.filename, offset, nbytes)

    def release(self) -> None:
        """Drop the pages read so far from this process's resident memory (they stay in the page cache),
        so a layer-by-layer load does not show the whole file as resident."""
        for r in self._readers:
            m = getattr(r.data, "_mmap", None)
            if m is not None and hasattr(m, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
                try:
                    m.madvise(mmap.MADV_DONTNEED)
                except (OSError, ValueError):
                    pass

    def close(self) -> None:
        self.release()
        self._readers, self._tensors = [], {}

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r}, {self.arch}, {len(self._tensors)} tensors)"


class GGUFExperts:
    """ExpertSource over one MoE layer of a GGUF file. `convert`: experts in a type moetier has no format
    for are read through the gguf dequantizer as fp32 (the backend's prepare then converts them to the
    format asked for); otherwise they are refused. `to`: as CheckpointExperts (None keeps the native format)."""

    def __init__(self, gf: GGUFFile, layer, *, to=None, convert: bool = False, progress: bool | None = False):
        self.gf, self.layer, self.to, self.convert = gf, layer, to, convert
        names, i = _names(), layer.index
        if gf.has(names["gate_up"].format(bid=i)) and not gf.has(names["gate"].format(bid=i)):
            raise FormatError(f"{gf.path}: layer {i} stores its experts fused as {names['gate_up'].format(bid=i)!r}; "
                              "only separate ffn_gate_exps / ffn_up_exps / ffn_down_exps are read")
        self.names = {w: names[w].format(bid=i) for w in ("gate", "up", "down")}
        self._ticks = track(range(layer.experts.num_experts), description=f"layer {i} experts", enabled=progress)
        self._tick_lock = threading.Lock()  # the disk tier reads from the forward and the prefetch threads

    def formats(self) -> dict[str, WeightFormat | None]:
        """The native format of the gate, up and down tensors (None: a type without a moetier format)."""
        return {w: self.gf.native_format(n) for w, n in self.names.items()}

    def type_names(self) -> dict[str, str]:
        return {w: self.gf.type_name(n) for w, n in self.names.items()}

    def expert(self, expert_id: int) -> ExpertTensors:
        spec, i = self.layer.experts, self.layer.index
        if not 0 <= expert_id < spec.num_experts:
            raise ExpertIdError(f"layer {i}: expert id {expert_id} out of range [0, {spec.num_experts})")
        with self._tick_lock:
            next(self._ticks, None)
        H, I = spec.hidden_size, spec.intermediate_size
        m = [self.gf.expert_matrix(self.names[w], expert_id, shape, convert=self.convert)
             for w, shape in (("gate", (I, H)), ("up", (I, H)), ("down", (H, I)))]
        return ExpertTensors(*(convert_to(q, self.to) for q in m))

    def done(self) -> None:
        for _ in self._ticks:
            pass


def read_router(gf: GGUFFile, layer) -> RouterTensors:
    """The router weight [E, H], selection bias [E] and logit bias [E] where the layout uses them, fp32."""
    names, i = _names(), layer.index
    E, H = layer.experts.num_experts, layer.experts.hidden_size
    w = gf.read_float(names["router"].format(bid=i), (E, H))
    sel = gf.read_float(names["selection_bias"].format(bid=i), (E,)) if layer.router.selection_bias else None
    lb = gf.read_float(names["router_bias"].format(bid=i), (E,)) if layer.router.logit_bias else None
    return RouterTensors(w, sel, lb)


def read_shared(gf: GGUFFile, layer) -> SharedTensors | None:
    """The layer's shared expert in fp32: gate/up [S, H], down [H, S], gate_weight [1, H] when gated."""
    if layer.shared is None:
        return None
    names, i = _names(), layer.index
    H, S = layer.experts.hidden_size, layer.shared.intermediate_size
    gate_weight = None
    if layer.shared.gated:
        name = names["shared_gate_inp"].format(bid=i)
        if gf.dims(name) not in ((H,), (1, H)):
            raise TensorShapeError(f"{gf.path}: tensor {name!r} has shape {list(gf.dims(name))}, expected [{H}]")
        gate_weight = gf.read_float(name).reshape(1, H)
    return SharedTensors(gf.read_float(names["shared_gate"].format(bid=i), (S, H)),
                         gf.read_float(names["shared_up"].format(bid=i), (S, H)),
                         gf.read_float(names["shared_down"].format(bid=i), (H, S)), gate_weight)


def _as_stored(fmt: WeightFormat, shape: tuple[int, int], raw: np.ndarray) -> QuantizedTensor:
    if fmt.name == "bf16":  # GGUF bf16 arrives as raw bytes
        data = torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16)
    else:
        data = torch.from_numpy(raw)
    return QuantizedTensor(fmt, tuple(shape), data.reshape(shape[0], -1).contiguous())


def tensor_names(gf: GGUFFile):
    """name -> llama.cpp's tensor name for transformers' parameter names (the gguf package's own table, what
    convert_hf_to_gguf.py writes by), or None where it maps none."""
    g = gguf_package()
    arch = next((a for a, n in g.MODEL_ARCH_NAMES.items() if n == gf.arch), None)
    if arch is None:
        raise LayoutError(f"{gf.path}: the gguf package does not know architecture {gf.arch!r}")
    tmap = g.get_tensor_name_map(arch, int(gf.llm("block_count")))

    def gguf_name(name: str) -> str | None:
        if name.endswith("e_score_correction_bias"):  # a buffer named like a parameter: llama.cpp's is a bias
            return tmap.get_name(name.removesuffix("_bias") + ".bias", try_suffixes=(".bias",))
        return tmap.get_name(name, try_suffixes=(".weight", ".bias"))

    return gguf_name


def hf_state_dict(gf: GGUFFile, wanted: dict[str, tuple[tuple[int, ...], torch.dtype]], *,
                  progress: bool | None = False) -> dict[str, torch.Tensor]:
    """The tensors of the file under transformers' names: `wanted` maps each parameter or persistent buffer of
    the model (the routed experts' left out) to its shape and dtype. Names are mapped to llama.cpp's with the
    gguf package's own table (gguf.get_tensor_name_map, what convert_hf_to_gguf.py writes by); DeepSeek's
    kv_b_proj is put back together from the k_b / v_b halves llama.cpp's absorbed MLA stores. Each tensor is
    dequantized by its type and cast to its dtype (a tied LM head is left to transformers).
    MissingTensorError names a tensor the model needs that the file lacks."""
    gguf_name = tensor_names(gf)
    out = {}
    for name, (shape, dtype) in track(wanted.items(), description="dense tensors", enabled=progress):
        gname = gguf_name(name)
        if name.endswith("kv_b_proj.weight") and gname is not None and not gf.has(gname):
            t = _kv_b(gf, gname, shape)
        elif gname is not None and gf.has(gname):
            t = gf.read_float(gname)
        elif name == "lm_head.weight" and not gf.has(f"{OUTPUT}.weight"):
            continue  # tied to the embedding table
        else:
            raise MissingTensorError(f"{gf.path}: no tensor for {name}" + (f" ({gname!r})" if gname else
                                     " (the gguf package maps it to no llama.cpp name)"))
        if tuple(t.shape) != tuple(shape):
            if t.numel() != math.prod(shape):
                raise TensorShapeError(f"{gf.path}: tensor {gname!r} has shape {list(t.shape)}; {name} is "
                                       f"{list(shape)}")
            t = t.reshape(shape)  # 1-element leading dimensions (a gate vector stored [1, H])
        out[name] = t.to(dtype)
    return out


def _kv_b(gf: GGUFFile, kv_b_name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """kv_b_proj [heads * (nope + v), kv_rank] from llama.cpp's k_b [heads, kv_rank, nope] (stored transposed
    per head) and v_b [heads, v, kv_rank]."""
    k_name, v_name = kv_b_name.replace("attn_kv_b", "attn_k_b"), kv_b_name.replace("attn_kv_b", "attn_v_b")
    k_b, v_b = gf.read_float(k_name), gf.read_float(v_name)
    if k_b.ndim != 3 or v_b.ndim != 3 or k_b.shape[0] != v_b.shape[0] or k_b.shape[1] != v_b.shape[2]:
        raise TensorShapeError(f"{gf.path}: {k_name} {list(k_b.shape)} and {v_name} {list(v_b.shape)} are not the "
                               "halves of one kv_b projection ([heads, kv_rank, nope] and [heads, v, kv_rank])")
    kv_b = torch.cat([k_b.transpose(1, 2), v_b], dim=1)  # [heads, nope + v, kv_rank]
    return kv_b.reshape(-1, kv_b.shape[-1])


def verify_gguf(gf: GGUFFile, layout) -> int:
    """Check, from the header only, that every MoE tensor the layout needs exists with its shape; returns
    the number of expert tensors checked."""
    names, n = _names(), 0
    for layer in layout.moe_layers:
        i, E = layer.index, layer.experts.num_experts
        H, I = layer.experts.hidden_size, layer.experts.intermediate_size
        want = {"gate": (E, I, H), "up": (E, I, H), "down": (E, H, I), "router": (E, H)}
        if layer.router.selection_bias:
            want["selection_bias"] = (E,)
        if layer.shared is not None:
            S = layer.shared.intermediate_size
            want.update(shared_gate=(S, H), shared_up=(S, H), shared_down=(H, S))
        for w, shape in want.items():
            name = names[w].format(bid=i)
            if gf.dims(name) != shape:
                raise TensorShapeError(f"{gf.path}: tensor {name!r} has shape {list(gf.dims(name))}; "
                                       f"the metadata says {list(shape)}")
            n += w in ("gate", "up", "down")
    return n
