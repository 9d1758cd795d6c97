"""moetier.checkpoint: lazy reading, native formats against independent references, fused slices,
sharding, memory behaviour and the progress helper. Every checkpoint is written into tmp_path."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from moetier.checkpoint import (Checkpoint, fused_expert_tensors, matrix_tensors, progress_enabled, track,
                                write_checkpoint)
from moetier.errors import CheckpointError
from moetier.formats import FORMATS, pack_int4, quantize


@pytest.fixture
def rng():
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")
    return np.random.default_rng(seed)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


# ---- independent references (numpy only, written from the format descriptions) ---------------------

def e4m3_to_float64(bits: np.ndarray) -> np.ndarray:
    """OCP float8 e4m3fn from its bits: 1 sign, 4 exponent (bias 7), 3 mantissa; S.1111.111 is NaN."""
    b = bits.astype(np.int64)
    sign = np.where(b >> 7, -1.0, 1.0)
    exp = (b >> 3) & 0xF
    man = (b & 0x7).astype(np.float64)
    val = np.where(exp == 0, man / 8.0 * 2.0 ** -6, (1.0 + man / 8.0) * np.exp2(exp - 7.0))
    val = np.where((exp == 15) & (man == 7), np.nan, val)
    return sign * val


def fp8_block_dequant(bits: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """W = w * scale[block], blocks of 128x128 walked explicitly; the last block row/col may be short."""
    w = e4m3_to_float64(bits)
    out = np.empty_like(w)
    for bi in range(scale.shape[0]):
        for bj in range(scale.shape[1]):
            rows, cols = slice(bi * 128, (bi + 1) * 128), slice(bj * 128, (bj + 1) * 128)
            out[rows, cols] = w[rows, cols] * float(scale[bi, bj])
    return out


def ct_pack_int4(codes: np.ndarray) -> np.ndarray:
    """compressed-tensors pack-quantized, bit by bit: element c of a row at bit 4c of the row's
    little-endian bit stream, stored as q+8, the stream cut into int32 words (zero padding)."""
    out_f, in_f = codes.shape
    n_words = math.ceil(in_f / 8)
    packed = np.zeros((out_f, n_words), dtype=np.int32)
    for r in range(out_f):
        stream = 0
        for c in range(in_f):
            stream |= (int(codes[r, c]) + 8) << (4 * c)
        for k in range(n_words):
            word = (stream >> (32 * k)) & 0xFFFFFFFF
            packed[r, k] = word - (1 << 32) if word >= 1 << 31 else word
    return packed


def ct_int4_dequant(packed: np.ndarray, scale: np.ndarray, in_f: int, group: int) -> np.ndarray:
    words = packed.astype(np.int64) & 0xFFFFFFFF
    out = np.empty((packed.shape[0], in_f), dtype=np.float64)
    for c in range(in_f):
        nib = (words[:, c // 8] >> (4 * (c % 8))) & 0xF
        out[:, c] = (nib - 8) * scale[:, c // group].astype(np.float64)
    return out


def random_fp8_bits(rng, shape) -> np.ndarray:
    bits = rng.integers(0, 256, size=shape, dtype=np.uint8)
    return np.where((bits & 0x7F) == 0x7F, bits & 0xF0, bits).astype(np.uint8)  # no NaN codes


# ---- native formats ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_plain_float_matrix_roundtrip(tmp_path, rng, dtype):
    w = _t(rng.standard_normal((24, 40)).astype(np.float32)).to(dtype)
    write_checkpoint(tmp_path, {"layer.proj.weight": w})
    with Checkpoint(tmp_path) as ckpt:
        assert ckpt.matrix_format("layer.proj").dtype == dtype
        q = ckpt.read_matrix("layer.proj", shape=(24, 40))
        assert q.fmt.dtype == dtype and q.shape == (24, 40) and torch.equal(q.data, w)
        f = ckpt.read_matrix("layer.proj", to=torch.float32)
        assert f.fmt == FORMATS["fp32"] and torch.equal(f.data, w.float())


@pytest.mark.parametrize("out_f,in_f", [(200, 130), (256, 384), (130, 200), (7, 5)])
def test_fp8_block_matrix_against_independent_dequant(tmp_path, rng, out_f, in_f):
    bits = random_fp8_bits(rng, (out_f, in_f))
    grid = (math.ceil(out_f / 128), math.ceil(in_f / 128))
    scale = (rng.random(grid) * 3e-3 + 1e-4).astype(np.float32)
    save_file({"e.down_proj.weight": _t(bits).view(torch.float8_e4m3fn), "e.down_proj.weight_scale_inv": _t(scale)},
              str(tmp_path / "model.safetensors"))
    with Checkpoint(tmp_path) as ckpt:
        assert ckpt.matrix_format("e.down_proj") == FORMATS["fp8_e4m3"]
        q = ckpt.read_matrix("e.down_proj")
        assert q.shape == (out_f, in_f)
        assert np.array_equal(q.data.view(torch.uint8).numpy(), bits)
        assert np.array_equal(q.scales.numpy(), scale)
        ref = fp8_block_dequant(bits, scale)
        got = ckpt.read_matrix("e.down_proj", to=torch.float32).data.double().numpy()
    # fp8 (4 significant bits) x fp32 scale (24) is exact in float64; the fp32 result rounds once: 2^-24.
    assert np.all(np.abs(got - ref) <= 2.0 ** -24 * np.abs(ref))
    if out_f % 128 and grid[0] > 1:
        # The mistake this guards against: block height out/n_blocks instead of 128 (transformers 5.24 on CPU).
        wrong_rows = np.minimum((np.arange(out_f) * grid[0]) // out_f, grid[0] - 1)
        wrong = e4m3_to_float64(bits) * scale[wrong_rows][:, np.minimum(np.arange(in_f) // 128, grid[1] - 1)]
        assert not np.allclose(wrong, ref)


def test_fp8_writer_matches_core_quantizer(tmp_path, rng):
    w = _t(rng.standard_normal((200, 130)).astype(np.float32))
    q = quantize(w, "fp8_e4m3")
    tensors = matrix_tensors("x", q)
    assert set(tensors) == {"x.weight", "x.weight_scale_inv"} and tensors["x.weight_scale_inv"].shape == (2, 2)
    write_checkpoint(tmp_path, tensors)
    with Checkpoint(tmp_path) as ckpt:
        back = ckpt.read_matrix("x")
    assert torch.equal(back.data.view(torch.uint8), q.data.view(torch.uint8)) and torch.equal(back.scales, q.scales)
    ref = fp8_block_dequant(q.data.view(torch.uint8).numpy(), q.scales.numpy())
    assert np.all(np.abs(back.dequantize(torch.float64).numpy() - ref) <= 1e-15 * np.abs(ref))
    rel = np.linalg.norm(ref - w.double().numpy()) / np.linalg.norm(w.double().numpy())
    assert rel < 0.05  # e4m3 keeps 3 mantissa bits: about 2-3% relative error on gaussian data


@pytest.mark.parametrize("out_f,in_f,group,scale_dtype", [(12, 256, 32, torch.bfloat16), (10, 200, 64, torch.float32),
                                                          (6, 75, 32, torch.bfloat16), (4, 384, 128, torch.float16)])
def test_compressed_tensors_int4_against_independent_packing(tmp_path, rng, out_f, in_f, group, scale_dtype):
    codes = rng.integers(-8, 8, size=(out_f, in_f))
    packed = ct_pack_int4(codes)
    n_groups = math.ceil(in_f / group)
    scale = _t((rng.random((out_f, n_groups)) * 0.02 + 1e-3).astype(np.float32)).to(scale_dtype)
    save_file({"k.gate_proj.weight_packed": _t(packed), "k.gate_proj.weight_scale": scale,
               "k.gate_proj.weight_shape": torch.tensor([out_f, in_f], dtype=torch.int32)},
              str(tmp_path / "model.safetensors"))
    with Checkpoint(tmp_path) as ckpt:
        assert ckpt.matrix_shape("k.gate_proj") == (out_f, in_f)
        q = ckpt.read_matrix("k.gate_proj", shape=(out_f, in_f))
        deq = ckpt.read_matrix("k.gate_proj", to=torch.float32).data.numpy()
    assert q.fmt == FORMATS[f"int4_g{group}"]
    # The bit streams coincide: the moetier layout is byte-identical to the core's own packer.
    assert torch.equal(q.data, pack_int4(torch.from_numpy(codes).to(torch.int8)))
    assert torch.equal(q.scales, scale.float())
    # (nibble - 8) * scale is exact in float64; the fp32 result rounds once (exact for 16-bit scales).
    ref = ct_int4_dequant(packed, scale.float().numpy(), in_f, group)
    assert np.all(np.abs(deq - ref) <= 2.0 ** -24 * np.abs(ref))
    if scale_dtype != torch.float32:
        assert np.array_equal(deq, ref)
    # The writer produces the same words as the bit-level packer, padding included.
    again = matrix_tensors("k.gate_proj", q, scale_dtype=scale_dtype)
    assert np.array_equal(again["k.gate_proj.weight_packed"].numpy(), packed)
    assert torch.equal(again["k.gate_proj.weight_scale"], scale)
    assert again["k.gate_proj.weight_shape"].tolist() == [out_f, in_f]


def test_int4_writer_roundtrip_from_core_quantizer(tmp_path, rng):
    w = _t(rng.standard_normal((40, 96)).astype(np.float32))
    q = quantize(w, "int4_g32")
    write_checkpoint(tmp_path, matrix_tensors("m", q))
    with Checkpoint(tmp_path) as ckpt:
        back = ckpt.read_matrix("m")
        assert ckpt.info("m.weight_packed").dtype == torch.int32
    assert back.fmt == q.fmt and torch.equal(back.data, q.data) and torch.equal(back.scales, q.scales)


def test_group_size_hint_and_conversion_targets(tmp_path, rng):
    w = _t(rng.standard_normal((16, 64)).astype(np.float32))
    write_checkpoint(tmp_path, {**matrix_tensors("a", quantize(w, "int4_g64")), **matrix_tensors("b", quantize(w, "bf16"))})
    with Checkpoint(tmp_path) as ckpt:
        assert ckpt.matrix_format("a").name == "int4_g64"  # 64 inputs, 1 scale column
        assert ckpt.read_matrix("a", group_size=64).fmt.name == "int4_g64"
        to_int4 = ckpt.read_matrix("b", to="int4_g32")
        assert to_int4.fmt.name == "int4_g32"
        assert torch.equal(to_int4.data, quantize(w.bfloat16().float(), "int4_g32").data)
        half = ckpt.read_matrix("a", to=torch.bfloat16)
        assert half.fmt.name == "bf16" and torch.equal(half.data, quantize(w, "int4_g64").dequantize(torch.bfloat16))


# ---- fused experts -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_expert_slices(tmp_path, rng, dtype):
    n_exp, inter, hidden = 5, 12, 20
    gates = [_t(rng.standard_normal((inter, hidden)).astype(np.float32)).to(dtype) for _ in range(n_exp)]
    ups = [_t(rng.standard_normal((inter, hidden)).astype(np.float32)).to(dtype) for _ in range(n_exp)]
    downs = [_t(rng.standard_normal((hidden, inter)).astype(np.float32)).to(dtype) for _ in range(n_exp)]
    tensors = fused_expert_tensors("model.layers.0.mlp.experts", gates, ups, downs)
    assert tensors["model.layers.0.mlp.experts.gate_up_proj"].shape == (n_exp, 2 * inter, hidden)
    write_checkpoint(tmp_path, tensors)
    with Checkpoint(tmp_path) as ckpt:
        for e in rng.permutation(n_exp).tolist():
            g, u = ckpt.read_fused_gate_up("model.layers.0.mlp.experts.gate_up_proj", e)
            d = ckpt.read_fused_matrix("model.layers.0.mlp.experts.down_proj", e, shape=(hidden, inter))
            assert g.shape == u.shape == (inter, hidden) and d.shape == (hidden, inter)
            assert torch.equal(g.data, gates[e]) and torch.equal(u.data, ups[e]) and torch.equal(d.data, downs[e])
        part = ckpt.read_fused_matrix("model.layers.0.mlp.experts.gate_up_proj", 3, rows=(5, 17), to=torch.float32)
        assert part.fmt.name == "fp32" and torch.equal(part.data, torch.cat([gates[3], ups[3]])[5:17].float())


def test_fused_slice_reads_only_that_expert(tmp_path):
    # Each expert's block is a distinct constant; a reader that touched neighbours would still be right, so
    # check the byte range instead: get_slice on [e] covers exactly expert e's rows.
    n_exp, rows, cols = 4, 3, 1024
    fused = torch.arange(n_exp, dtype=torch.float32)[:, None, None].expand(n_exp, rows, cols).contiguous()
    save_file({"w": fused}, str(tmp_path / "model.safetensors"))
    with open(tmp_path / "model.safetensors", "r+b") as f:
        # Corrupt expert 0's bytes to NaN: reading expert 2 must not see them.
        info = Checkpoint(tmp_path).info("w")
        f.seek(info.offsets[0])
        f.write(np.full(rows * cols, np.nan, dtype=np.float32).tobytes())
    with Checkpoint(tmp_path) as ckpt:
        assert torch.equal(ckpt.read_fused_matrix("w", 2).data, torch.full((rows, cols), 2.0))
        assert torch.isnan(ckpt.read_fused_matrix("w", 0).data).all()


# ---- layouts on disk ---------------------------------------------------------------------------------

def _random_state(rng, n=12):
    out = {}
    for i in range(n):
        shape = tuple(int(s) for s in rng.integers(1, 40, size=int(rng.integers(1, 4))))
        out[f"model.layers.{i}.t{i}"] = _t(rng.standard_normal(shape).astype(np.float32)).to(
            [torch.float32, torch.bfloat16, torch.float16][i % 3])
    out["model.embed.weight"] = _t(rng.standard_normal((64, 32)).astype(np.float32))
    return out


def test_sharded_checkpoint_with_index(tmp_path, rng):
    state = _random_state(rng)
    index_path = write_checkpoint(tmp_path, state, max_shard_bytes=3000, config={"model_type": "tiny"})
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    with Checkpoint(tmp_path) as ckpt:
        assert ckpt.names() == sorted(state) and len(ckpt) == len(state) and "model.embed.weight" in ckpt
        assert ckpt.config == {"model_type": "tiny"}
        assert [p.name for p in ckpt.files] == shards
        assert ckpt.total_bytes == index["metadata"]["total_size"]
        assert ckpt.names("model.layers.1") == ["model.layers.1.t1", "model.layers.10.t10", "model.layers.11.t11"]
        for name, t in state.items():
            info = ckpt.info(name)
            assert info.shape == tuple(t.shape) and info.dtype == t.dtype and info.file.name == index["weight_map"][name]
            assert torch.equal(ckpt.read(name, shape=t.shape, dtype=t.dtype), t)
        assert torch.equal(ckpt.read_slice("model.embed.weight", (slice(3, 9), slice(None, 5))),
                           state["model.embed.weight"][3:9, :5])


def test_index_file_itself_may_be_named(tmp_path, rng):
    state = _random_state(rng, n=6)
    index = write_checkpoint(tmp_path, state, max_shard_bytes=1500)
    with Checkpoint(index) as ckpt:
        assert ckpt.names() == sorted(state) and ckpt.index_file == index
        assert all(torch.equal(ckpt.read(n), t) for n, t in state.items())


def test_reads_checkpoint_sharded_by_huggingface_hub(tmp_path, rng):
    hub = pytest.importorskip("huggingface_hub")
    state = _random_state(rng, n=20)
    hub.save_torch_state_dict(state, tmp_path, max_shard_size=4000)
    assert (tmp_path / "model.safetensors.index.json").exists()
    with Checkpoint(tmp_path) as ckpt:
        assert ckpt.names() == sorted(state) and len(ckpt.files) > 1
        for name, t in state.items():
            assert torch.equal(ckpt.read(name), t)


def test_single_file_and_directory_without_index(tmp_path, rng):
    state = _random_state(rng, n=6)
    names = sorted(state)
    save_file({n: state[n] for n in names[:3]}, str(tmp_path / "part-a.safetensors"))
    save_file({n: state[n] for n in names[3:]}, str(tmp_path / "part-b.safetensors"))
    with Checkpoint(tmp_path) as ckpt:  # no index: the headers of all *.safetensors form the map
        assert ckpt.names() == names and len(ckpt.files) == 2
        assert all(torch.equal(ckpt.read(n), state[n]) for n in names)
        assert ckpt.config is None
    with Checkpoint(tmp_path / "part-b.safetensors") as ckpt:  # one file on its own
        assert ckpt.names() == names[3:]
        assert torch.equal(ckpt.read(names[4]), state[names[4]])


def test_rewriting_switches_between_single_and_sharded(tmp_path, rng):
    state = _random_state(rng, n=6)
    write_checkpoint(tmp_path, state, max_shard_bytes=1000)
    write_checkpoint(tmp_path, {"only": torch.ones(3)})
    assert not (tmp_path / "model.safetensors.index.json").exists()
    with Checkpoint(tmp_path) as ckpt:
        assert ckpt.names() == ["only"]


def test_handle_cache_is_bounded_and_closeable(tmp_path, rng):
    state = _random_state(rng, n=12)
    write_checkpoint(tmp_path, state, max_shard_bytes=1500)
    ckpt = Checkpoint(tmp_path, max_open_files=2)
    assert len(ckpt.files) > 3
    for _ in range(2):
        for name in rng.permutation(sorted(state)).tolist():
            assert torch.equal(ckpt.read(name), state[name])
            assert len(ckpt._handles) <= 2
    kept = ckpt.read("model.embed.weight")
    ckpt.close()
    assert len(ckpt._handles) == 0
    # Tensors already read own their memory: valid after close, blind to later changes of the file.
    info = Checkpoint(tmp_path).info("model.embed.weight")
    with open(info.file, "r+b") as f:
        f.seek(info.offsets[0])
        f.write(np.full(info.numel, 7.0, dtype=np.float32).tobytes())
    assert torch.equal(kept, state["model.embed.weight"])
    with pytest.raises(CheckpointError, match="closed"):
        ckpt.read("model.embed.weight")
    with Checkpoint(tmp_path, max_mapped_bytes=0) as again:  # released after every read, still correct
        assert torch.equal(again.read("model.embed.weight"), torch.full((64, 32), 7.0))
        assert len(again._handles) == 0


# ---- memory: one tensor at a time ----------------------------------------------------------------------

linux_only = pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc/self/status")

# Measured in a fresh interpreter: in the test process, memory that earlier tests freed but the
# allocator kept is reused without growing the RSS, which blinds the measurement (seen in full runs).
_LAZY_READ_PROBE = """
import gc, sys
import numpy as np, torch
from safetensors.torch import save_file
from moetier.checkpoint import Checkpoint

def rss():
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            fields[key] = rest
    return sum(int(fields[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile", "RssShmem") if k in fields)

d, big_mib, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
small = torch.from_numpy(np.random.default_rng(seed).standard_normal((8, 8)).astype(np.float32))
save_file({"big": torch.ones(big_mib * 2**20 // 4), "small": small}, d + "/model.safetensors")
save_file({"x": torch.ones(4)}, d + "/warm.safetensors")
with Checkpoint(d + "/warm.safetensors") as w:
    float(w.read("x").sum())  # first-use allocations of the reader and torch happen here
gc.collect()
gc.disable()
with Checkpoint(d + "/model.safetensors") as ckpt:
    before = rss()
    got = ckpt.read("small")
    assert torch.equal(got, small)
    grown_small = rss() - before
    big = ckpt.read("big")
    assert float(big.sum()) == big.numel()  # touch every page: the measurement must see the big tensor
    grown_big = rss() - before
print(grown_small, grown_big)
"""


@linux_only
def test_reading_one_tensor_does_not_load_the_others(tmp_path):
    big_mib = 96
    r = subprocess.run([sys.executable, "-c", _LAZY_READ_PROBE, str(tmp_path), str(big_mib),
                        str(int(np.random.default_rng().integers(2**31)))], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    grown_small, grown_big = (int(v) for v in r.stdout.split())
    msg = f"RSS growth: {grown_small / 2**20:.1f} MiB after the 8x8 tensor, {grown_big / 2**20:.1f} MiB after the big one"
    assert grown_big > 0.8 * big_mib * 2**20, "control failed: " + msg
    assert grown_small < 8 * 2**20, msg


_PEAK_SCRIPT = """
import sys, torch
from moetier.checkpoint import Checkpoint

def kib(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key + ":")) * 1024

def peak_growth(ckpt, bases, keep):
    kept = []
    before = kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak RSS, to the current RSS
    for base, q in ckpt.iter_matrices(bases, to=torch.float32, progress=False):
        assert q.shape == (int(sys.argv[3]), int(sys.argv[4])) and torch.isfinite(q.data).all()
        if keep:
            kept.append(q)
        del q
    return kib("VmHWM") - before, len(kept)

with Checkpoint(sys.argv[1], max_mapped_bytes=int(sys.argv[2])) as ckpt:
    bases = [n[: -len(".weight")] for n in ckpt.names()]
    float(ckpt.read_matrix(bases[0], to=torch.float32).data.sum())
    one, _ = peak_growth(ckpt, bases, keep=False)
    ckpt.release()
    kept, n_kept = peak_growth(ckpt, bases, keep=True)
print(len(bases), one, kept, n_kept)
"""


@linux_only
def test_iterating_matrices_keeps_about_one_resident(tmp_path, rng):
    import subprocess
    import sys

    n, rows, cols = 12, 512, 2048  # 2 MiB each in bf16, 4 MiB each once dequantized to fp32
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    write_checkpoint(tmp_path, {f"e{i:02d}.weight": torch.randn(rows, cols, generator=gen).bfloat16() for i in range(n)},
                     max_shard_bytes=3 * rows * cols * 2)
    budget = 4 * 2**20
    # A fixed mmap threshold makes glibc return every freed matrix at once, so RSS shows what is held.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    run = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(tmp_path), str(budget), str(rows), str(cols)],
                         capture_output=True, text=True, env=env, timeout=120)
    if "clear_refs" in run.stderr:
        pytest.skip("this kernel does not let a process reset its peak RSS")
    assert run.returncode == 0, run.stderr
    seen, one, kept, n_kept = (int(v) for v in run.stdout.split())
    per_matrix = rows * cols * (2 + 4)  # the bf16 read plus its fp32 dequantization
    print(f"peak RSS growth: {one / 2**20:.1f} MiB streaming, {kept / 2**20:.1f} MiB keeping all {n}")
    assert seen == n_kept == n
    assert kept > 0.9 * n * rows * cols * 4, "control: keeping every matrix must show in the peak"
    # Held while streaming: up to the mapped budget plus one read of file pages, the matrix being read
    # and its dequantization, and the block temporaries of that dequantization; never the other 11.
    assert one < 3 * per_matrix + budget, f"streaming {n} matrices peaked {one / 2**20:.1f} MiB above the start"


# ---- progress ----------------------------------------------------------------------------------------

def test_progress_is_quiet_without_a_terminal_and_lazy(monkeypatch, capsys):
    monkeypatch.delenv("MOETIER_PROGRESS", raising=False)
    assert progress_enabled(None) is False  # pytest captures stderr: not a TTY
    assert progress_enabled(True) is True
    monkeypatch.setenv("MOETIER_PROGRESS", "0")
    assert progress_enabled(None) is False
    produced = []

    def items():
        for i in range(5):
            produced.append(i)
            yield i

    for enabled in (False, True):
        produced.clear()
        for i in track(items(), total=5, description="t", enabled=enabled):
            assert produced == list(range(i + 1))  # never reads ahead: one item resident at a time
    assert list(track(range(3), enabled=True)) == [0, 1, 2]
    capsys.readouterr()


def test_experts_read_from_a_checkpoint_into_a_backend_with_progress(tmp_path, rng):
    from moetier.checkpoint import TrackedExperts
    from moetier.experts import ExpertLayerSpec, ExpertTensors, ExpertWeights
    from moetier.reference import ReferenceBackend

    n_exp, hidden, inter, fmt = 6, 64, 40, "fp8_e4m3"
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    mem = ExpertWeights.from_float(torch.randn(n_exp, inter, hidden, generator=gen) / 8,
                                   torch.randn(n_exp, inter, hidden, generator=gen) / 8,
                                   torch.randn(n_exp, hidden, inter, generator=gen) / 6, fmt)
    tensors = {}
    for e in range(n_exp):
        t = mem.expert(e)
        for which, q in (("gate_proj", t.gate), ("up_proj", t.up), ("down_proj", t.down)):
            tensors.update(matrix_tensors(f"mlp.experts.{e}.{which}", q))
    write_checkpoint(tmp_path, tensors, max_shard_bytes=20000)

    class FromCheckpoint:
        def __init__(self, ckpt):
            self.ckpt = ckpt

        def expert(self, e):
            r = self.ckpt.read_matrix
            return ExpertTensors(r(f"mlp.experts.{e}.gate_proj", shape=(inter, hidden)),
                                 r(f"mlp.experts.{e}.up_proj", shape=(inter, hidden)),
                                 r(f"mlp.experts.{e}.down_proj", shape=(hidden, inter)))

    spec = ExpertLayerSpec(num_experts=n_exp, top_k=2, hidden_size=hidden, intermediate_size=inter)
    backend = ReferenceBackend(precision=torch.float64)
    held = [0, 2, 3, 5]
    with Checkpoint(tmp_path) as ckpt, TrackedExperts(FromCheckpoint(ckpt), total=len(held), enabled=True) as src:
        from_disk = backend.prepare(spec, src, held, fmt)
        assert src.bar.count == len(held)
    in_memory = backend.prepare(spec, mem, held, fmt)
    x = torch.randn(7, hidden, generator=gen)
    ids = torch.tensor([[0, 2], [3, 5], [5, 0], [2, 3], [0, 5], [3, 2], [5, 3]])
    w = torch.rand(7, 2, generator=gen)
    got, want = backend.forward(from_disk, x, ids, w), backend.forward(in_memory, x, ids, w)
    assert torch.equal(got, want) and want.abs().max() > 0


def test_writer_accepts_tensors_sharing_storage(tmp_path, rng):
    w = _t(rng.standard_normal((6, 4)).astype(np.float32))
    fused = _t(rng.standard_normal((3, 4, 5)).astype(np.float32))
    write_checkpoint(tmp_path, {"embed.weight": w, "lm_head.weight": w, "e0": fused[0], "e1": fused[1]})
    with Checkpoint(tmp_path) as ckpt:
        assert torch.equal(ckpt.read("lm_head.weight"), w) and torch.equal(ckpt.read("embed.weight"), w)
        assert torch.equal(ckpt.read("e1"), fused[1])
        ckpt.release()
        assert torch.equal(ckpt.read("e0"), fused[0])


def test_e8m0_block_scales_are_widened_exactly(tmp_path, rng):
    if not hasattr(torch, "float8_e8m0fnu"):
        pytest.skip("torch without float8_e8m0fnu")
    bits = random_fp8_bits(rng, (130, 256))
    exps = rng.integers(-12, 2, size=(2, 2))
    scale = torch.from_numpy(np.exp2(exps).astype(np.float32))
    save_file({"x.weight": _t(bits).view(torch.float8_e4m3fn), "x.weight_scale_inv": scale.to(torch.float8_e8m0fnu)},
              str(tmp_path / "model.safetensors"))
    with Checkpoint(tmp_path) as ckpt:
        q = ckpt.read_matrix("x")
    assert torch.equal(q.scales, scale)
    assert np.array_equal(q.dequantize(torch.float64).numpy(), fp8_block_dequant(bits, scale.numpy()))


@pytest.mark.parametrize("src", ["fp8_e4m3", "int4_g32", "int8", "bf16"])
def test_blockwise_conversion_equals_the_core_reference(rng, monkeypatch, src):
    from moetier.checkpoint import convert_to, matrices
    from moetier.formats import convert, dequantize
    monkeypatch.setattr(matrices, "BLOCK_ELEMENTS", 128 * 200)
    w = _t(rng.standard_normal((300, 200)).astype(np.float32))  # 3 blocks of 128 rows, the last one partial
    q = quantize(w, src)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        got = convert_to(q, dtype)
        assert got.fmt.dtype == dtype and torch.equal(got.data, dequantize(q, dtype))
    for fmt in ("fp8_e4m3", "int4_g64", "int8", "bf16"):
        got, ref = convert_to(q, fmt), convert(q, fmt)
        assert got.fmt == ref.fmt and got.shape == ref.shape
        assert torch.equal(got.data.view(torch.uint8), ref.data.view(torch.uint8))
        assert (got.scales is None and ref.scales is None) or torch.equal(got.scales, ref.scales)


def test_concurrent_reads_from_threads(tmp_path, rng):
    from concurrent.futures import ThreadPoolExecutor

    state = _random_state(rng, n=16)
    write_checkpoint(tmp_path, state, max_shard_bytes=1500)
    names = sorted(state) * 4
    # A tiny mapped budget makes handles close under other threads' feet if reads were not serialized.
    with Checkpoint(tmp_path, max_mapped_bytes=256, max_open_files=2) as ckpt, ThreadPoolExecutor(4) as pool:
        got = list(pool.map(ckpt.read, names))
    assert all(torch.equal(g, state[n]) for g, n in zip(got, names))


def test_shards_may_be_symlinks_into_a_blob_store(tmp_path, rng):
    # Hub caches keep snapshot files as symlinks to ../../blobs/<hash>; the index check must allow that.
    state = _random_state(rng, n=6)
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    write_checkpoint(blobs, state, max_shard_bytes=2000)
    snap.mkdir(parents=True)
    for f in blobs.iterdir():
        (snap / f.name).symlink_to(os.path.relpath(f, snap))
    with Checkpoint(snap) as ckpt:
        assert ckpt.verify_files() == len(state)
        assert all(torch.equal(ckpt.read(n), t) for n, t in state.items())


def test_command_line_summary(tmp_path, rng, capsys):
    from moetier.checkpoint.__main__ import main

    state = _random_state(rng, n=5)
    write_checkpoint(tmp_path, state, max_shard_bytes=1000)
    assert main([str(tmp_path), "--list"]) == 0
    out = capsys.readouterr().out
    assert f"{len(state)} tensors" in out and all(n in out for n in state)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    os.truncate(shard, shard.stat().st_size - 3)
    assert main([str(tmp_path)]) == 1
    assert "truncated" in capsys.readouterr().err
