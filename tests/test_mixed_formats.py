"""Mixed expert formats: a layer's gate/up in one format and its down in another, as llama.cpp's Q4_K_M
files store some layers (ffn_gate_exps / ffn_up_exps Q4_K, ffn_down_exps Q6_K), computed as they are.

Bounds against the float64 oracle on the same dequantized weights (core/reference.py), as in
tests/test_native_block_formats.py:
- fp32-math paths (cpu.torch, cpu.numba, and every native build with int8_activations=False): tolerance("fp32") = 2e-5. The packed panels hold each GGUF value exactly (codes
  with an fp32 scale and min per sub-block), so only the fp32 summation order differs; a requantized
  weight, or a projection read in the other part's layout, is off by >= 1e-3.
- int8-activation paths (every native build by default: vpdpbusd on the VNNI builds, vpmaddubsw on the others): tolerance("q4_k+q6_k") = 4e-2, the larger of the
  parts' bounds (both the per-token int8 activation budget, which already counts the rounding of x into
  gate/up and of the intermediate into down; see core/conformance/tolerances.py); measured ~2e-2.
Decode: 1 token (<= 4 per expert: streaming decode kernels); mid: 5-16 per expert (whole-bundle dot
kernels); prefill: > 16 per expert (two panels x token blocks).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from moetier import ExpertLayerSpec  # noqa: E402
from moetier.checkpoint.gguf import GGUFExperts, GGUFFile  # noqa: E402
from moetier.conformance import run_suite  # noqa: E402
from moetier.conformance.tolerances import tolerance  # noqa: E402
from moetier.errors import FormatError  # noqa: E402
from moetier.experts import ExpertTensors  # noqa: E402
from moetier.formats import FORMATS, QuantizedTensor, computes, convert, dequantize, get_format, mixed_format, \
    quantize  # noqa: E402
from moetier.plugins import load_registry  # noqa: E402
from moetier.reference import ReferenceBackend, oracle  # noqa: E402
from moetier.runtime.gguf_model import gguf_block, layer_format, run_gguf, show_gguf  # noqa: E402

from cli_helpers import assert_usage_error, moetier  # noqa: E402
from test_gguf_files import reference_layer  # noqa: E402
from test_native_common import DOT_VARIANTS, RUNNABLE, make_backend, rel_err  # noqa: E402
from zoo.gguf_files import Model, write  # noqa: E402

MIXED = "q4_k+q6_k"
# Two MoE blocks as a Q4_K_M file has them: block 0 with ffn_down in Q6_K (llama.cpp's use_more_bits
# rule), block 1 all Q4_K. H and I are 256, the K-quants' block.
MODEL = Model("qwen3moe", "Qwen3-30B-A3B", 2, 256, 256, 8, 2, ("q4_k",) * 3, layer_types={0: ("q4_k", "q4_k", "q6_k")})
FORMAT_OF = {0: MIXED, 1: "q4_k"}
PATHS = {"decode": 1, "mid": 40, "prefill": 96}  # tokens; k = 2 over 6 held experts: 1, 13-14, 32 per expert


@pytest.fixture(scope="module")
def mixed_file(tmp_path_factory):
    return write(tmp_path_factory.mktemp("mixed") / "q4_k_m.gguf", MODEL, seed=3)


def fresh_seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()).item())


# ---- the format --------------------------------------------------------------------------------------

def test_mixed_format_names_its_parts_and_sizes():
    f = get_format(MIXED)
    assert (f.name, f.kind, f.gate_up, f.down, f.parts) == (MIXED, "mixed", FORMATS["q4_k"], FORMATS["q6_k"],
                                                            (FORMATS["q4_k"], FORMATS["q6_k"]))
    assert get_format(f) is f and get_format(MIXED) == f and mixed_format("q4_k", "q6_k") == f
    assert mixed_format("q4_k", "q4_k") is FORMATS["q4_k"]  # one format for all three is the plain one
    assert FORMATS["q4_k"].parts == (FORMATS["q4_k"],) and FORMATS["q4_k"].gate_up is FORMATS["q4_k"]
    # Qwen3-30B-A3B's expert: gate/up [768, 2048] in Q4_K (144 bytes per 256), down [2048, 768] in Q6_K (210)
    spec = ExpertLayerSpec(128, 8, 2048, 768)
    assert spec.expert_bytes(MIXED) == 2 * 768 * 8 * 144 + 2048 * 3 * 210
    assert spec.expert_bytes(MIXED) == (2 * spec.expert_bytes("q4_k") + spec.expert_bytes("q6_k")) // 3


@pytest.mark.parametrize("name", ["q4_k+", "+q6_k", "q4_k+q6_k+q8_0", "q4_k+int3", "q4_k++q6_k"])
def test_nonsense_mixed_names_are_refused_naming_the_rule(name):
    with pytest.raises(FormatError, match=r"GATEUP\+DOWN, two expert formats"):
        get_format(name)


def test_a_matrix_is_never_in_a_mixed_format():
    g = torch.Generator().manual_seed(fresh_seed())
    w = torch.randn(8, 256, generator=g)
    with pytest.raises(FormatError, match="quantized to one format"):
        quantize(w, MIXED)
    with pytest.raises(FormatError, match="converts to one format"):
        convert(quantize(w, "q4_k"), MIXED)
    with pytest.raises(FormatError, match="a matrix is in one format"):
        QuantizedTensor(get_format(MIXED), (8, 256), quantize(w, "q4_k").data)
    with pytest.raises(FormatError, match="single matrix is in one"):
        get_format(MIXED).nbytes(8, 256)


def test_expert_tensors_format_and_conversion_per_projection():
    g = torch.Generator().manual_seed(fresh_seed())
    gate, up, down = (torch.randn(256, 256, generator=g) for _ in range(3))  # K-quant rows: blocks of 256
    t = ExpertTensors(quantize(gate, "q4_k"), quantize(up, "q4_k"), quantize(down, "q6_k"))
    assert t.fmt == get_format(MIXED)
    assert t.to_format(MIXED) is t  # already in it: nothing converted
    # to another mixed format: each projection to its own part, from its own values
    c = t.to_format("q8_0+bf16")
    assert (c.gate.fmt.name, c.up.fmt.name, c.down.fmt.name) == ("q8_0", "q8_0", "bf16")
    assert torch.equal(c.down.dequantize(), dequantize(t.down).to(torch.bfloat16).float())
    plain = t.to_format("fp32")  # the exact dequantized values, one format
    assert plain.fmt.name == "fp32" and torch.equal(plain.down.data, dequantize(t.down))
    with pytest.raises(FormatError, match="gate is q4_k but up is q5_k"):
        ExpertTensors(quantize(gate, "q4_k"), quantize(up, "q5_k"), quantize(down, "q6_k")).fmt


def _accel():
    from moetier.backends.accel.backend import AccelBackend
    from moetier.backends.accel.build import detect_build
    from moetier.backends.accel.plan import plan_kernels

    return AccelBackend("cpu.accel", "cpu", plan_kernels("cpu", None, detect_build()))


def test_backends_that_declare_mixed_formats_compute_them_from_both_parts(monkeypatch):
    registry = load_registry(no_plugins=True)
    numba_spec, accel_spec = registry.backend("cpu.numba"), registry.backend("cpu.accel")
    assert numba_spec.computes(MIXED) and "q4_k" in numba_spec.formats and MIXED not in numba_spec.formats
    assert registry.backend("cpu.torch").computes(MIXED) and numba_spec.computes("q8_0+mxfp4")
    # cpu.accel computes a layer in one format: a mixed one is refused even where it has both parts
    assert accel_spec.computes("bf16") and not accel_spec.computes("bf16+int8")
    assert computes(("q4_k", "q6_k"), MIXED, mixed=True) and not computes(("q4_k",), MIXED, mixed=True)
    assert not computes(("q4_k", "q6_k"), MIXED, mixed=False)
    layer = ExpertLayerSpec(2, 1, 256, 256)
    with pytest.raises(FormatError, match=r"does not compute format bf16\+int8 \(it computes a layer in one format"):
        _accel().prepare(layer, {}, [0], "bf16+int8")
    if RUNNABLE:  # the native kernels compute mixed formats of what they declare
        native = make_backend(RUNNABLE[0], monkeypatch)
        assert native.computes(MIXED) and native.computes("q4_k+mxfp4")
        native.formats = tuple(f for f in native.formats if f != "mxfp4")  # as a build without mxfp4 declares
        with pytest.raises(FormatError, match=r"does not compute format q4_k\+mxfp4 \(it lacks mxfp4\)"):
            native.prepare(layer, {}, [0], "q4_k+mxfp4")


# ---- a Q4_K_M-style GGUF file --------------------------------------------------------------------------

def test_the_file_reads_as_one_format_per_layer(mixed_file):
    with GGUFFile(mixed_file.path) as gf:
        layout = gf.layout()
        for i, want in FORMAT_OF.items():
            src = GGUFExperts(gf, layout.layer(i))
            assert layer_format(src, ReferenceBackend(), None) == (want, False)
            t = src.expert(5)
            assert t.fmt.name == want
            assert np.array_equal(t.down.data.numpy(), mixed_file.layers[i]["down_bytes"][5])  # the file's bytes
    q = show_gguf(mixed_file.path)["quantization"]
    assert "q4_k/q4_k/q6_k (1 layers)" in q and "q4_k/q4_k/q4_k (1 layers)" in q


BACKEND_NAME = {"avx2": "cpu.avx2", "avx512": "cpu.avx512", "avx512_bf16": "cpu.avx512", "amx": "cpu.amx"}


def _has_numba() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def _backends():
    """(id, factory, bound) of every implementation this host runs on the mixed layer."""
    out = [("cpu.torch", lambda mp: ReferenceBackend(), tolerance("fp32"))]
    if _has_numba():
        from moetier.backends.cpu_numba import NumbaBackend
        out.append(("cpu.numba", lambda mp: NumbaBackend(num_threads=2), tolerance("fp32")))
    for v in RUNNABLE:
        out.append((f"{v}", lambda mp, v=v: make_backend(v, mp), tolerance(MIXED)))
        out.append((f"{v}-fp32", lambda mp, v=v: make_backend(v, mp, int8_activations=False), tolerance("fp32")))
    return out


BACKENDS = _backends()


@pytest.mark.parametrize("which", [b[0] for b in BACKENDS])
def test_whole_layers_of_the_file_against_ggufs_own_dequantizer(mixed_file, which, monkeypatch):
    _, make, bound = next(b for b in BACKENDS if b[0] == which)
    backend = make(monkeypatch)
    g = torch.Generator().manual_seed(fresh_seed())
    with GGUFFile(mixed_file.path) as gf:
        layout = gf.layout()
        for m in layout.moe_layers:
            block = gguf_block(gf, layout, m.index, backend)
            assert block.prepared.fmt.name == FORMAT_OF[m.index]
            hidden = torch.randn(9, MODEL.hidden, generator=g)
            want, _ = reference_layer(mixed_file.path, MODEL, m, hidden)  # gguf's reader and dequantizer only
            err = rel_err(block(hidden), want)
            assert err <= bound, f"{which} layer {m.index}: {err:.3g} > {bound}"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("which", [b[0] for b in BACKENDS if b[0] != "cpu.torch"])
def test_decode_mid_and_prefill_paths_on_the_mixed_layer(mixed_file, which, path, monkeypatch):
    _, make, bound = next(b for b in BACKENDS if b[0] == which)
    backend = make(monkeypatch)
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    T, k = PATHS[path], MODEL.top_k
    held = torch.tensor([0, 2, 3, 5, 6, 7])
    # Token t goes to held experts perm[t % n] and perm[(t + 1) % n]: each gets 2T/n tokens (+-1).
    perm = held[torch.randperm(len(held), generator=g)]
    ids = perm[(torch.arange(T).view(T, 1) + torch.arange(k).view(1, k)) % len(held)]
    counts = torch.bincount(ids.flatten(), minlength=MODEL.experts)[held]
    assert {"decode": counts.max() <= 4, "mid": 4 < counts.min() and counts.max() <= 16,
            "prefill": counts.min() > 16}[path], counts
    held = held.tolist()
    tw = torch.rand(T, k, generator=g)
    hidden = torch.randn(T, MODEL.hidden, generator=g)
    with GGUFFile(mixed_file.path) as gf:
        layer = gf.layout().layer(0)
        p = backend.prepare(layer.experts, GGUFExperts(gf, layer), held, MIXED)
        o = oracle()
        ref = o.forward(o.prepare(layer.experts, GGUFExperts(gf, layer), held, MIXED), hidden, ids, tw)
    assert p.fmt.name == MIXED and p.nbytes >= len(held) * layer.experts.expert_bytes(MIXED)
    err = rel_err(backend.forward(p, hidden, ids, tw), ref)
    assert err <= bound, f"{which} {path} seed {seed}: {err:.3g} > {bound}"


def test_conformance_suite_on_the_mixed_format():
    names = ["cpu.numba"] if _has_numba() else []
    native = [n for n in ("cpu.amx", "cpu.avx512", "cpu.avx2") if any(BACKEND_NAME.get(v) == n for v in RUNNABLE)]
    names += native[:1]
    if not names:
        pytest.skip("neither numba nor a native kernel variant runs here")
    report = run_suite(names, formats=[MIXED])
    failed = [f"{r.backend} {r.case}: {r.detail}" for r in report.results if r.status == "failed"]
    assert report.ok and not failed, failed[:5]
    for n in names:
        assert report.summary()[n][MIXED]["passed"] >= 50


def test_a_backend_without_the_files_mixed_format_is_refused(tmp_path):
    # gate/up F16 and down F32: cpu.accel computes both, but not a layer in two formats
    w = write(tmp_path / "f16_f32.gguf", Model("qwen3moe", "Qwen3-30B-A3B", 1, 256, 256, 4, 2, ("f16", "f16", "f32")))
    with GGUFFile(w.path) as gf:
        layout = gf.layout()
        with pytest.raises(FormatError, match=r"backend cpu.accel does not compute fp16\+fp32 \(gate/up fp16, down "
                                              r"fp32\), the format layer 0 .* \(it computes a layer in one format"):
            gguf_block(gf, layout, 0, _accel())
        assert gguf_block(gf, layout, 0, _accel(), fmt="bf16").prepared.fmt.name == "bf16"  # converted on request
        assert gguf_block(gf, layout, 0, ReferenceBackend()).prepared.fmt.name == "fp16+fp32"


def test_run_gguf_reports_the_mixed_format_and_its_bound(mixed_file):
    results = run_gguf(mixed_file.path, ReferenceBackend(), tokens=4)
    assert [(r.layer, r.fmt) for r in results] == [(0, MIXED), (1, "q4_k")]
    assert all(r.ok and r.tolerance == tolerance("q4_k") for r in results), results


# ---- the CLI ----------------------------------------------------------------------------------------

def test_cli_show_and_run_the_mixed_file(mixed_file):
    r = moetier("zoo", "show", mixed_file.path, "--verify", "--json")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "q4_k/q4_k/q6_k (1 layers)" in json.loads(r.stdout)["quantization"]
    r = moetier("zoo", "run", mixed_file.path, "--tokens", "5")  # the backend this host chooses
    assert r.returncode == 0 and "Traceback" not in r.stdout + r.stderr, r.stdout + r.stderr
    assert "OK: 2 MoE layers match the float64 reference" in r.stdout and MIXED in r.stdout, r.stdout
    r = moetier("zoo", "run", mixed_file.path, "--backend", "cpu.torch", "--format", "q8_0+q6_k", "--tokens", "3")
    assert r.returncode == 0 and "q8_0+q6_k" in r.stdout, r.stdout + r.stderr
    assert_usage_error(moetier("zoo", "run", mixed_file.path, "--format", "q4_k+q9_k"), "GATEUP+DOWN")
    assert_usage_error(moetier("conformance", "--backend", "cpu.torch", "--format", "q4_k+q6_k+q8_0"), "GATEUP+DOWN")
