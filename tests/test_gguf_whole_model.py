"""Whole models from GGUF files: `moetier.load(FILE.gguf)` and `moetier run FILE.gguf`.

The files are what llama.cpp's converter writes for a checkpoint (ci/llama_cpp_bench.py's conversion, in
`qwen3moe` and `deepseek2` names: DeepSeek's kv_b split into k_b / v_b as llama.cpp's absorbed MLA reads it),
from the synthetic checkpoints `moetier bench model` writes; the same weights as safetensors are the
reference. In fp32 and with BF16 tensors in the file, the two loads hold the same numbers, so the logits must
be equal to the last bit: a tensor mapped to the wrong name, transposed, or a kv_b put back wrong moves them
by order 1. A Q8_0 file (experts quantized by moetier's q8_0 quantizer, which writes llama.cpp's bytes) is
checked against the safetensors model with its experts in q8_0: equal as well."""
from __future__ import annotations

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
from zoo.gguf_files import llama_cpp_converter  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from moetier.plugins import load_registry

    out = {}
    conv = llama_cpp_converter()
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
    llama_cpp_converter().convert_bf16(folder, folder / "model-BF16.gguf")
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


@pytest.mark.parametrize("fmt,backend", [("q8_0", "cpu.torch"), ("q5_0", "cpu.torch"), ("iq4_nl", "cpu.torch"),
                                         ("iq4_nl", None)])
def test_layers_keep_the_format_the_file_stores_them_in(models, tmp_path, fmt, backend):
    """A GGUF whose MoE layers store their experts in Q8_0 (Q5_0, IQ4_NL) loads them in that type with no
    conversion, and computes what the safetensors model computes with its experts converted to it (the same
    bytes), on the reference backend and on the one this machine selects."""
    folder = models["tiny"]
    path = tmp_path / f"{fmt}.gguf"
    requantize_experts(folder / "model-BF16.gguf", path, fmt)
    ids = torch.randint(0, mb.DIMS["tiny"].vocab, (1, 9), generator=torch.Generator().manual_seed(2))
    kw = dict(backend=backend, dtype=torch.float32, device="cpu", progress=False, threads=1)
    model = mt.load(path, **kw)
    assert {s.prepared.fmt.name for layer in model.moetier_experts.values() for s in layer.shards} == {fmt}
    got = logits(model, ids)
    want = logits(mt.load(folder, fmt=fmt, **kw), ids)
    assert torch.equal(got, want), (got - want).abs().max()


def requantize_experts(src: Path, dst: Path, fmt, dense=None) -> None:
    """A copy of a GGUF file with its routed experts in `fmt` (moetier's quantizer: llama.cpp's bytes), or in
    fmt(tensor name) per tensor, as llama.cpp's mixes (Q4_K_M) choose a type per tensor; dense(tensor name)
    gives the other matrices' types (None: as they are)."""
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
            f = fmt(t.name) if callable(fmt) else fmt
            q = np.stack([quantize(w[e], f).data.numpy() for e in range(shape[0])])
            writer.add_tensor(t.name, q, raw_dtype=gguf.GGMLQuantizationType[f.upper()])
        elif dense is not None and len(shape) >= 2 and dense(t.name) is not None:
            w = torch.from_numpy(np.array(t.data).view(np.uint16).astype(np.int32) << 16).view(torch.float32)
            f = dense(t.name)
            rows = quantize(w.reshape(-1, shape[-1]), f).data.numpy()  # DeepSeek's k_b / v_b: [heads, rows, in]
            writer.add_tensor(t.name, rows.reshape(*shape[:-1], -1), raw_dtype=gguf.GGMLQuantizationType[f.upper()])
        else:
            writer.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _dense_types(name: str):
    """Attention in Q8_0, the LM head in Q4_0 (a mix as llama.cpp's types write), the embedding as it is."""
    if name.startswith("blk.") and ".attn_" in name:
        return "q8_0"
    return "q4_0" if name == "output.weight" else None


def test_dense_matrices_run_in_the_types_the_file_stores(models, tmp_path):
    """From a GGUF file the dense matrices go to the kernels in the file's own types (no dequantize and
    requantize): attention projections in q8_0, the LM head in q4_0. Over 4 tokens (rows of 128 values:
    the kernels' exact fp32 decode path) the logits are transformers' on the file's dequantized weights
    to fp32 rounding (1e-5 of their scale; a misread block moves them by order 1). A dense format asked
    for is honoured instead."""
    from moetier.integrations.transformers.dense import MoetierLinear

    folder = models["tiny"]
    path = tmp_path / "q8-dense.gguf"
    requantize_experts(folder / "model-BF16.gguf", path, "q8_0", dense=_dense_types)
    ids = torch.randint(0, mb.DIMS["tiny"].vocab, (1, 4), generator=torch.Generator().manual_seed(4))
    kw = dict(dtype=torch.float32, device="cpu", progress=False, threads=1)
    model = mt.load(path, **kw)
    backend = next(iter(model.moetier_experts.values())).shards[0].backend
    if not {"q8_0", "q4_0"} <= set(backend.dense_formats):
        model.moetier_experts.close()
        pytest.skip(f"{backend.name} computes no GGUF dense matrices")
    linears = {n: m.packed.fmt.name for n, m in model.named_modules() if isinstance(m, MoetierLinear)}
    assert {f for n, f in linears.items() if ".self_attn." in n} == {"q8_0"} and linears["lm_head"] == "q4_0"
    assert model.moetier_dense.fmt == "q4_0+q8_0"
    got = logits(model, ids)
    want = logits(mt.load(path, dense_format="transformers", **kw), ids)
    err = float((got - want).abs().max() / want.abs().max())
    assert err <= 1e-5, err
    asked = mt.load(path, dense_format="bf16", **kw)
    assert {m.packed.fmt.name for m in asked.modules() if isinstance(m, MoetierLinear)} == {"bf16"}
    asked.moetier_experts.close()


@pytest.mark.parametrize("k_b,v_b", [("q8_0", "q8_0"), ("q5_0", "q5_1")])
def test_mla_k_b_and_v_b_run_in_the_types_the_file_stores(models, tmp_path, k_b, v_b):
    """DeepSeek's k_b / v_b as llama.cpp stores them (per head, quantized; a Q4_K_M file's k_b is Q5_0, its
    rows too short for a K-quant) are the absorbed decode's W_kb^T / W_vb blocks as they are: packed in their
    types from the file, they generate the tokens of the same model whose blocks were packed in fp32 from
    the dequantized kv_b (the same values; rows of 32: the kernels' exact fp32 decode path), the logits
    within 1e-5 of their scale."""
    from moetier.integrations.transformers.mla import PACKED_ATTR, mla_modules

    path = tmp_path / f"kvb-{k_b}-{v_b}.gguf"
    requantize_experts(models["tiny-deepseek"] / "model-BF16.gguf", path, "q8_0",
                       dense=lambda name: k_b if ".attn_k_b." in name else v_b if ".attn_v_b." in name else None)
    ids = torch.randint(0, mb.DIMS["tiny-deepseek"].vocab, (1, 6), generator=torch.Generator().manual_seed(3))
    kw = dict(dtype=torch.float32, device="cpu", progress=False, threads=1)
    runs = {}
    for dense in (None, "fp32"):
        model = mt.load(path, dense_format=dense, **kw)
        try:
            halves = [getattr(m, PACKED_ATTR, None) for m in mla_modules(model).values()]
            if not all(halves):
                pytest.skip("this machine's backend packs no grouped dense matrices")
            assert {(k.fmt.name, v.fmt.name) for _, k, v in halves} == {(k_b, v_b) if dense is None else
                                                                        ("fp32", "fp32")}
            model.generation_config.cache_implementation = "static"
            out = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=0)
            runs[dense] = out.sequences[0], torch.stack(out.logits)[:, 0]
        finally:
            model.moetier_experts.close()
    (tokens, got), (want_tokens, want) = runs[None], runs["fp32"]
    assert torch.equal(tokens, want_tokens)
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-5


def test_refusals_name_the_problem(models, tmp_path):
    path = models["tiny"] / "model-BF16.gguf"
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(path.read_bytes()[: 4096])
    with pytest.raises(mt.MoetierError, match="cut.gguf"):
        mt.load(truncated, progress=False)


def _mixed(name: str) -> str:
    """Layer 1's gate and up in Q4_0, everything else in Q8_0: a per-layer, per-tensor mix as Q4_K_M has."""
    return "q4_0" if name.startswith("blk.1.ffn_") and "down" not in name else "q8_0"


@pytest.fixture(scope="module")
def mixed_file(models, tmp_path_factory):
    path = tmp_path_factory.mktemp("mixed") / "mixed.gguf"
    requantize_experts(models["tiny"] / "model-BF16.gguf", path, _mixed)
    return path


def test_moetier_plan_places_a_gguf_file_layer_by_layer_in_its_own_types(mixed_file, tmp_path):
    """`moetier plan FILE.gguf` with budgets: each MoE layer's experts sized and computed in the types the file
    stores them in (layer 1 mixed: q4_0 gate/up, q8_0 down), the rest left on disk; the plan file says so."""
    import json

    plan_path = tmp_path / "plan.json"
    d = mb.DIMS["tiny"]
    # the CPU budget holds the non-expert parts (3.0 MiB at this context) and about half of the experts' 688
    # KiB: the rest stay in the file
    r = plan_gguf(mixed_file, plan_path, "3.2MiB")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert "shipped q8_0 (layer 0), q4_0+q8_0 (layer 1)" in " ".join(r.stdout.split())
    plan = json.loads(plan_path.read_text())
    assert plan["model"]["shipped_formats"] == {"0": "q8_0", "1": "q4_0+q8_0"}
    formats = {(p["layer"], s["tier"]): s["format"] for p in plan["experts"] for s in p["shards"]}
    assert {f for (layer, _), f in formats.items() if layer == 1} == {"q4_0+q8_0"}
    assert {f for (layer, _), f in formats.items() if layer == 0} == {"q8_0"}
    on_disk = sum(len(s["experts"]) for p in plan["experts"] for s in p["shards"] if s["tier"] == "disk")
    assert 0 < on_disk < d.layers * d.experts
    # sizes as the file stores the experts: q8_0 34 bytes per 32 weights; q4_0 18
    from moetier.placement import PlacementPlan
    pp = PlacementPlan.load(plan_path)
    per_expert = {0: 3 * d.hidden * d.moe_intermediate * 34 // 32,
                  1: 2 * d.hidden * d.moe_intermediate * 18 // 32 + d.hidden * d.moe_intermediate * 34 // 32}
    for layer in (0, 1):
        n = {s.tier: len(s.experts) for s in pp.shards(layer)}
        assert pp.layer_bytes(layer) == {t: k * per_expert[layer] for t, k in n.items()}


def plan_gguf(path: Path, out: Path, cpu_mem: str, *more: str):
    """`moetier plan` of a GGUF file on the recorded 2-core AVX-512 machine, experts that do not fit left on disk."""
    return moetier("plan", path, "--cpu-mem", cpu_mem, "--disk", "--disk-cache", "64KiB", "--context", "64",
                   "--inventory", Path(__file__).parent / "inventories" / "zen4_avx512_2core.json",
                   "--backend", "cpu.torch", "--json", out, *more)


@pytest.mark.parametrize("how", ["plan file", "budgets"])
def test_a_gguf_file_runs_with_experts_left_on_disk(mixed_file, tmp_path, how):
    """Experts left in the GGUF file (by a plan file, or by budgets given to moetier.load) are read on demand in
    their own types and computed as the all-in-memory load computes them (fp32; the disk experts' outputs are
    summed apart from the memory ones, so the order of a few fp32 additions differs: within 1e-5 of the
    largest logit)."""
    import json

    ids = torch.randint(0, mb.DIMS["tiny"].vocab, (1, 10), generator=torch.Generator().manual_seed(3))
    kw = dict(dtype=torch.float32, device="cpu", threads=1, progress=False)
    want = logits(mt.load(mixed_file, backend="cpu.torch", **kw), ids)
    if how == "plan file":
        plan_path = tmp_path / "plan.json"
        assert plan_gguf(mixed_file, plan_path, "3.2MiB").returncode == 0
        model = mt.load(mixed_file, plan=plan_path, **kw)
    else:  # what the non-expert parts take at the model's own context, plus room for ~16 of the 32 experts
        probe = tmp_path / "probe.json"
        r = moetier("plan", mixed_file, "--cpu-mem", "1GiB", "--disk", "--disk-cache", "64KiB", "--json", probe)
        assert r.returncode == 0, r.stderr[-2000:]
        reserved = sum(sum(t["reserved"].values()) for t in json.loads(probe.read_text())["tiers"]
                       if t["name"] == "cpu:numa0")
        model = mt.load(mixed_file, cpu_mem=reserved + (344 << 10), disk=True, disk_cache=64 << 10,
                        backend="cpu.torch", **kw)
    experts = model.moetier_experts
    assert any(layer.disk is not None for layer in experts.values()), experts.bytes_per_tier()
    with torch.inference_mode():
        got = model(ids).logits[0].float()
    counters = experts.disk_counters
    assert counters.misses + counters.waits > 0 and counters.bytes_read > 0
    experts.close()
    assert (got - want).abs().max() <= 1e-5 * want.abs().max(), (got - want).abs().max()


def test_gguf_plans_keep_experts_where_they_can_be_computed(models, mixed_file, tmp_path):
    """The accelerator backends compute no GGML type: on a GPU machine (detected, or given --gpu-mem) the GPU
    holds the non-expert parts and no expert, and the plan says why. A layer whose gate and up are stored in
    different types has no format of its own: it is planned only converted (--cpu-format), and cannot be
    left on disk. A plan made for one quantization mix is refused for another file."""
    gpu = Path(__file__).parent / "inventories" / "xeon_amx_2socket_rtx4090.json"
    for budget in ((), ("--gpu-mem", "8GiB")):
        out = tmp_path / "gpu.json"
        r = moetier("plan", mixed_file, *budget, "--inventory", gpu, "--json", out)
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
        plan = mt.placement.PlacementPlan.load(out)
        assert plan.expert_count("cuda:0") == 0 and set(plan.part_tiers.values()) == {"cuda:0"}
        assert "cuda:0: no routed experts" in " ".join(r.stdout.split())
    q8 = tmp_path / "q8.gguf"
    requantize_experts(models["tiny"] / "model-BF16.gguf", q8, "q8_0")
    with pytest.raises(LayoutError, match="MoE layer 1's experts as q4_0\\+q8_0; the model given stores them as q8_0"):
        mt.load(q8, plan=out, progress=False)
    odd = tmp_path / "odd.gguf"
    requantize_experts(models["tiny"] / "model-BF16.gguf", odd,
                       lambda name: "q4_0" if name.startswith("blk.1.ffn_gate") else "q8_0")
    out = tmp_path / "p.json"
    assert_usage_error(plan_gguf(odd, out, "1GiB"), "MoE layer 1", "--cpu-format")
    r = plan_gguf(odd, out, "1GiB", "--cpu-format", "int8")
    assert r.returncode == 0, r.stderr[-2000:]
    assert {s.fmt for s in mt.placement.PlacementPlan.load(out).shards(1)} == {"int8"}
    assert_usage_error(plan_gguf(odd, out, "3.2MiB", "--cpu-format", "int8"), "MoE layer 1's experts cannot be left "
                       "on disk", "--cpu-mem")


def test_the_disk_tier_drops_what_it_read_from_the_page_cache(mixed_file, monkeypatch):
    """A GGUF file opened for the disk tier tells the OS to drop each expert's bytes once read, exactly those."""
    import os

    from moetier.checkpoint.gguf import GGUFExperts, GGUFFile

    dropped = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, n, advice: dropped.append((offset, n, advice)))
    with GGUFFile(mixed_file, drop_page_cache=True) as gf:
        layer = gf.layout().layer(1)
        GGUFExperts(gf, layer).expert(5)
        want = []
        for w in ("gate", "up", "down"):
            t = gf.tensor(f"blk.1.ffn_{w}_exps.weight")
            per_expert = int(t.n_bytes) // layer.experts.num_experts
            want.append((int(t.data_offset) + 5 * per_expert, per_expert, os.POSIX_FADV_DONTNEED))
    assert dropped == want


def test_moetier_run_on_a_gguf_file_writes_what_the_checkpoint_writes(tmp_path):
    """The built-in default model converted to GGUF (tied embeddings: no output tensor) and run through the
    real command with the checkpoint's tokenizer: the same greedy text as the checkpoint itself."""
    from moetier.cli.options import named_model

    folder = Path(named_model("default"))
    path = tmp_path / "default.gguf"
    llama_cpp_converter().convert_bf16(folder, path)
    args = ("--prompt", "def fibonacci(n):", "--max-new-tokens", "12", "--dtype", "fp32", "--backend", "cpu.torch")
    want = moetier("run", "default", *args)
    got = moetier("run", path, "--tokenizer", folder, *args)
    assert want.returncode == 0 and got.returncode == 0, (want.stderr[-1500:], got.stderr[-1500:])
    assert "Traceback" not in got.stderr
    assert got.stdout == want.stdout and len(got.stdout.strip()) > 0, (got.stdout, want.stdout)
    # Planned with half of its experts left in the file: the same text.
    probe, plan = tmp_path / "probe.json", tmp_path / "plan.json"
    assert plan_gguf(path, probe, "1GiB").returncode == 0
    all_in = mt.placement.PlacementPlan.load(probe)
    experts = sum(all_in.layer_bytes(i).get("cpu:numa0", 0) for i in all_in.moe_layers)
    r = plan_gguf(path, plan, str(all_in.tier("cpu:numa0").reserved_bytes + experts // 2))
    assert r.returncode == 0, r.stderr[-2000:]
    on_disk = mt.placement.PlacementPlan.load(plan).expert_count("disk")
    assert on_disk > 0
    got = moetier("run", path, "--tokenizer", folder, "--plan", plan, *args[:-2])
    assert got.returncode == 0 and "Traceback" not in got.stderr, got.stderr[-2000:]
    assert got.stdout == want.stdout, (got.stdout, want.stdout)
    # Routing statistics recorded through the file, and the cost strategy keeps the hot experts in DRAM.
    text, stats = tmp_path / "text.py", tmp_path / "stats.safetensors"
    text.write_text(Path(mt.__file__).read_text())
    r = moetier("stats", "record", path, "--tokenizer", folder, "--text", text, "--out", stats, "--max-tokens", "600",
                "--backend", "cpu.torch")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    r = plan_gguf(path, plan, str(all_in.tier("cpu:numa0").reserved_bytes + experts // 2), "--stats", stats)
    assert r.returncode == 0, r.stderr[-2000:]
    counts = mt.placement.ActivationStats.load(stats, all_in.moe_layers)
    cost = mt.placement.PlacementPlan.load(plan)
    assert cost.strategy == "cost" and cost.expert_count("disk") > 0
    for i in cost.moe_layers:
        row = counts.row(i).float()
        held = {s.tier: row[list(s.experts)].mean() for s in cost.shards(i)}
        assert held.get("disk", 0) <= held.get("cpu:numa0", row.max()), (i, held)
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
