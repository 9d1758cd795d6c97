"""What the kernel benchmark runs: layer shapes, random weights, routing, and the byte / FLOP accounting.

Everything here is deterministic given a seed, so the same workload can be replayed through another
implementation (the peer's kernels, in their own environment) and compared number for number.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch

from ..errors import ShapeError
from ..experts import ExpertLayerSpec, ExpertTensors, ExpertWeights
from ..formats import QuantizedTensor, get_format, quantize

GIB = 1 << 30
# The formats the benchmark covers by default (fp32/fp16 are storage formats no fast path targets).
BENCH_FORMATS = ("bf16", "int8", "int4_g32", "int4_g64", "int4_g128", "fp8_e4m3")
DECODE_BATCHES = (1, 4)
PREFILL_BATCHES = (128, 512)
DEFAULT_L3_BYTES = 32 << 20
# Between two uses of the same prepared copy at least this many L3 sizes of other weight bytes are
# streamed, so no decode step finds its weights in the cache (a real model streams every other layer
# in between).
L3_MULTIPLE = 4
# Expert popularity: log-normal with this sigma (the hottest of 128 experts gets about 3x the mean
# load), so routing is neither uniform nor degenerate.
POPULARITY_SIGMA = 0.5
MAX_COPIES = 64  # small test shapes would otherwise ask for hundreds


@dataclass(frozen=True)
class BenchShape:
    name: str
    layer: ExpertLayerSpec
    description: str


def qwen3_30b() -> BenchShape:
    return BenchShape("qwen3-30b", ExpertLayerSpec(128, 8, 2048, 768),
                      "Qwen3-30B-A3B MoE layer: 128 experts, top-8, hidden 2048, expert intermediate 768")


def deepseek_v3(max_weight_bytes: int) -> BenchShape:
    """The DeepSeek-V3 expert shape (hidden 7168, intermediate 2048, top-8) with as many of its 256
    experts as fit `max_weight_bytes` in bf16 (a multiple of 8, at least 8)."""
    per_expert = ExpertLayerSpec(8, 8, 7168, 2048).expert_bytes("bf16")
    experts = min(256, max(8, int(max_weight_bytes // per_expert) // 8 * 8))
    return BenchShape("deepseek-v3", ExpertLayerSpec(experts, 8, 7168, 2048),
                      f"DeepSeek-V3 expert shape: hidden 7168, intermediate 2048, top-8, {experts} of its 256 experts "
                      "(as many as the memory budget allows)")


def gpt_oss_20b() -> BenchShape:
    return BenchShape("gpt-oss-20b", ExpertLayerSpec(32, 4, 2880, 2880, activation="swiglu_oai", has_bias=True),
                      "gpt-oss-20b MoE layer: 32 experts, top-4, hidden 2880, expert intermediate 2880, clamped "
                      "SwiGLU with biases (shipped in mxfp4)")


def tiny() -> BenchShape:
    """A seconds-scale shape for tests and smoke runs (not a model)."""
    return BenchShape("tiny", ExpertLayerSpec(16, 4, 256, 128), "test shape: 16 experts, top-4, hidden 256, intermediate 128")


SHAPE_NAMES = ("qwen3-30b", "deepseek-v3", "gpt-oss-20b", "tiny")


def get_shape(name: str, max_weight_bytes: int) -> BenchShape:
    if name == "qwen3-30b":
        return qwen3_30b()
    if name == "deepseek-v3":
        return deepseek_v3(max_weight_bytes)
    if name == "gpt-oss-20b":
        return gpt_oss_20b()
    if name == "tiny":
        return tiny()
    raise ShapeError(f"unknown bench shape {name!r}; known: {', '.join(SHAPE_NAMES)}")


# ---- accounting ---------------------------------------------------------------------------------

def flops_per_forward(layer: ExpertLayerSpec, tokens: int) -> int:
    """2 FLOP per multiply-add over gate, up and down: 2 * 3 * H * I per (token, expert) pair."""
    return 2 * 3 * layer.hidden_size * layer.intermediate_size * tokens * layer.top_k


def distinct_experts(topk_ids: torch.Tensor) -> int:
    return int(torch.unique(topk_ids).numel())


def weight_bytes_per_forward(layer: ExpertLayerSpec, fmt: str, topk_ids: torch.Tensor) -> int:
    """Expert weight bytes a forward must stream: each distinct expert touched, once, in `fmt`."""
    return distinct_experts(topk_ids) * layer.expert_bytes(fmt)


def plan_copies(layer: ExpertLayerSpec, copy_bytes: int, step_bytes: int, max_weight_bytes: int,
                l3_bytes: int = DEFAULT_L3_BYTES) -> int:
    """How many independent prepared copies of the layer to rotate through.

    Enough that between two uses of one copy at least L3_MULTIPLE x the L3 of other weights is streamed
    (the copy's own step counts), never more than the budget holds or MAX_COPIES, at least one.
    """
    if copy_bytes <= 0 or step_bytes <= 0:
        raise ValueError("copy_bytes and step_bytes must be positive")
    wanted = max(1, math.ceil(L3_MULTIPLE * l3_bytes / step_bytes))
    affordable = max(1, max_weight_bytes // copy_bytes)
    return int(min(wanted, affordable, MAX_COPIES))


def l3_bytes() -> int:
    """The last-level cache size of this machine (DEFAULT_L3_BYTES when the OS does not say)."""
    import os

    for index in range(4, 1, -1):
        path = f"/sys/devices/system/cpu/cpu0/cache/index{index}/size"
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        try:
            return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
        except (ValueError, IndexError):
            continue
    try:
        v = os.sysconf("SC_LEVEL3_CACHE_SIZE")
        if v > 0:
            return int(v)
    except (ValueError, OSError, AttributeError):
        pass
    return DEFAULT_L3_BYTES


# ---- random data --------------------------------------------------------------------------------

def weights_seed(seed: int, fmt: str) -> int:
    """The weight seed of one format in a run (stable across processes, unlike hash())."""
    return seed * 7919 + zlib.crc32(fmt.encode()) % 1000


def random_matrix(out_f: int, in_f: int, fmt: str, g: torch.Generator) -> QuantizedTensor:
    """A random [out_f, in_f] matrix stored in `fmt`, drawn directly as that format's codes and scales.

    Timing does not depend on the values, only on valid, incompressible data; drawing codes (rather than
    quantizing a float matrix) keeps a model-sized layer's setup to seconds. Magnitudes follow
    1/sqrt(in_f) so outputs stay finite: bf16/fp16/fp32 values have a random sign and mantissa and an
    exponent spread over four octaves below 2/sqrt(in_f); int8 codes are in [-127, 127] and int4 codes in
    [-7, 7] (the reference quantizer's ranges); fp8 codes are every finite e4m3 value; block formats
    are a normal matrix quantized.
    """
    f = get_format(fmt)
    top = 2.0 / math.sqrt(in_f)
    if f.kind == "float":
        bits = torch.randint(-(1 << 15), 1 << 15, (out_f, in_f), dtype=torch.int16, generator=g)
        base = 127 + math.floor(math.log2(top)) - 4
        # keep sign and mantissa (0x807F), put a biased exponent base..base+3 into bits 7-14
        bits = (bits & -0x7F81) | (((bits >> 7) & 3) + base) << 7
        bf16 = bits.view(torch.bfloat16)
        return QuantizedTensor(f, (out_f, in_f), bf16.to(f.dtype).contiguous())
    if f.kind == "int8":
        codes = torch.randint(-127, 128, (out_f, in_f), dtype=torch.int8, generator=g)
        scales = (0.5 + torch.rand(out_f, generator=g)) * (top / 127)
        return QuantizedTensor(f, (out_f, in_f), codes, scales.contiguous())
    if f.kind == "int4":
        half = (in_f + 1) // 2
        lo = torch.randint(1, 16, (out_f, half), dtype=torch.uint8, generator=g)  # stored q+8: q in [-7, 7]
        hi = torch.randint(1, 16, (out_f, half), dtype=torch.uint8, generator=g)
        groups = math.ceil(in_f / f.group_size)
        scales = (0.5 + torch.rand(out_f, groups, generator=g)) * (top / 7)
        return QuantizedTensor(f, (out_f, in_f), (lo | (hi << 4)).contiguous(), scales.contiguous())
    if f.kind == "fp8":
        codes = torch.randint(0, 256, (out_f, in_f), dtype=torch.uint8, generator=g)
        codes = torch.where((codes & 0x7F) == 0x7F, codes - 1, codes)  # 0x7F / 0xFF are NaN in e4m3fn
        br, bc = f.block
        scales = (0.5 + torch.rand(math.ceil(out_f / br), math.ceil(in_f / bc), generator=g)) * (top / 448)
        return QuantizedTensor(f, (out_f, in_f), codes.view(torch.float8_e4m3fn).contiguous(), scales.contiguous())
    # Block formats (GGUF, MXFP4): a random normal matrix through the reference quantizer (slower, but their
    # scales sit inside the blocks and every byte pattern is not a valid block).
    return quantize(torch.randn(out_f, in_f, generator=g) * (top / 2), f)


def random_weights(layer: ExpertLayerSpec, fmt: str, seed: int) -> ExpertWeights:
    """Every expert of `layer` as random matrices in `fmt` (see random_matrix; a mixed format: gate/up in its
    gate/up part, down in its down part)."""
    g = torch.Generator().manual_seed(seed)
    h, i = layer.hidden_size, layer.intermediate_size
    gu, dn = get_format(fmt).gate_up, get_format(fmt).down

    def biases():
        return (torch.randn(i, generator=g) * 0.1, torch.randn(i, generator=g) * 0.1,
                torch.randn(h, generator=g) * 0.1) if layer.has_bias else (None, None, None)

    return ExpertWeights({e: ExpertTensors(random_matrix(i, h, gu, g), random_matrix(i, h, gu, g),
                                           random_matrix(h, i, dn, g), *biases())
                          for e in range(layer.num_experts)})


def random_hidden(layer: ExpertLayerSpec, tokens: int, seed: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, layer.hidden_size, generator=g).to(dtype).contiguous()


@dataclass(frozen=True, eq=False)
class Routing:
    """One forward's routing: distinct expert ids per token and weights that sum to 1 per token."""

    topk_ids: torch.Tensor  # int64 [T, k]
    topk_weights: torch.Tensor  # float32 [T, k]


def random_routing(layer: ExpertLayerSpec, tokens: int, sets: int, seed: int,
                   sigma: float = POPULARITY_SIGMA) -> list[Routing]:
    """`sets` routings of `tokens` tokens each.

    Experts get a fixed log-normal popularity; each token draws its k distinct experts without
    replacement with probability proportional to it (Gumbel top-k), and its weights are a softmax over
    the drawn scores, as a softmax router's renormalized top-k would give.
    """
    if tokens < 1 or sets < 1:
        raise ShapeError(f"tokens and sets must be >= 1, got {tokens}, {sets}")
    g = torch.Generator().manual_seed(seed)
    log_pop = torch.randn(layer.num_experts, generator=g) * sigma
    out = []
    for _ in range(sets):
        u = torch.rand(tokens, layer.num_experts, generator=g).clamp_(1e-12, 1 - 1e-12)
        scores = log_pop - torch.log(-torch.log(u))  # + Gumbel noise
        top = scores.topk(layer.top_k, dim=1)
        weights = torch.softmax(top.values, dim=1).to(torch.float32)
        out.append(Routing(top.indices.to(torch.int64).contiguous(), weights.contiguous()))
    return out
