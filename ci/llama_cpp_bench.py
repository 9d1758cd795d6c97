"""llama.cpp (through llama-cpp-python) on the checkpoint `moetier bench model` wrote; run by
ci/llama_cpp_bench.sh inside its own virtual environment (numpy, safetensors, gguf, llama-cpp-python; no
torch, no moetier).

1. Convert: the Qwen3-MoE, Qwen2-MoE, GLM-4.5, MiniMax-M2 or DeepSeek-V3 safetensors checkpoint (bf16)
   becomes a BF16 GGUF in llama.cpp's `qwen3moe` / `qwen2moe` / `glm4moe` / `minimax-m2` / `deepseek2` tensor names and metadata keys (those convert_hf_to_gguf.py writes; DeepSeek's
   kv_b split into k_b and v_b for llama.cpp's absorbed MLA), written with the gguf package;
   the weights' bf16 bytes are copied as they are, the 1-D norms stored as F32 (as the converter does).
   The checkpoint has no tokenizer: a synthetic vocabulary of the model's size ("<0>", "<1>", ...) is
   written, since the runs feed token ids directly. Q8_0, Q4_0, Q4_K_M (and on request Q3_K_M, Q2_K) come
   from llama.cpp's own quantizer (`llama_model_quantize`) on that BF16 file, as a user would make them.
2. Measure, per type: a prompt of --prompt-tokens random ids evaluated in one batch (prefill: tokens /
   seconds), then --new-tokens greedy steps, one token each (decode: tokens / seconds), after an untimed
   warm-up run; the median of --repeats runs. The same lengths, threads and repeats as the moetier bench.

With --logits N: no timing; llama.cpp's logits over an N-token random prompt per type go to OUT (.npz, with
the prompt) for ci/llama_cpp_compare.py.

Writes {"schema": "moetier.bench.llama_cpp/1", "records": [{"gguf_type", "prefill_tok_s", "decode_tok_s",
"prefill_runs", "decode_runs", "file_bytes", ...}], ...} for `moetier bench model --llama-cpp`.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import struct
import sys
import time
from pathlib import Path

import numpy as np

TYPES = ("BF16", "Q8_0", "Q4_0", "Q4_K_M")  # the default run
KNOWN_TYPES = (*TYPES, "Q3_K_M", "Q2_K")


def read_safetensors(folder: Path) -> dict[str, tuple[Path, str, list[int], int, int]]:
    """name -> (file, dtype, shape, begin, end) from every shard's header."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(n))
        base = 8 + n
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            b, e = meta["data_offsets"]
            out[name] = (f, meta["dtype"], meta["shape"], base + b, base + e)
    return out


def raw_f32(entry) -> np.ndarray:
    """An F32 tensor (the zoo writes DeepSeek's selection bias in fp32, as the releases ship it)."""
    f, dtype, shape, b, e = entry
    if dtype == "BF16":
        return bf16_to_f32(raw(entry))
    with open(f, "rb") as fh:
        fh.seek(b)
        return np.frombuffer(fh.read(e - b), dtype=np.float32).reshape(shape)


def raw(entry) -> np.ndarray:
    f, dtype, shape, b, e = entry
    if dtype != "BF16":
        raise SystemExit(f"llama_cpp_bench.py: expected a bf16 checkpoint (what `moetier bench model` writes), "
                         f"found {dtype}")
    with open(f, "rb") as fh:
        fh.seek(b)
        return np.frombuffer(fh.read(e - b), dtype=np.uint16).reshape(shape)


def bf16_to_f32(a: np.ndarray) -> np.ndarray:
    return (a.astype(np.uint32) << 16).view(np.float32)


ARCH = {"qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe", "glm4_moe": "glm4moe", "minimax_m2": "minimax-m2",
        "deepseek_v3": "deepseek2"}


def convert_bf16(ckpt: Path, out: Path) -> None:
    """The BF16 GGUF of a Qwen3-MoE, Qwen2-MoE, GLM-4.5, MiniMax-M2 (bf16, not its shipped FP8) or
    DeepSeek-V3 checkpoint, as convert_hf_to_gguf.py writes it."""
    import gguf

    cfg = json.loads((ckpt / "config.json").read_text())
    arch = ARCH.get(cfg.get("model_type"))
    if arch is None:
        raise SystemExit(f"llama_cpp_bench.py: converts Qwen3-MoE, Qwen2-MoE, GLM-4.5, MiniMax-M2 and DeepSeek-V3 "
                         f"checkpoints, this one is "
                         f"{cfg.get('model_type')}")
    t = read_safetensors(ckpt)
    L, H, V = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]
    w = gguf.GGUFWriter(str(out), arch)
    w.add_name(cfg.get("_name_or_path", "synthetic"))
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(H)
    w.add_block_count(L)
    w.add_feed_forward_length(cfg["intermediate_size"])  # MiniMax-M2's is its experts' (no dense MLP)
    w.add_head_count(cfg["num_attention_heads"])
    w.add_rope_freq_base(float(cfg.get("rope_theta") or cfg.get("rope_parameters", {}).get("rope_theta", 1e6)))
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    w.add_expert_feed_forward_length(cfg.get("moe_intermediate_size") or cfg["intermediate_size"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([f"<{i}>" for i in range(V)])
    w.add_token_types([gguf.TokenType.NORMAL] * V)
    w.add_token_merges(["< 0"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(V - 1)

    def bf16(name: str, arr: np.ndarray) -> None:
        w.add_tensor(name, np.ascontiguousarray(arr).view(np.uint8), raw_dtype=gguf.GGMLQuantizationType.BF16)

    def f32(name: str, arr: np.ndarray) -> None:
        w.add_tensor(name, bf16_to_f32(arr))

    def experts(i: int, p: str, E: int) -> None:
        f32(f"blk.{i}.ffn_gate_inp.weight", raw(t[p + "mlp.gate.weight"]))  # the converter keeps routers F32
        for proj, gg in (("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"), ("down_proj", "ffn_down_exps")):
            bf16(f"blk.{i}.{gg}.weight", np.stack([raw(t[p + f"mlp.experts.{e}.{proj}.weight"]) for e in range(E)]))

    def mlp(i: int, p: str, hf: str, suffix: str) -> None:  # gate/up/down of a dense MLP or a shared expert
        for proj, gg in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")):
            bf16(f"blk.{i}.{gg}{suffix}.weight", raw(t[p + f"{hf}.{proj}.weight"]))

    def gqa_attention(i: int, p: str) -> None:  # q/k/v/o, with the biases and q/k norms the checkpoint has
        for hf, gg in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"), ("o_proj", "attn_output")):
            bf16(f"blk.{i}.{gg}.weight", raw(t[p + f"self_attn.{hf}.weight"]))
            if p + f"self_attn.{hf}.bias" in t:  # F32, as the converter keeps 1-D tensors
                f32(f"blk.{i}.{gg}.bias", raw(t[p + f"self_attn.{hf}.bias"]))
        if p + "self_attn.q_norm.weight" in t:
            f32(f"blk.{i}.attn_q_norm.weight", raw(t[p + "self_attn.q_norm.weight"]))
            f32(f"blk.{i}.attn_k_norm.weight", raw(t[p + "self_attn.k_norm.weight"]))

    def layer_norms(i: int, p: str, post: str = "ffn_norm") -> None:  # the two RMSNorms around attention
        f32(f"blk.{i}.attn_norm.weight", raw(t[p + "input_layernorm.weight"]))
        f32(f"blk.{i}.{post}.weight", raw(t[p + "post_attention_layernorm.weight"]))

    def gqa_heads(head_dim: int, partial_rotary: float | None = None) -> None:  # the attention's keys
        w.add_head_count_kv(cfg["num_key_value_heads"])
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        if partial_rotary is not None:  # the rotary embedding on the first values of each head
            w.add_rope_dimension_count(int(head_dim * partial_rotary))

    def sigmoid_routing(E: int) -> None:  # DeepSeek-V3's routing keys, which GLM-4.5 shares
        w.add_leading_dense_block_count(cfg["first_k_dense_replace"])
        w.add_expert_count(E)
        w.add_expert_shared_count(cfg["n_shared_experts"])
        w.add_expert_weights_scale(float(cfg["routed_scaling_factor"]))
        w.add_expert_weights_norm(bool(cfg["norm_topk_prob"]))
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
        w.add_expert_group_count(cfg["n_group"])
        w.add_expert_group_used_count(cfg["topk_group"])

    def sigmoid_moe(i: int, p: str, E: int) -> None:  # a dense first layer, or routed experts + bias + shared
        if i < cfg["first_k_dense_replace"]:
            mlp(i, p, "mlp", "")
            return
        experts(i, p, E)
        w.add_tensor(f"blk.{i}.exp_probs_b.bias", np.ascontiguousarray(
            raw_f32(t[p + "mlp.gate.e_score_correction_bias"])))
        mlp(i, p, "mlp.shared_experts", "_shexp")

    bf16("token_embd.weight", raw(t["model.embed_tokens.weight"]))
    f32("output_norm.weight", raw(t["model.norm.weight"]))
    if "lm_head.weight" in t:  # a tied LM head is the embedding table: llama.cpp reads token_embd then
        bf16("output.weight", raw(t["lm_head.weight"]))
    if arch in ("qwen3moe", "qwen2moe"):
        E = cfg.get("num_experts") or cfg["num_local_experts"]  # transformers 5 writes the latter
        gqa_heads(cfg.get("head_dim") or H // cfg["num_attention_heads"])
        w.add_expert_count(E)
        if arch == "qwen2moe":
            w.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])
            w.add_expert_weights_norm(bool(cfg.get("norm_topk_prob", False)))
        for i in range(L):
            p = f"model.layers.{i}."
            layer_norms(i, p)
            gqa_attention(i, p)
            experts(i, p, E)
            if arch == "qwen2moe":  # the shared expert and its sigmoid gate (one logit per token)
                mlp(i, p, "mlp.shared_expert", "_shexp")
                f32(f"blk.{i}.ffn_gate_inp_shexp.weight", raw(t[p + "mlp.shared_expert_gate.weight"]))
    elif arch == "glm4moe":
        E = cfg["n_routed_experts"]
        gqa_heads(cfg["head_dim"], (cfg.get("rope_parameters") or {}).get("partial_rotary_factor", 0.5))
        sigmoid_routing(E)
        # The MTP layers (num_nextn_predict_layers) are not converted: transformers' model does not run them.
        for i in range(L):
            p = f"model.layers.{i}."
            layer_norms(i, p, "post_attention_norm")
            gqa_attention(i, p)
            sigmoid_moe(i, p, E)
    elif arch == "minimax-m2":
        E = cfg["num_local_experts"]
        gqa_heads(cfg["head_dim"], (cfg.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0))
        w.add_expert_count(E)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
        for i in range(L):
            p = f"model.layers.{i}."
            layer_norms(i, p)
            gqa_attention(i, p)  # its q/k norms span all heads: [heads * head_dim]
            m = p + "block_sparse_moe."
            f32(f"blk.{i}.ffn_gate_inp.weight", raw(t[m + "gate.weight"]))
            for proj, gg in (("w1", "ffn_gate_exps"), ("w3", "ffn_up_exps"), ("w2", "ffn_down_exps")):
                bf16(f"blk.{i}.{gg}.weight", np.stack([raw(t[m + f"experts.{e}.{proj}.weight"]) for e in range(E)]))
            w.add_tensor(f"blk.{i}.exp_probs_b.bias", np.ascontiguousarray(raw_f32(t[m + "e_score_correction_bias"])))
    else:
        # MLA as llama.cpp runs it (absorbed, one shared latent "head"): kv_b split into k_b (transposed) and v_b.
        E, rank, rope = cfg["n_routed_experts"], cfg["kv_lora_rank"], cfg["qk_rope_head_dim"]
        nope, v_dim, heads = cfg["qk_nope_head_dim"], cfg["v_head_dim"], cfg["num_attention_heads"]
        w.add_head_count_kv(1)
        w.add_q_lora_rank(cfg["q_lora_rank"])
        w.add_kv_lora_rank(rank)
        w.add_key_length(rank + rope)
        w.add_value_length(rank)
        w.add_key_length_mla(nope + rope)
        w.add_value_length_mla(v_dim)
        w.add_rope_dimension_count(rope)
        sigmoid_routing(E)
        for i in range(L):
            p = f"model.layers.{i}."
            layer_norms(i, p)
            a = p + "self_attn."
            bf16(f"blk.{i}.attn_q_a.weight", raw(t[a + "q_a_proj.weight"]))
            f32(f"blk.{i}.attn_q_a_norm.weight", raw(t[a + "q_a_layernorm.weight"]))
            bf16(f"blk.{i}.attn_q_b.weight", raw(t[a + "q_b_proj.weight"]))
            bf16(f"blk.{i}.attn_kv_a_mqa.weight", raw(t[a + "kv_a_proj_with_mqa.weight"]))
            f32(f"blk.{i}.attn_kv_a_norm.weight", raw(t[a + "kv_a_layernorm.weight"]))
            kv_b = raw(t[a + "kv_b_proj.weight"]).reshape(heads, nope + v_dim, rank)
            bf16(f"blk.{i}.attn_k_b.weight", kv_b[:, :nope, :].transpose(0, 2, 1))
            bf16(f"blk.{i}.attn_v_b.weight", kv_b[:, nope:, :])
            bf16(f"blk.{i}.attn_output.weight", raw(t[a + "o_proj.weight"]))
            sigmoid_moe(i, p, E)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def quantize(src: Path, dst: Path, gguf_type: str, threads: int) -> None:
    import llama_cpp

    ftype = {"Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
             "Q4_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, "Q3_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q3_K_M,
             "Q2_K": llama_cpp.LLAMA_FTYPE_MOSTLY_Q2_K}[gguf_type]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_cpp_bench.py: llama_model_quantize to {gguf_type} failed ({rc})")


def measure(path: Path, prompt: list[int], new_tokens: int, threads: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of one run: the prompt in one batch, then greedy single-token steps."""
    from llama_cpp import Llama

    llm = measure.cache.get(path)
    if llm is None:
        measure.cache.clear()
        # n_batch sizes llama-cpp-python's score rows (one per position, so the whole context); n_ubatch is
        # the batch llama.cpp computes at once: the whole prompt.
        n_ctx = len(prompt) + new_tokens + 16
        llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=len(prompt), n_threads=threads, n_threads_batch=threads, logits_all=False,
                    verbose=False)
        measure.cache[path] = llm
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t2 = time.perf_counter()
    for _ in range(new_tokens):
        llm.eval([tok])
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t3 = time.perf_counter()
    return len(prompt) / (t1 - t0), new_tokens / (t3 - t2)


measure.cache = {}


def logits(path: Path, prompt: list[int], threads: int) -> np.ndarray:
    """llama.cpp's logits [len(prompt), vocab] for the prompt evaluated in one batch (float32)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=len(prompt) + 16, n_batch=len(prompt), n_ubatch=len(prompt),
                n_threads=threads, n_threads_batch=threads, logits_all=True, verbose=False)
    llm.eval(prompt)
    out = np.array(llm.scores[:len(prompt)], dtype=np.float32)
    del llm
    return out


def main() -> int:
    p = argparse.ArgumentParser(prog="ci/llama_cpp_bench.sh")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--types", default=",".join(TYPES),
                   help=f"comma-separated GGUF types of {', '.join(KNOWN_TYPES)} (default {','.join(TYPES)})")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=64, help="decode steps timed (the moetier bench: 65 new "
                                                              "tokens, timed from the first: 64 steps)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="prefill 128, decode 16, one repeat")
    p.add_argument("--workdir", type=Path, help="where the GGUF files go (default: CHECKPOINT/gguf)")
    p.add_argument("--logits", type=int, metavar="N",
                   help="instead of timing: write llama.cpp's logits over an N-token random prompt per type to OUT "
                        "(.npz; ci/llama_cpp_compare.py compares moetier's with them)")
    args = p.parse_args()
    if args.quick:
        args.prompt_tokens, args.new_tokens, args.repeats = 128, 16, 1
    types = [x.strip() for x in args.types.split(",") if x.strip()]
    bad = [x for x in types if x not in KNOWN_TYPES]
    if bad:
        p.error(f"unknown GGUF types {bad}; known: {', '.join(KNOWN_TYPES)}")
    threads = int(os.environ.get("THREADS", "2"))
    import llama_cpp

    work = args.workdir or args.checkpoint / "gguf"
    work.mkdir(parents=True, exist_ok=True)
    bf16 = work / "model-BF16.gguf"
    if not bf16.exists():
        print(f"converting {args.checkpoint} to {bf16}", file=sys.stderr)
        convert_bf16(args.checkpoint, bf16)
    cfg = json.loads((args.checkpoint / "config.json").read_text())
    prompt = np.random.default_rng(0).integers(0, cfg["vocab_size"], args.logits or args.prompt_tokens).tolist()
    records, saved = [], {"prompt": np.array(prompt, dtype=np.int64)}
    for t in types:
        path = bf16 if t == "BF16" else work / f"model-{t}.gguf"
        if not path.exists():
            print(f"quantizing to {t}", file=sys.stderr)
            quantize(bf16, path, t, threads)
        if args.logits:
            print(f"{t}: logits over {len(prompt)} tokens", file=sys.stderr)
            saved[t] = logits(path, prompt, threads)
            continue
        runs = []
        for i in range(args.repeats + 1):
            print(f"{t}: {'warm-up' if i == 0 else f'repeat {i}/{args.repeats}'}", file=sys.stderr)
            r = measure(path, prompt, args.new_tokens, threads)
            if i:
                runs.append(r)
        pre, dec = [r[0] for r in runs], [r[1] for r in runs]
        records.append({"gguf_type": t, "prefill_tok_s": statistics.median(pre), "decode_tok_s": statistics.median(dec),
                        "prefill_runs": pre, "decode_runs": dec, "file_bytes": path.stat().st_size,
                        "threads": threads, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens})
        print(f"{t}: prefill {records[-1]['prefill_tok_s']:.1f} tok/s, decode {records[-1]['decode_tok_s']:.1f} tok/s",
              file=sys.stderr)
    if args.logits:
        with open(args.out, "wb") as f:  # np.savez adds ".npz" to a name without it: keep the one asked for
            np.savez(f, **saved)
        return 0
    args.out.write_text(json.dumps({
        "schema": "moetier.bench.llama_cpp/1", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "llama_cpp_python": llama_cpp.__version__, "python": platform.python_version(),
        "checkpoint": str(args.checkpoint), "records": records}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
