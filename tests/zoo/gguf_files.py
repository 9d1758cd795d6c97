"""Small GGUF MoE models written with the gguf package's own GGUFWriter, in llama.cpp's tensor names and
metadata keys per architecture (the keys convert_hf_to_gguf.py writes), experts quantized with moetier's
reference quantizers. Used by the GGUF tests; nothing here is moetier code under test."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from moetier.formats import quantize

gguf = __import__("gguf")
Q = gguf.GGMLQuantizationType
TYPES = {"q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_k": Q.Q4_K, "q5_k": Q.Q5_K, "q6_k": Q.Q6_K, "f32": Q.F32, "f16": Q.F16,
         "q3_k": Q.Q3_K}


@dataclass
class Model:
    """A synthetic MoE model. `shared`: DeepSeek/GLM shared-expert count, or Qwen2's shared-expert width.
    `types`: GGUF types of ffn_gate_exps, ffn_up_exps, ffn_down_exps. `meta`: extra `<arch>.` keys."""

    arch: str
    name: str
    layers: int
    hidden: int
    inter: int
    experts: int
    top_k: int
    types: tuple[str, str, str] = ("q4_k", "q4_k", "q4_k")
    shared: int = 0
    leading_dense: int = 0
    nextn: int = 0
    selection_bias: bool = False
    meta: dict = field(default_factory=dict)


@dataclass
class Written:
    """What was written: per MoE layer the router, bias, the float experts before quantization, the
    expert tensors' bytes exactly as stored, and the shared expert (fp32)."""

    path: str
    layers: dict = field(default_factory=dict)


def _stored(w: torch.Tensor, t: str) -> np.ndarray:
    """Stacked [E, out, in] float weights as the GGUF tensor array of type t."""
    if t == "f32":
        return w.numpy().astype(np.float32)
    if t == "f16":
        return w.numpy().astype(np.float16)
    if t == "q3_k":  # no quantizer anywhere: random blocks, which gguf's dequantizer still reads
        g = torch.Generator().manual_seed(int(w.abs().sum() * 1000) % 2**31)
        n = w.shape[2] // 256 * 110
        b = torch.randint(0, 256, (w.shape[0], w.shape[1], n), generator=g, dtype=torch.uint8).numpy()
        b.reshape(-1, 110)[:, 108:110] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)  # finite d
        return b
    return np.stack([quantize(w[e], t).data.numpy() for e in range(w.shape[0])])


def write(path, m: Model, seed: int = 0, split_max_tensors: int = 0) -> Written:
    g = torch.Generator().manual_seed(seed)
    E, H, I, L = m.experts, m.hidden, m.inter, m.layers
    w = gguf.GGUFWriter(str(path), m.arch, split_max_tensors=split_max_tensors)
    w.add_name(m.name)
    w.add_basename(m.name)
    w.add_block_count(L + m.nextn)
    w.add_embedding_length(H)
    w.add_feed_forward_length(4 * H)
    w.add_expert_count(E)
    w.add_expert_used_count(m.top_k)
    w.add_expert_feed_forward_length(I)
    if m.arch in ("deepseek2", "glm4moe"):
        w.add_leading_dense_block_count(m.leading_dense)
        w.add_expert_shared_count(m.shared)
    if m.arch == "qwen2moe" and m.shared:
        w.add_expert_shared_feed_forward_length(m.shared)
    if m.nextn:
        w.add_nextn_predict_layers(m.nextn)
    for key, value in m.meta.items():
        getattr(w, f"add_{key}")(value)
    out = Written(str(path))
    w.add_tensor("token_embd.weight", torch.randn(32, H, generator=g).numpy())
    w.add_tensor("output_norm.weight", np.ones(H, np.float32))
    for i in range(L + m.nextn):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(H, np.float32))
        if i < m.leading_dense:
            for n, shape in (("gate", (4 * H, H)), ("up", (4 * H, H)), ("down", (H, 4 * H))):
                w.add_tensor(f"blk.{i}.ffn_{n}.weight", (torch.randn(*shape, generator=g) * 0.05).numpy())
            continue
        layer = {"router": torch.randn(E, H, generator=g) / H ** 0.5}
        w.add_tensor(f"blk.{i}.ffn_gate_inp.weight", layer["router"].numpy())
        if m.selection_bias:
            layer["bias"] = torch.randn(E, generator=g) * 0.5
            w.add_tensor(f"blk.{i}.exp_probs_b.bias", layer["bias"].numpy())
        for n, t, shape in (("gate", m.types[0], (E, I, H)), ("up", m.types[1], (E, I, H)), ("down", m.types[2], (E, H, I))):
            f = torch.randn(*shape, generator=g) / shape[2] ** 0.5
            arr = _stored(f, t)
            layer[n], layer[n + "_bytes"], layer[n + "_type"] = f, arr, t
            if arr.dtype == np.uint8:
                w.add_tensor(f"blk.{i}.ffn_{n}_exps.weight", arr, raw_dtype=TYPES[t])
            else:
                w.add_tensor(f"blk.{i}.ffn_{n}_exps.weight", arr)
        S = m.shared * I if m.arch in ("deepseek2", "glm4moe") else m.shared
        if S:
            for n, shape in (("gate", (S, H)), ("up", (S, H)), ("down", (H, S))):
                layer["shared_" + n] = torch.randn(*shape, generator=g) / shape[1] ** 0.5
                w.add_tensor(f"blk.{i}.ffn_{n}_shexp.weight", layer["shared_" + n].numpy())
            if m.arch == "qwen2moe":
                layer["shared_gate_inp"] = torch.randn(H, generator=g) / H ** 0.5
                w.add_tensor(f"blk.{i}.ffn_gate_inp_shexp.weight", layer["shared_gate_inp"].numpy())
        out.layers[i] = layer
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
