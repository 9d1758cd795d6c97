"""`moetier bench model` on the harness-testing dimensions (`--dims tiny`: hidden 128, 2 layers, 16 experts,
vocab 512): the command runs, prints every column, checks moetier's experts against transformers' on the
same inputs and weights before it reports a speed, counts bytes per token right, and refuses bad options.
Speeds are not tested (benchmarks measure them; docs/benchmarks.md records them)."""
from __future__ import annotations

import json
import math
from dataclasses import replace

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

