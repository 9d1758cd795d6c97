"""GGUF files read directly: layout from metadata per architecture, expert bytes, dequantization
bit-identical to the gguf package, whole MoE layers on cpu.numba, cpu.torch and the native kernels against a float64
reference computed here from the file with gguf's own reader and dequantizer, and the refusals (gate
and up in different types, types without a moetier format, backends without the format, corrupt files)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from moetier.checkpoint.gguf import GGUFExperts, GGUFFile, is_gguf  # noqa: E402
from moetier.errors import CheckpointError, FormatError, LayoutError  # noqa: E402
from moetier.formats import dequantize  # noqa: E402
from moetier.runtime.gguf_model import gguf_block, run_gguf, show_gguf  # noqa: E402
from moetier.reference import ReferenceBackend  # noqa: E402
from moetier.plugins import load_registry  # noqa: E402
from moetier.runtime.routing import route  # noqa: E402

from cli_helpers import assert_usage_error, moetier  # noqa: E402
from zoo.backends import runnable_native  # noqa: E402
from zoo.gguf_files import Model, write  # noqa: E402

SIGMOID = gguf.ExpertGatingFuncType.SIGMOID
SOFTMAX = gguf.ExpertGatingFuncType.SOFTMAX
FP32_BOUND = 1e-5  # fp32 compute on exactly decoded weights vs float64 (see test_numba_backend)

# (id, model, expected family/version, expected router fields, shared width, dense layers, moe layers)
CASES = {
    "qwen3moe": (Model("qwen3moe", "Qwen3-235B-A22B", 2, 256, 256, 8, 2, ("q4_k",) * 3),
                 ("qwen", "Qwen3-235B-A22B"), dict(scoring="softmax", renormalize=True), None, (), (0, 1)),
    "qwen2moe": (Model("qwen2moe", "Qwen1.5-MoE-A2.7B", 2, 256, 256, 8, 4, ("q5_k",) * 3, shared=512),
                 ("qwen", "Qwen1.5-MoE-A2.7B"), dict(scoring="softmax", renormalize=False), (512, True), (), (0, 1)),
    "deepseek2-v3": (Model("deepseek2", "DeepSeek-R1", 3, 256, 256, 8, 2, ("q6_k",) * 3, shared=1, leading_dense=1,
                           selection_bias=True,
                           meta=dict(expert_gating_func=SIGMOID, expert_weights_scale=2.5, expert_weights_norm=True,
                                     expert_group_count=4, expert_group_used_count=2)),
                     ("deepseek", "DeepSeek-R1"),
                     dict(scoring="sigmoid", selection_bias=True, n_group=4, topk_group=2, group_score="top2_sum",
                          renormalize=True, scaling=2.5), (256, False), (0,), (1, 2)),
    # llama.cpp's Q4_K_M of DeepSeek-V2-Lite: down rows of 1408 (here 96) are no whole K-quant blocks -> Q5_0
    "deepseek2-v2-lite": (Model("deepseek2", "DeepSeek-V2-Lite", 2, 256, 96, 8, 3, ("q4_k", "q4_k", "q5_0"), shared=2,
                                leading_dense=1, meta=dict(expert_gating_func=SOFTMAX, expert_weights_scale=1.0,
                                                           expert_weights_norm=False)),
                          ("deepseek", "DeepSeek-V2-Lite"), dict(scoring="softmax", renormalize=False, scaling=1.0),
                          (192, False), (0,), (1,)),
    # a Q2_K file as unsloth / llama.cpp make them for the 671B models: gate/up Q2_K, down Q3_K
    "deepseek2-q2_k": (Model("deepseek2", "DeepSeek-R1", 2, 256, 256, 8, 2, ("q2_k", "q2_k", "q3_k"), shared=1,
                             leading_dense=1, selection_bias=True,
                             meta=dict(expert_gating_func=SIGMOID, expert_weights_scale=2.5, expert_weights_norm=True,
                                       expert_group_count=4, expert_group_used_count=2)),
                       ("deepseek", "DeepSeek-R1"),
                       dict(scoring="sigmoid", selection_bias=True, n_group=4, topk_group=2, group_score="top2_sum",
                            renormalize=True, scaling=2.5), (256, False), (0,), (1,)),
    "deepseek2-kimi": (Model("deepseek2", "Kimi-K2-Instruct", 2, 64, 64, 8, 2, ("q4_0",) * 3, shared=1, leading_dense=1,
                             selection_bias=True, meta=dict(expert_gating_func=SIGMOID, expert_weights_scale=2.827,
                                                            expert_weights_norm=True)),
                       ("kimi", "Kimi-K2"), dict(scoring="sigmoid", selection_bias=True, renormalize=True, scaling=2.827),
                       (64, False), (0,), (1,)),
    # an IQ4_XS file: gate/up rows of 256 in iq4_xs, down rows of 64 in iq4_nl (llama.cpp's fallback)
    "glm4moe": (Model("glm4moe", "GLM-4.5-Air", 2, 256, 64, 8, 2, ("iq4_xs", "iq4_xs", "iq4_nl"), shared=1,
                      leading_dense=1,
                      nextn=1, selection_bias=True,
                      meta=dict(expert_gating_func=SIGMOID, expert_weights_scale=1.0, expert_weights_norm=True)),
                ("glm", "GLM-4.5-Air"), dict(scoring="sigmoid", selection_bias=True, renormalize=True), (64, False),
                (0,), (1,)),
    "minimax-m2": (Model("minimax-m2", "MiniMax-M2", 2, 64, 96, 8, 2, ("q5_1", "q5_1", "q4_1"), selection_bias=True,
                         meta=dict(expert_gating_func=SIGMOID)),
                   ("minimax", "MiniMax-M2"), dict(scoring="sigmoid", selection_bias=True, renormalize=True), None, (),
                   (0, 1)),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    cache = {}

    def get(case: str):
        if case not in cache:
            path = tmp_path_factory.mktemp("gguf") / f"{case}.gguf"
            cache[case] = write(path, CASES[case][0], seed=len(cache))
        return cache[case]
    return get


def test_metadata_keys_are_the_gguf_packages():
    from moetier.checkpoint.gguf import KEYS_READ

    spelled = {v for k, v in vars(gguf.Keys.LLM).items() if k.isupper() and isinstance(v, str)}
    assert {"{arch}." + k for k in KEYS_READ} <= spelled


@pytest.mark.parametrize("case", list(CASES))
def test_layout_from_metadata(files, case):
    model, (family, version), router, shared, dense, moe = CASES[case]
    w = files(case)
    with GGUFFile(w.path) as gf:
        layout = gf.layout()
    assert (layout.family, layout.version) == (family, version)
    assert layout.num_hidden_layers == model.layers  # the nextn (MTP) block is not a decoder layer
    assert layout.dense_layers == dense and layout.moe_layer_indices == moe
    for m in layout.moe_layers:
        e = m.experts
        assert (e.num_experts, e.top_k, e.hidden_size, e.intermediate_size) == (model.experts, model.top_k, model.hidden,
                                                                                  model.inter)
        for key, value in router.items():
            assert getattr(m.router, key) == pytest.approx(value), key
        assert (None if m.shared is None else (m.shared.intermediate_size, m.shared.gated)) == shared


def _gguf_tensor(path, name):
    r = gguf.GGUFReader(path)
    return next(t for t in r.tensors if t.name == name)


def test_expert_bytes_are_the_files_and_dequantize_like_gguf(files):
    w = files("qwen3moe")
    with GGUFFile(w.path) as gf:
        layer = gf.layout().layer(1)
        src = GGUFExperts(gf, layer)
        assert {k: f.name for k, f in src.formats().items()} == {"gate": "q4_k", "up": "q4_k", "down": "q4_k"}
        for e in (0, 5, 7):
            t = src.expert(e)
            for which in ("gate", "up", "down"):
                q = getattr(t, which)
                want = w.layers[1][which + "_bytes"][e]
                assert q.fmt.name == "q4_k" and np.array_equal(q.data.numpy(), want)
                # only this expert's slice was copied out of the mapping
                assert q.data.untyped_storage().nbytes() == want.nbytes
                ref = gguf.quants.dequantize(_gguf_tensor(w.path, f"blk.1.ffn_{which}_exps.weight").data[e],
                                             gguf.GGMLQuantizationType.Q4_K)
                np.testing.assert_array_equal(dequantize(q).numpy().view(np.uint32), ref.view(np.uint32))


def reference_layer(path: str, model: Model, layer, hidden: torch.Tensor):
    """float64 MoE layer from the file through gguf's reader and dequantizer only (no moetier reading),
    routed by moetier.runtime.routing (checked against transformers elsewhere) on the router read here."""
    r = gguf.GGUFReader(path)
    t = {x.name: x for x in r.tensors}
    i = layer.index

    def read(name):
        x = t[name]
        return torch.from_numpy(np.array(gguf.quants.dequantize(np.array(x.data), x.tensor_type))).double()

    bias = read(f"blk.{i}.exp_probs_b.bias") if layer.router.selection_bias else None
    ids, weights = route(layer.router, hidden, read(f"blk.{i}.ffn_gate_inp.weight").float(),
                         None if bias is None else bias.float())
    gate, up, down = (read(f"blk.{i}.ffn_{n}_exps.weight") for n in ("gate", "up", "down"))
    x = hidden.double()
    out = torch.zeros_like(x)
    for tok in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[tok, j])
            h = torch.nn.functional.silu(gate[e] @ x[tok]) * (up[e] @ x[tok])
            out[tok] += float(weights[tok, j]) * (down[e] @ h)
    if layer.shared is not None:
        sg, su, sd = (read(f"blk.{i}.ffn_{n}_shexp.weight") for n in ("gate", "up", "down"))
        s = (torch.nn.functional.silu(x @ sg.T) * (x @ su.T)) @ sd.T
        if layer.shared.gated:
            s = torch.sigmoid(x @ read(f"blk.{i}.ffn_gate_inp_shexp.weight").reshape(-1, 1)) * s
        out += s
    return out, ids


@pytest.mark.parametrize("backend_name", ["cpu.numba", "cpu.torch", "native"])
@pytest.mark.parametrize("case", list(CASES))
def test_whole_moe_layer_against_float64(files, case, backend_name):
    if backend_name == "cpu.numba":
        pytest.importorskip("numba")
        from moetier.backends.cpu_numba import NumbaBackend
        backend = NumbaBackend(num_threads=2)
    elif backend_name == "native":
        # fp32 math on the packed GGUF values (no int8 activations): the fp32 bound shows they are exact
        from moetier.backends.native.backend import NativeBackend
        from moetier.hardware import load_inventory
        native = runnable_native(load_registry(no_plugins=True))
        backend = NativeBackend(native.name, native.variant, load_inventory(), threads=2, int8_activations=False)
    else:
        from moetier.backends.cpu_torch import TorchBackend
        backend = TorchBackend()
    model = CASES[case][0]
    w = files(case)
    g = torch.Generator().manual_seed(7)
    with GGUFFile(w.path) as gf:
        layout = gf.layout()
        for m in layout.moe_layers:
            block = gguf_block(gf, layout, m.index, backend)
            gate_up, down = model.types[0], model.types[2]
            assert block.prepared.fmt.name == (gate_up if gate_up == down else f"{gate_up}+{down}")
            hidden = torch.randn(9, model.hidden, generator=g)
            want, want_ids = reference_layer(w.path, model, m, hidden)
            ids, _ = block.route(hidden)
            assert torch.equal(ids, want_ids), "router or selection bias read from the wrong tensor"
            got = block(hidden).double()
            rel = float((got - want).norm() / want.norm())
            assert rel < FP32_BOUND, f"{case} layer {m.index} on {backend_name}: {rel:.3g}"


def test_gate_and_up_in_different_types_need_an_explicit_format(tmp_path):
    # (a down in another type than gate/up is computed as it is: tests/test_mixed_formats.py)
    m = Model("qwen3moe", "Qwen3-30B-A3B", 1, 256, 256, 4, 2, ("q4_k", "q5_k", "q6_k"))
    w = write(tmp_path / "mixed.gguf", m)
    ref = ReferenceBackend()
    with GGUFFile(w.path) as gf:
        layout = gf.layout()
        with pytest.raises(FormatError, match=r"layer 0 stores its experts as gate Q4_K, up Q5_K, down Q6_K.*gate and "
                                              r"up in one format.*--format"):
            gguf_block(gf, layout, 0, ref)
        exact = gguf_block(gf, layout, 0, ref, fmt="fp32")
        down = exact.prepared.payload[3].down
        want = gguf.quants.dequantize(_gguf_tensor(w.path, "blk.0.ffn_down_exps.weight").data[3],
                                      gguf.GGMLQuantizationType.Q6_K)
        assert torch.equal(down, torch.from_numpy(want))  # fp32 holds the GGUF values exactly
    assert "q4_k/q5_k/q6_k (1 layers)" in show_gguf(w.path)["quantization"]


def test_types_without_a_moetier_format_are_refused_or_converted_on_request(tmp_path):
    m = Model("qwen3moe", "Qwen3-30B-A3B", 1, 256, 256, 4, 2, ("iq2_xxs", "iq2_xxs", "iq2_xxs"))
    w = write(tmp_path / "iq2.gguf", m)
    ref = ReferenceBackend()
    with GGUFFile(w.path) as gf:
        layout = gf.layout()
        with pytest.raises(FormatError, match=r"IQ2_XXS.*cannot compute.*--format"):
            gguf_block(gf, layout, 0, ref)
        block = gguf_block(gf, layout, 0, ref, fmt="bf16")
        got = block.prepared.payload[1].gate
        want = gguf.quants.dequantize(_gguf_tensor(w.path, "blk.0.ffn_gate_exps.weight").data[1],
                                      gguf.GGMLQuantizationType.IQ2_XXS)
        assert torch.equal(got, torch.from_numpy(want).to(torch.bfloat16).float())


def test_a_backend_without_the_files_format_is_refused(files):
    from moetier.backends.accel.backend import AccelBackend
    from moetier.backends.accel.build import detect_build
    from moetier.backends.accel.plan import plan_kernels

    accel = AccelBackend("cpu.accel", "cpu", plan_kernels("cpu", None, detect_build()))
    assert not {"q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_nl",
                "iq4_xs", "mxfp4"} & set(accel.formats)
    w = files("qwen3moe")
    with GGUFFile(w.path) as gf:
        layout = gf.layout()
        with pytest.raises(FormatError, match=f"backend {accel.name} does not compute q4_k"):
            gguf_block(gf, layout, 0, accel)
        with pytest.raises(FormatError, match=f"backend {accel.name} does not compute format q4_k"):
            accel.prepare(layout.layer(0).experts, GGUFExperts(gf, layout.layer(0)), [0], "q4_k")


def test_split_files_read_as_one_model(tmp_path):
    m = Model("qwen3moe", "Qwen3-30B-A3B", 2, 64, 64, 4, 2, ("q8_0",) * 3)
    write(tmp_path / "m.gguf", m, split_max_tensors=4)
    shards = sorted(p.name for p in tmp_path.iterdir())
    assert shards == ["m-00001-of-00003.gguf", "m-00002-of-00003.gguf", "m-00003-of-00003.gguf"]
    with GGUFFile(tmp_path / shards[2]) as gf:  # any shard opens the whole model
        assert gf.layout().moe_layer_indices == (0, 1)
        assert gf.has("blk.1.ffn_down_exps.weight") and gf.has("token_embd.weight")
    (tmp_path / shards[1]).unlink()
    with pytest.raises(CheckpointError, match="m-00002-of-00003.gguf of the 3-file model is missing"):
        GGUFFile(tmp_path / shards[0])


def test_bad_files_are_typed_errors(tmp_path, files):
    w = files("qwen3moe")
    data = open(w.path, "rb").read()
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        GGUFFile(trunc)
    text = tmp_path / "x.gguf"
    text.write_text("hello")
    assert not is_gguf(text)
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        GGUFFile(text)
    other = write(tmp_path / "llama.gguf", Model("llama", "Llama", 1, 64, 64, 4, 2, ("q8_0",) * 3))
    with pytest.raises(LayoutError, match="architecture 'llama' is not mapped.*qwen3moe"):
        GGUFFile(other.path).config()


def test_run_gguf_checks_every_layer(files):
    pytest.importorskip("numba")
    from moetier.backends.cpu_numba import NumbaBackend

    results = run_gguf(files("deepseek2-v3").path, NumbaBackend(num_threads=2), tokens=12)
    assert [r.layer for r in results] == [1, 2]
    assert all(r.ok and r.fmt == "q6_k" and r.experts == 8 for r in results), results


def test_cli_show_and_run_a_gguf_file(files, tmp_path):
    import json

    w = files("qwen2moe")
    r = moetier("zoo", "show", w.path, "--verify", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["family"] == "qwen" and out["gguf_architecture"] == "qwen2moe" and out["verified_matrices"] == 6
    assert out["quantization"] == "gguf q5_k/q5_k/q5_k (2 layers) (gate/up/down)" and out["shared"] == "512 gated"
    pytest.importorskip("numba")
    r = moetier("zoo", "run", w.path, "--backend", "cpu.numba", "--tokens", "5")
    assert r.returncode == 0 and "OK: 2 MoE layers match the float64 reference" in r.stdout, r.stdout + r.stderr
    # gate and up in two formats: refused with one line naming them
    mixed = write(tmp_path / "mixed.gguf", Model("qwen3moe", "Qwen3-30B-A3B", 1, 256, 256, 4, 2, ("q4_k", "q5_k", "q6_k")))
    r = moetier("zoo", "run", mixed.path, "--backend", "cpu.numba")
    assert_usage_error(r, "layer 0 stores its experts as gate Q4_K, up Q5_K, down Q6_K")


def test_cli_refuses_a_backend_without_the_format_and_unmapped_files(files, tmp_path):
    w = files("qwen3moe")
    r = moetier("zoo", "run", w.path, "--backend", "cpu.accel")
    # the accelerator path has no GGUF kernels: refused, never a silent conversion
    assert_usage_error(r)
    assert "does not compute q4_k" in r.stderr, r.stderr
    other = write(tmp_path / "llama.gguf", Model("llama", "Llama", 1, 64, 64, 4, 2, ("q8_0",) * 3))
    assert_usage_error(moetier("zoo", "show", other.path), "architecture 'llama' is not mapped")
