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
TYPES = {"q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1, "q5_0": Q.Q5_0, "q5_1": Q.Q5_1, "q2_k": Q.Q2_K,
         "q3_k": Q.Q3_K, "q4_k": Q.Q4_K, "q5_k": Q.Q5_K, "q6_k": Q.Q6_K, "iq4_nl": Q.IQ4_NL, "iq4_xs": Q.IQ4_XS,
         "f32": Q.F32, "f16": Q.F16, "iq2_xxs": Q.IQ2_XXS}


@dataclass
class Model:
    """A synthetic MoE model. `shared`: DeepSeek/GLM shared-expert count, or Qwen2's shared-expert width.
    `types`: GGUF types of ffn_gate_exps, ffn_up_exps, ffn_down_exps; `layer_types`: other types for some
    blocks (as llama.cpp's Q4_K_M gives some blocks' ffn_down Q6_K). `meta`: extra `<arch>.` keys."""

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
    layer_types: dict = field(default_factory=dict)  # block index -> (gate, up, down) types


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
    if t == "iq2_xxs":  # a type moetier has no format for: random blocks, which gguf's dequantizer still reads
        g = torch.Generator().manual_seed(int(w.abs().sum() * 1000) % 2**31)
        n = w.shape[2] // 256 * 66
        b = torch.randint(0, 256, (w.shape[0], w.shape[1], n), generator=g, dtype=torch.uint8).numpy()
        b.reshape(-1, 66)[:, 0:2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)  # finite d
        return b
    return np.stack([quantize(w[e], t).data.numpy() for e in range(w.shape[0])])


def llama_cpp_converter():
    """ci/llama_cpp_bench.py as a module: its convert_bf16(CHECKPOINT, FILE.gguf) writes what llama.cpp's
    converter writes for a checkpoint of `moetier bench model` (needs only the gguf package)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("llama_cpp_bench", Path(__file__).parents[2] / "ci" / "llama_cpp_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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
        shapes = {"gate": (E, I, H), "up": (E, I, H), "down": (E, H, I)}
        for n, t in zip(("gate", "up", "down"), m.layer_types.get(i, m.types)):
            shape = shapes[n]
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


# ---- a tiny HF checkpoint as llama.cpp's convert_hf_to_gguf.py would write its MoE part -------------------

HF_ARCH = {"qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe", "deepseek_v2": "deepseek2", "deepseek_v3": "deepseek2",
           "kimi_k2": "deepseek2", "glm4_moe": "glm4moe", "minimax_m2": "minimax-m2"}


def from_hf(ckpt_dir, layout, out_path, expert_type: str = "f32") -> str:
    """Write the MoE tensors of a safetensors checkpoint (and the metadata convert_hf_to_gguf.py derives from
    its config.json) as a GGUF file: routers, selection biases and shared experts F32, routed experts
    stacked [E, out, in] in `expert_type`. Non-MoE tensors are left out (moetier does not read them)."""
    from moetier.checkpoint import Checkpoint

    with Checkpoint(ckpt_dir) as ckpt:
        c = ckpt.config
        arch = HF_ARCH[c["model_type"]]
        L = c["num_hidden_layers"]
        nextn = c.get("num_nextn_predict_layers") or 0
        first = layout.moe_layers[0]
        E, k = first.experts.num_experts, first.experts.top_k
        w = gguf.GGUFWriter(str(out_path), arch)
        w.add_name(c["_name_or_path"])
        w.add_block_count(L + (nextn if arch == "glm4moe" else 0))
        w.add_embedding_length(c["hidden_size"])
        w.add_feed_forward_length(c["intermediate_size"])
        w.add_expert_count(E)
        w.add_expert_used_count(k)
        w.add_expert_feed_forward_length(first.experts.intermediate_size)
        if arch == "qwen2moe":
            w.add_expert_shared_feed_forward_length(c["shared_expert_intermediate_size"])
        if arch in ("deepseek2", "glm4moe"):
            sigmoid = c["model_type"] != "deepseek_v2"
            w.add_leading_dense_block_count(c["first_k_dense_replace"])
            w.add_expert_shared_count(c.get("n_shared_experts") or 0)
            w.add_expert_weights_scale(float(c.get("routed_scaling_factor") or 1.0))
            w.add_expert_weights_norm(bool(c.get("norm_topk_prob")))
            w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if sigmoid else gguf.ExpertGatingFuncType.SOFTMAX)
            if sigmoid or c.get("topk_method") == "group_limited_greedy":
                w.add_expert_group_count(c.get("n_group") or 1)
                w.add_expert_group_used_count(c.get("topk_group") or 1)
        if arch == "glm4moe" and nextn:
            w.add_nextn_predict_layers(nextn)
        if arch == "minimax-m2":
            w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)

        def f32(name):
            return ckpt.read(name).to(torch.float32).numpy()

        def mat(base):
            return ckpt.read_matrix(base, to=torch.float32).data

        mtp = [(layout.num_hidden_layers + j, first) for j in range(nextn if arch == "glm4moe" else 0)]
        for i, m in [(m.index, m) for m in layout.moe_layers] + mtp:
            n = m.names
            w.add_tensor(f"blk.{i}.ffn_gate_inp.weight", f32(n.router_module(i) + ".weight"))
            if m.router.selection_bias:
                w.add_tensor(f"blk.{i}.exp_probs_b.bias", f32(n.selection_bias_name(i)))
            for which in ("gate", "up", "down"):
                stack = torch.stack([mat(n.expert_module(i, e, which)) for e in range(E)])
                arr = _stored(stack, expert_type)
                w.add_tensor(f"blk.{i}.ffn_{which}_exps.weight", arr,
                             raw_dtype=TYPES[expert_type] if arr.dtype == np.uint8 else None)
            if m.shared is not None:
                for which in ("gate", "up", "down"):
                    w.add_tensor(f"blk.{i}.ffn_{which}_shexp.weight", mat(n.shared_module(i, which)).numpy())
                if m.shared.gated:
                    w.add_tensor(f"blk.{i}.ffn_gate_inp_shexp.weight", f32(n.shared_gate_module(i) + ".weight")[0])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return str(out_path)
