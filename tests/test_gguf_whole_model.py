"""Whole models from GGUF files: `moetier.load(FILE.gguf)` and `moetier run FILE.gguf`.

The files are what llama.cpp's converter writes for a checkpoint (ci/llama_cpp_bench.py's conversion, in
`qwen3moe` and `deepseek2` names: DeepSeek's kv_b split into k_b / v_b as llama.cpp's absorbed MLA reads it),
from the synthetic checkpoints `moetier bench model` writes; the same weights as safetensors are the
reference. In fp32 and with BF16 tensors in the file, the two loads hold the same numbers, so the logits must
be equal to the last bit: a tensor mapped to the wrong name, transposed, or a kv_b put back wrong moves them
by order 1. A Q8_0 file (experts quantized by moetier's q8_0 quantizer, which writes llama.cpp's bytes) is
checked against the safetensors model with its experts in q8_0: equal as well."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_helpers import assert_usage_error, moetier

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

import moetier as mt  # noqa: E402
from moetier.bench import model as mb  # noqa: E402
from moetier.integrations.transformers.generation import generate  # noqa: E402
from moetier.errors import LayoutError, SettingError  # noqa: E402


def converter():
    spec = importlib.util.spec_from_file_location("llama_cpp_bench", Path(__file__).parents[1] / "ci" / "llama_cpp_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from moetier.plugins import load_registry

    out = {}
    conv = converter()
    for dims in ("tiny", "tiny-deepseek"):
        folder = tmp_path_factory.mktemp(dims)
        mb.write_model(folder, mb.DIMS[dims], registry=load_registry(), seed=5)
        conv.convert_bf16(folder, folder / "model-BF16.gguf")
        out[dims] = folder
    return out


def logits(model, ids):
    with torch.inference_mode():
        out = model(ids).logits[0].float()
    model.moetier_experts.close()
    return out


@pytest.mark.parametrize("dims", ["tiny", "tiny-deepseek"])
def test_a_bf16_gguf_is_the_same_model_as_its_safetensors(models, dims):
    folder = models[dims]
    ids = torch.randint(0, mb.DIMS[dims].vocab, (1, 12), generator=torch.Generator().manual_seed(1))
    kw = dict(backend="cpu.torch", dtype=torch.float32, device="cpu", progress=False)
    want = logits(mt.load(folder, fmt="bf16", **kw), ids)
    model = mt.load(folder / "model-BF16.gguf", **kw)
    assert {s.prepared.fmt.name for layer in model.moetier_experts.values() for s in layer.shards} == {"bf16"}
    got = logits(model, ids)
    assert torch.equal(got, want), (got - want).abs().max()


@pytest.mark.parametrize("family,version", [("qwen", "Qwen1.5-MoE-A2.7B"), ("glm", "GLM-4.5-Air"), ("glm", "GLM-4.7"),
                                            ("minimax", "MiniMax-M2")])
def test_zoo_checkpoints_as_gguf_are_the_same_models(tmp_path, family, version):
    """qwen2moe (Qwen1.5-MoE, Qwen2-57B: q/k/v biases, the shared expert and its sigmoid gate, the head size
    from the heads when the file has no key length) and glm4moe (GLM-4.5..4.7: partial rotary embedding,
    dense first layers, sigmoid routing with the selection bias, shared experts, `post_attention_norm`) and
    minimax-m2 (q/k norms over all heads, `block_sparse_moe` w1/w3/w2 experts, the selection bias; bf16,
    as llama.cpp's converter writes the FP8 release after dequantizing it).
    The zoo's tiny checkpoints in their real on-disk layouts, converted to BF16 GGUFs as llama.cpp names
    them (llama.cpp itself reads these files within the bf16 bound: docs/benchmarks.md): the same fp32
    logits, bit for bit, on the reference backend and on the one this machine selects."""
    from moetier.plugins import load_registry

    folder = tmp_path / version
    load_registry().family(family).tiny(version, str(folder), quant=None, seed=1)
    converter().convert_bf16(folder, folder / "model-BF16.gguf")
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(2))
    for backend in ("cpu.torch", None):
        kw = dict(backend=backend, dtype=torch.float32, device="cpu", threads=1, progress=False)
        want = logits(mt.load(folder, **kw), ids)
        model = mt.load(folder / "model-BF16.gguf", **kw)
        assert type(model).__name__ == {"qwen": "Qwen2MoeForCausalLM", "glm": "Glm4MoeForCausalLM",
                                        "minimax": "MiniMaxM2ForCausalLM"}[family]
        got = logits(model, ids)
        assert torch.equal(got, want), (backend, (got - want).abs().max())
    # Decode steps: the GGUF model's layers are fused where the safetensors twin's are, and generate the same
    # tokens (fp32, the same weights, the same kernels).
    twin = mt.load(folder, **kw)
    assert model.moetier_fused_decode == twin.moetier_fused_decode
    if model.moetier_attention is not None and model.moetier_dense.backend == model.moetier_attention:
        assert model.moetier_fused_decode  # every layer of these families fuses where the kernels take both
    twin.generation_config.min_new_tokens = model.generation_config.min_new_tokens = 8
    tokens = [generate(m, ids, max_new_tokens=8, pad_token_id=0)[0] for m in (model, twin)]
    assert torch.equal(tokens[0], tokens[1])


def test_layers_keep_the_format_the_file_stores_them_in(models, tmp_path):
    """A GGUF whose MoE layers store their experts in Q8_0 loads them in q8_0 with no conversion, and computes
    what the safetensors model computes with its experts converted to q8_0 (the same bytes)."""
    folder = models["tiny"]
    path = tmp_path / "q8.gguf"
    requantize_experts(folder / "model-BF16.gguf", path, "q8_0")
    ids = torch.randint(0, mb.DIMS["tiny"].vocab, (1, 9), generator=torch.Generator().manual_seed(2))
    kw = dict(backend="cpu.torch", dtype=torch.float32, device="cpu", progress=False)
    model = mt.load(path, **kw)
    assert {s.prepared.fmt.name for layer in model.moetier_experts.values() for s in layer.shards} == {"q8_0"}
    got = logits(model, ids)
    want = logits(mt.load(folder, fmt="q8_0", **kw), ids)
    assert torch.equal(got, want), (got - want).abs().max()


def requantize_experts(src: Path, dst: Path, fmt: str) -> None:
    """A copy of a GGUF file with its routed experts in `fmt` (moetier's quantizer: llama.cpp's bytes)."""
    from moetier.formats import quantize

    reader = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(str(dst), str(reader.get_field("general.architecture").contents()))
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        writer.add_key_value(field.name, field.contents(), field.types[0],
                             field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if "_exps." in t.name:
            w = torch.from_numpy(np.array(t.data).view(np.uint16).astype(np.int32) << 16).view(torch.float32)
            w = w.reshape(shape)
            q = np.stack([quantize(w[e], fmt).data.numpy() for e in range(shape[0])])
            writer.add_tensor(t.name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_refusals_name_the_problem(models, tmp_path):
    path = models["tiny"] / "model-BF16.gguf"
    with pytest.raises(SettingError, match="memory budgets place safetensors"):
        mt.load(path, cpu_mem=1 << 30, progress=False)
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(path.read_bytes()[: 4096])
    with pytest.raises(mt.MoetierError, match="cut.gguf"):
        mt.load(truncated, progress=False)


def test_plan_says_a_gguf_file_runs_on_one_cpu_backend(models):
    path = models["tiny"] / "model-BF16.gguf"
    assert_usage_error(moetier("plan", path), "is a GGUF file", f"moetier run {path}")


def test_moetier_run_on_a_gguf_file_writes_what_the_checkpoint_writes(tmp_path):
    """The built-in default model converted to GGUF (tied embeddings: no output tensor) and run through the
    real command with the checkpoint's tokenizer: the same greedy text as the checkpoint itself."""
    from moetier.cli.options import named_model

    folder = Path(named_model("default"))
    path = tmp_path / "default.gguf"
    converter().convert_bf16(folder, path)
    args = ("--prompt", "def fibonacci(n):", "--max-new-tokens", "12", "--dtype", "fp32", "--backend", "cpu.torch")
    want = moetier("run", "default", *args)
    got = moetier("run", path, "--tokenizer", folder, *args)
    assert want.returncode == 0 and got.returncode == 0, (want.stderr[-1500:], got.stderr[-1500:])
    assert "Traceback" not in got.stderr
    assert got.stdout == want.stdout and len(got.stdout.strip()) > 0, (got.stdout, want.stdout)
    # Without --tokenizer the synthetic vocabulary the converter wrote is all there is: transformers rebuilds it
    # or says why not, never a traceback.
    r = moetier("run", path, *args)
    assert "Traceback" not in r.stderr, r.stderr[-2000:]


def test_deepseek_yarn_keys_map_back_to_the_release_config(tmp_path):
    """DeepSeek-V3's released rope scaling (yarn, factor 40 over 4096 positions, mscale = mscale_all_dim = 1)
    written the way llama.cpp's converter writes it (rope.scaling.yarn_log_multiplier = 0.1 * mscale_all_dim)
    comes back as transformers' rope parameters of the release; an unknown scaling type is refused."""
    from moetier.checkpoint.gguf import GGUFFile

    release = {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "mscale": 1.0,
               "mscale_all_dim": 1.0, "beta_fast": 32.0, "beta_slow": 1.0, "rope_theta": 10000.0}

    def write(path, scaling_type):
        w = gguf.GGUFWriter(str(path), "deepseek2")
        for key, value in (("block_count", 2), ("embedding_length", 64), ("expert_count", 4),
                           ("expert_used_count", 2), ("expert_feed_forward_length", 32), ("context_length", 163840),
                           ("leading_dense_block_count", 1), ("expert_shared_count", 1)):
            w.add_uint32(f"deepseek2.{key}", value)
        w.add_uint32("deepseek2.expert_gating_func", int(gguf.ExpertGatingFuncType.SIGMOID))
        w.add_head_count(4)
        w.add_head_count_kv(1)
        w.add_layer_norm_rms_eps(1e-6)
        w.add_q_lora_rank(32)
        w.add_kv_lora_rank(16)
        w.add_key_length(16 + 8)
        w.add_value_length(16)
        w.add_key_length_mla(24 + 8)
        w.add_value_length_mla(24)
        w.add_rope_dimension_count(8)
        w.add_rope_freq_base(10000.0)
        w.add_rope_scaling_type(scaling_type)
        w.add_rope_scaling_factor(40.0)
        w.add_rope_scaling_orig_ctx_len(4096)
        w.add_rope_scaling_yarn_log_mul(0.1 * release["mscale_all_dim"])
        w.add_tensor("token_embd.weight", np.zeros((100, 64), np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path

    with GGUFFile(write(tmp_path / "yarn.gguf", gguf.RopeScalingType.YARN)) as gf:
        cfg = gf.model_config()
    assert cfg["rope_parameters"] == release
    assert (cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"], cfg["kv_lora_rank"],
            cfg["q_lora_rank"], cfg["vocab_size"], cfg["tie_word_embeddings"]) == (24, 8, 24, 16, 32, 100, True)
    with GGUFFile(write(tmp_path / "longrope.gguf", gguf.RopeScalingType.LONGROPE)) as gf:
        with pytest.raises(LayoutError, match="rope.scaling.type = 'longrope' is not mapped"):
            gf.model_config()
