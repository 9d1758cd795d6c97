"""`moetier bench model` on the harness-testing dimensions (`--dims tiny`: hidden 128, 2 layers, 16 experts,
vocab 512): the command runs, prints every column, checks moetier's experts against transformers' on the
same inputs and weights before it reports a speed, counts bytes per token right, and refuses bad options.
Speeds are not tested (benchmarks measure them; docs/benchmarks.md records them)."""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from cli_helpers import assert_usage_error, moetier

pytest.importorskip("transformers")

from moetier.bench import model as mb  # noqa: E402

TINY_ARGS = ("--dims", "tiny", "--prompt-tokens", "16", "--new-tokens", "4", "--repeats", "1")


@pytest.fixture(scope="module")
def registry():
    from moetier.plugins import load_registry

    return load_registry()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-model")
    # llama.cpp's figures as ci/llama_cpp_bench.sh writes them (inputs of the side-by-side arithmetic only).
    llama = {"records": [{"gguf_type": "BF16", "prefill_tok_s": 100.0, "decode_tok_s": 10.0, "file_bytes": 2_062_368},
                         {"gguf_type": "Q8_0", "prefill_tok_s": 50.0, "decode_tok_s": 20.0, "file_bytes": 1_100_000}]}
    (out / "llama.json").write_text(json.dumps(llama))
    r = moetier("bench", "model", *TINY_ARGS, "--format", "bf16,int8,int4_g64", "--model", out / "ckpt",
                "--json", out / "run.json", "--markdown", out / "run.md", "--llama-cpp", out / "llama.json",
                timeout=300)
    return r, out


def test_the_command_runs_and_prints_every_column(tiny_run):
    r, out = tiny_run
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    for col in mb.COLUMNS:
        assert col in r.stdout, col
    for impl in ("transformers eager", "transformers grouped_mm", "moetier"):
        assert impl in r.stdout
    md = (out / "run.md").read_text()
    assert md.count("\n") == 2 + 5 + 2  # header, rule, 2 transformers + 3 moetier + 2 llama.cpp rows


def test_every_implementation_agrees_with_transformers_before_it_is_timed(tiny_run):
    _, out = tiny_run
    doc = json.loads((out / "run.json").read_text())
    assert doc["schema"] == mb.SCHEMA
    rows = {(r["implementation"].split(" ")[0], r["format"]): r for r in doc["records"]}
    assert {f for (impl, f) in rows if impl == "moetier"} == {"bf16", "int8", "int4_g64"}
    # moetier's dense layers run on its kernels in the model's bf16 (--dense auto); transformers' are torch's.
    assert {r["dense"] for r in doc["records"] if r["implementation"].startswith("moetier")} == {"bf16"}
    # the Qwen3-MoE layers decode fused (dense layers and attention on the kernels), and the run says so
    moetier_rows = [r for r in doc["records"] if r["implementation"].startswith("moetier")]
    fused = [n for n in doc["notes"] if "decoder layers fused for decode" in n]
    assert len(fused) == len(moetier_rows), doc["notes"]
    assert {r["dense"] for r in doc["records"] if r["implementation"].startswith("transformers")} == {"torch"}
    assert {r["dense"] for r in doc["records"] if r["implementation"] == "llama.cpp"} == {"BF16", "Q8_0"}
    for r in doc["records"]:  # moetier against llama.cpp's matching type, in the same table
        if r["implementation"].startswith("moetier") and r["format"] in ("bf16", "int8"):
            peer = 10.0 if r["format"] == "bf16" else 20.0
            assert math.isclose(r["decode_x_llama_cpp"], r["decode_tok_s"] / peer)
    for (impl, fmt), r in rows.items():
        if impl == "llama.cpp":
            continue
        assert r["check_ok"] and r["check_relerr"] <= r["check_bound"] == mb.check_bound(fmt), r
        assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and len(r["decode_runs"]) == 1
        # The table's ratios are the rates' own quotients, in the same run.
        assert math.isclose(r["pct_byte_limit"], 100 * r["decode_tok_s"] / r["byte_limit_tok_s"])
        assert math.isclose(r["byte_limit_tok_s"], doc["read_gb_per_s"] * 1e9 / r["bytes_per_token"])
    # The reference itself is transformers eager: zero error against itself; the others are not bit-equal.
    assert doc["records"][0]["implementation"] == "transformers eager" and doc["records"][0]["check_relerr"] == 0.0
    assert rows[("moetier", "bf16")]["check_relerr"] > 0


def test_bytes_per_token(tiny_run, registry):
    """Dense bytes from the config by hand: q/k/v/o, the norms, the router, the LM head, one embedding row;
    experts: top-k per layer in each format's packed bytes."""
    _, out = tiny_run
    doc = json.loads((out / "run.json").read_text())
    d = mb.DIMS["tiny"]
    H, L, hd = d.hidden, d.layers, d.head_dim
    attn = H * d.heads * hd * 2 + H * d.kv_heads * hd * 2 + 2 * hd  # q, o; k, v; q_norm, k_norm
    per_layer = attn + 2 * H + d.experts * H  # two RMSNorms, the router
    dense = 2 * (L * per_layer + H + d.vocab * H + H)  # bf16; final norm, LM head, one embedding row
    from moetier.formats import get_format

    I = d.moe_intermediate
    for r in doc["records"]:
        if r["implementation"] == "llama.cpp":
            continue
        f = get_format(r["format"])
        e = 3 * H * I * 2 if r["format"] == "bf16" else 2 * f.nbytes(I, H) + f.nbytes(H, I)
        assert r["bytes_per_token"] == dense + L * d.top_k * e, (fmt, r["bytes_per_token"], dense, e)


@pytest.fixture(scope="module")
def gguf_run(tiny_run):
    """The tiny checkpoint as the BF16 GGUF llama.cpp's converter writes (ci/llama_cpp_bench.py, gguf package
    only), run by moetier as stored beside the bf16 row, with the same llama.cpp figures."""
    from zoo.gguf_files import llama_cpp_converter

    _, out = tiny_run
    gguf_file = out / "model-BF16.gguf"
    llama_cpp_converter().convert_bf16(out / "ckpt", gguf_file)
    r = moetier("bench", "model", *TINY_ARGS, "--format", "bf16,q8_0", "--no-transformers", "--model", out / "ckpt",
                "--gguf", gguf_file, "--llama-cpp", out / "llama.json", "--json", out / "gguf.json", timeout=300)
    return r, out, gguf_file


def test_a_gguf_file_runs_as_stored_beside_llama_cpp(gguf_run):
    r, out, gguf_file = gguf_run
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr and "gguf BF16" in r.stdout
    rows = {r_["format"]: r_ for r_ in json.loads((out / "gguf.json").read_text())["records"]
            if r_["implementation"].startswith("moetier")}
    g, b = rows["gguf BF16"], rows["bf16"]
    # a GGUF type as a format moetier converts the checkpoint to: checked like the others before it is timed
    assert rows["q8_0"]["check_ok"] and rows["q8_0"]["check_relerr"] <= rows["q8_0"]["check_bound"]
    assert rows["q8_0"]["decode_tok_s"] > 0
    assert g["dense"] == "as stored" and g["decode_tok_s"] > 0 and g["prefill_tok_s"] > 0
    # the file holds the checkpoint's bf16 weights: its logits are those of the checkpoint loaded in bf16
    assert abs(g["logits_relerr"] - b["logits_relerr"]) < 1e-3, (g["logits_relerr"], b["logits_relerr"])
    # against llama.cpp on the same type (its BF16 record: decode 10 tok/s)
    assert g["llama_cpp_type"] == "BF16" and g["decode_x_llama_cpp"] == pytest.approx(g["decode_tok_s"] / 10.0)
    # llama.cpp read that very file: its bytes per token are the file's count, not the size estimate
    llama = {r_["format"]: r_ for r_ in json.loads((out / "gguf.json").read_text())["records"]
             if r_["implementation"] == "llama.cpp"}
    assert llama["BF16"]["bytes_per_token"] == g["bytes_per_token"]
    # bytes per token from the file: the bf16 row's, with the converter's fp32 norms and routers (2 more bytes
    # a value)
    d = mb.DIMS["tiny"]
    fp32 = d.layers * (2 * d.hidden + 2 * d.head_dim + d.experts * d.hidden) + d.hidden
    assert g["bytes_per_token"] == b["bytes_per_token"] + 2 * fp32, (g["bytes_per_token"], b["bytes_per_token"])


def test_gguf_files_that_are_not_of_the_checkpoint_are_refused(tmp_path, tiny_run):
    _, out = tiny_run
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf file")
    assert_usage_error(moetier("bench", "model", *TINY_ARGS, "--model", out / "ckpt", "--gguf", bad, timeout=120),
                       "not a GGUF file")
    assert_usage_error(moetier("bench", "model", *TINY_ARGS, "--gguf", out / "model-BF16.gguf", timeout=120),
                       "--gguf needs --model")


@pytest.fixture(scope="module")
def deepseek_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-model-deepseek")
    r = moetier("bench", "model", "--dims", "tiny-deepseek", "--prompt-tokens", "16", "--new-tokens", "4", "--repeats",
                "1", "--format", "bf16,int8", "--model", out / "ckpt", "--json", out / "run.json", timeout=300)
    return r, out


def test_the_deepseek_v3_slice_runs_checked(deepseek_run):
    """DeepSeek-V3's layout (MLA, a dense first layer, shared experts, grouped sigmoid routing) through the same
    harness: written in the family's real layout, transformers' DeepseekV3 model as the reference."""
    r, out = deepseek_run
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    assert "1 dense, 2 MoE" in r.stdout and "MLA 4 heads" in r.stdout
    cfg = json.loads((out / "ckpt" / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v3" and cfg["first_k_dense_replace"] == 1 and cfg["n_shared_experts"] == 1
    doc = json.loads((out / "run.json").read_text())
    impls = {(r["implementation"].split(" ")[0], r["format"]) for r in doc["records"]}
    assert impls == {("transformers", "bf16"), ("moetier", "bf16"), ("moetier", "int8")}
    for rec in doc["records"]:
        assert rec["check_ok"] and rec["check_relerr"] <= rec["check_bound"], rec
        assert rec["decode_tok_s"] > 0 and rec["prefill_tok_s"] > 0
    assert doc["settings"]["dims"]["mla"]["kv_lora_rank"] == mb.DIMS["tiny-deepseek"].mla.kv_lora_rank


def test_deepseek_bytes_per_token(deepseek_run):
    """By hand from the dimensions: MLA's five matrices and two norms per layer, the dense layer's MLP, per MoE
    layer the router (fp32) and the shared expert, the LM head and one embedding row, bf16; the routed
    experts top-k per MoE layer in each format."""
    _, out = deepseek_run
    doc = json.loads((out / "run.json").read_text())
    d = mb.DIMS["tiny-deepseek"]
    m, H, I = d.mla, d.hidden, d.moe_intermediate
    attn = (m.q_lora_rank * H + m.q_lora_rank + d.heads * (m.qk_nope_head_dim + m.qk_rope_head_dim) * m.q_lora_rank
            + (m.kv_lora_rank + m.qk_rope_head_dim) * H + m.kv_lora_rank
            + d.heads * (m.qk_nope_head_dim + m.v_head_dim) * m.kv_lora_rank + H * d.heads * m.v_head_dim)
    moe_layers = d.layers - d.dense_layers
    dense = 2 * (d.layers * (attn + 2 * H) + d.dense_layers * 3 * H * d.dense_intermediate
                 + moe_layers * 3 * H * I * d.shared_experts + H + d.vocab * H + H)
    dense += 4 * moe_layers * d.experts * H  # transformers keeps DeepSeek's routers in fp32
    from moetier.formats import get_format

    for r in doc["records"]:
        f = get_format(r["format"])
        e = 3 * H * I * 2 if r["format"] == "bf16" else 2 * f.nbytes(I, H) + f.nbytes(H, I)
        assert r["bytes_per_token"] == dense + moe_layers * d.top_k * e, (r["format"], r["bytes_per_token"], dense, e)


def test_dims_that_cannot_route_are_refused():
    from moetier.errors import SettingError

    with pytest.raises(SettingError, match="no MoE layer"):
        replace(mb.DIMS["deepseek-v3"], layers=1)
    with pytest.raises(SettingError, match="cannot give top-8"):
        replace(mb.DIMS["deepseek-v3"], experts=8)


def test_the_check_catches_wrong_experts(tmp_path, registry):
    """A benchmark of a wrong model is worthless: give every layer another layer's experts and the check fails."""
    from moetier.integrations.transformers import load
    from moetier.integrations.transformers.experts import RUNTIME_ATTR
    from moetier.integrations.transformers.quantizer import experts_modules

    dims = mb.DIMS["tiny"]
    mb.write_model(tmp_path, dims, registry=registry, seed=3)
    torch.manual_seed(0)
    ids = torch.randint(0, dims.vocab, (1, 8))
    ref_model = mb._hf_load(tmp_path, "eager")
    ref = mb.reference(ref_model, ids, "bf16")
    model = load(tmp_path, backend="cpu.torch", fmt="bf16", dtype=torch.bfloat16, device="cpu", progress=False)
    assert mb.experts_error(model, ref) <= mb.check_bound("bf16")
    mods = experts_modules(model)
    a, b = (getattr(mods[i][1], RUNTIME_ATTR) for i in (0, 1))
    setattr(mods[0][1], RUNTIME_ATTR, b)
    setattr(mods[1][1], RUNTIME_ATTR, a)
    assert mb.experts_error(model, ref) > 10 * mb.check_bound("bf16")
    # A quantized format is checked against transformers on that format's own weights, not the bf16 ones.
    setattr(mods[0][1], RUNTIME_ATTR, a)
    setattr(mods[1][1], RUNTIME_ATTR, b)
    ref4 = mb.reference(ref_model, ids, "int4_g64")
    assert mb.experts_error(model, ref4) > mb.check_bound("bf16")  # bf16 experts against int4 weights
    model.moetier_experts.close()


@pytest.mark.parametrize("args,needle", [
    (("--format", "bf17"), "unknown format"),
    (("--threads", "0"), "--threads"),
    (("--new-tokens", "1"), "--new-tokens"),
    (("--dims", "huge"), "--dims"),
    (("--llama-cpp", "/nonexistent/llama.json"), "llama.cpp results"),
    (("--backend", "cpu.nope"), "cpu.nope"),
    (("--dense", "bogus"), "--dense"),
])
def test_bad_options_exit_2_with_one_line(args, needle, tmp_path):
    r = moetier("bench", "model", *TINY_ARGS, *args, "--model", tmp_path / "m", timeout=120)
    assert_usage_error(r, needle)


def test_quick_preset_and_dims(registry):
    assert mb.QUICK_FORMATS == ("bf16", "int4_g64")
    q = mb.DIMS["qwen3-30b-a3b"]
    # Qwen3-30B-A3B's published layer dimensions.
    assert (q.hidden, q.experts, q.top_k, q.moe_intermediate, q.heads, q.kv_heads, q.head_dim) == \
        (2048, 128, 8, 768, 32, 4, 128)
    assert replace(q, layers=2).layers == 2
    ds = mb.DIMS["deepseek-v3"]
    # DeepSeek-V3's published layer dimensions (fewer layers and experts: a slice).
    assert (ds.hidden, ds.top_k, ds.moe_intermediate, ds.heads, ds.shared_experts, ds.dense_intermediate,
            ds.n_group, ds.topk_group) == (7168, 8, 2048, 128, 1, 18432, 8, 4)
    assert (ds.mla.q_lora_rank, ds.mla.kv_lora_rank, ds.mla.qk_rope_head_dim, ds.mla.qk_nope_head_dim,
            ds.mla.v_head_dim) == (1536, 512, 64, 128, 128)



def test_the_llama_cpp_converter_writes_deepseek2_as_llama_cpp_reads_it(deepseek_run, tmp_path, registry):
    """ci/llama_cpp_bench.py's conversion of the DeepSeek-V3 slice (run without llama.cpp: only the gguf
    package): moetier's own GGUF reader finds the deepseek2 layout of the checkpoint in it, the experts and
    the shared expert are the checkpoint's bf16 bytes, and kv_b comes back from the k_b / v_b split."""
    import numpy as np
    from safetensors.torch import load_file

    from moetier.checkpoint.gguf import GGUFFile, GGUFExperts, read_shared
    from zoo.gguf_files import llama_cpp_converter

    _, out = deepseek_run
    path = tmp_path / "ds.gguf"
    llama_cpp_converter().convert_bf16(out / "ckpt", path)
    d = mb.DIMS["tiny-deepseek"]
    tensors = {}
    for f in sorted((out / "ckpt").glob("*.safetensors")):
        tensors.update(load_file(f))
    with GGUFFile(path) as gf:
        assert gf.arch == "deepseek2"
        layout = gf.layout(registry)
        assert [m.index for m in layout.moe_layers] == [1, 2] and layout.dense_layers == (0,)
        m = layout.moe_layers[0]
        assert (m.experts.num_experts, m.experts.top_k, m.experts.intermediate_size) == (d.experts, d.top_k,
                                                                                        d.moe_intermediate)
        assert m.router.scoring == "sigmoid" and (m.router.n_group, m.router.topk_group) == (d.n_group, d.topk_group)
        e = GGUFExperts(gf, m).expert(3)
        p = "model.layers.1.mlp."
        for proj in ("gate", "up", "down"):
            got = getattr(e, proj).data.view(torch.bfloat16).reshape(tensors[f"{p}experts.3.{proj}_proj.weight"].shape)
            assert torch.equal(got, tensors[f"{p}experts.3.{proj}_proj.weight"]), proj
        shared = read_shared(gf, m)
        assert torch.equal(shared.gate.to(torch.bfloat16), tensors[p + "shared_experts.gate_proj.weight"])
        mla = d.mla
        k_b = gf.read_float("blk.1.attn_k_b.weight")
        v_b = gf.read_float("blk.1.attn_v_b.weight")
        kv_b = torch.cat([k_b.reshape(d.heads, mla.kv_lora_rank, mla.qk_nope_head_dim).transpose(1, 2),
                          v_b.reshape(d.heads, mla.v_head_dim, mla.kv_lora_rank)], dim=1)
        want = tensors["model.layers.1.self_attn.kv_b_proj.weight"].float()
        assert torch.equal(kv_b.reshape(want.shape), want)
        assert np.isclose(gf.llm("expert_weights_scale"), 2.5)
