"""Bad checkpoints give typed errors that name the file and the tensor (never a crash or a SIGBUS)."""
from __future__ import annotations

import json
import math
import os
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from moetier.checkpoint import (Checkpoint, CheckpointIndexError, CorruptFileError, MissingShardError,
                                MissingTensorError, QuantizedLayoutError, TensorDTypeError, TensorShapeError,
                                TruncatedFileError, matrix_tensors, read_header, write_checkpoint)
from moetier.errors import CheckpointError, DTypeError, ExpertIdError, FormatError, ShapeError
from moetier.formats import quantize


@pytest.fixture
def rng():
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")
    return np.random.default_rng(seed)


def _rand(rng, *shape, dtype=torch.float32):
    return torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).to(dtype)


def _single(tmp_path, tensors):
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path / "model.safetensors"


def _int4(rng, out_f, in_f, group=32):
    return {"p.weight_packed": torch.from_numpy(rng.integers(-2**31, 2**31, size=(out_f, math.ceil(in_f / 8)), dtype=np.int64).astype(np.int32)),
            "p.weight_scale": _rand(rng, out_f, math.ceil(in_f / group)).abs().to(torch.bfloat16),
            "p.weight_shape": torch.tensor([out_f, in_f], dtype=torch.int32)}


# ---- missing things -----------------------------------------------------------------------------------

def test_missing_tensor_names_file_and_close_names(tmp_path, rng):
    f = _single(tmp_path, {"model.layers.0.mlp.experts.3.up_proj.weight": _rand(rng, 4, 8),
                           "model.layers.0.mlp.experts.3.gate_proj.weight": _rand(rng, 4, 8)})
    with Checkpoint(tmp_path) as ckpt:
        with pytest.raises(MissingTensorError) as e:
            ckpt.read("model.layers.0.mlp.experts.3.up_prj.weight")
        msg = str(e.value)
        assert str(f) in msg and "up_prj" in msg and "model.layers.0.mlp.experts.3.up_proj.weight" in msg
        assert isinstance(e.value, LookupError) and isinstance(e.value, CheckpointError)
        with pytest.raises(MissingTensorError, match=r"experts\.9\.down_proj.*neither"):
            ckpt.read_matrix("model.layers.0.mlp.experts.9.down_proj")


def test_nonexistent_path_and_empty_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no such"):
        Checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match=r"no model\.safetensors\.index\.json"):
        Checkpoint(tmp_path)


def test_index_pointing_at_missing_shard(tmp_path, rng):
    write_checkpoint(tmp_path, {f"t{i}": _rand(rng, 16, 16) for i in range(6)}, max_shard_bytes=2048)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    gone = index["weight_map"]["t3"]
    (tmp_path / gone).unlink()
    with pytest.raises(MissingShardError) as e:
        Checkpoint(tmp_path)
    assert gone in str(e.value) and "'t3'" in str(e.value) and "model.safetensors.index.json" in str(e.value)


@pytest.mark.parametrize("text,match", [
    ("{not json", "not valid JSON"),
    ('{"metadata": {}}', "weight_map"),
    ('{"weight_map": []}', "weight_map"),
    ('{"weight_map": {"a": 3}}', "not a file name"),
    ('{"weight_map": {"a": "../outside.safetensors"}}', "outside the checkpoint"),
    ('{"weight_map": {"a": "/abs/model.safetensors"}}', "outside the checkpoint"),
])
def test_malformed_index(tmp_path, text, match):
    (tmp_path / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CheckpointIndexError, match=match):
        Checkpoint(tmp_path)


def test_index_and_shard_disagree(tmp_path, rng):
    save_file({"a": _rand(rng, 3)}, str(tmp_path / "s1.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "s1.safetensors",
                                                                                     "b": "s1.safetensors"}}))
    with Checkpoint(tmp_path) as ckpt:
        assert ckpt.read("a").shape == (3,)
        with pytest.raises(CheckpointIndexError, match=r"'b'.*s1\.safetensors.*does not hold it"):
            ckpt.read("b")


def test_duplicate_tensor_across_files_without_index(tmp_path, rng):
    save_file({"a": _rand(rng, 3)}, str(tmp_path / "x.safetensors"))
    save_file({"a": _rand(rng, 3)}, str(tmp_path / "y.safetensors"))
    with pytest.raises(CorruptFileError, match=r"'a'.*x\.safetensors.*y\.safetensors"):
        Checkpoint(tmp_path)


# ---- truncated and corrupt files ----------------------------------------------------------------------

def test_truncated_single_file_fails_at_open(tmp_path, rng):
    f = _single(tmp_path, {"a": _rand(rng, 64, 64), "b": _rand(rng, 64, 64)})
    os.truncate(f, f.stat().st_size - 100)
    with pytest.raises(TruncatedFileError) as e:
        Checkpoint(tmp_path)
    assert str(f) in str(e.value) and "'b'" in str(e.value) and "truncated" in str(e.value)


def test_truncated_shard_fails_before_mmap(tmp_path, rng):
    write_checkpoint(tmp_path, {f"t{i}": _rand(rng, 32, 32) for i in range(4)}, max_shard_bytes=4096)
    shard = tmp_path / json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]["t2"]
    os.truncate(shard, shard.stat().st_size - 1)
    with Checkpoint(tmp_path) as ckpt:  # the index lists it; the shard is only opened on use
        assert ckpt.read("t0").shape == (32, 32)
        with pytest.raises(TruncatedFileError, match=str(shard.name)):
            ckpt.read("t2")
        with pytest.raises(TruncatedFileError):
            ckpt.info("t2")
        assert shard not in ckpt._handles  # never handed to safe_open


@pytest.mark.parametrize("damage,err,match", [
    (lambda b: b[:5], TruncatedFileError, "too short"),
    (lambda b: struct.pack("<Q", 2**40) + b[8:], CorruptFileError, "not a safetensors file"),
    (lambda b: struct.pack("<Q", len(b)) + b[8:], TruncatedFileError, "does not fit"),
    (lambda b: b[:8] + b"[" + b[9:], CorruptFileError, "not valid JSON"),
])
def test_damaged_header(tmp_path, rng, damage, err, match):
    f = _single(tmp_path, {"a": _rand(rng, 4, 4)})
    f.write_bytes(damage(f.read_bytes()))
    with pytest.raises(err, match=match) as e:
        Checkpoint(f)
    assert str(f) in str(e.value)


def _raw_safetensors(path, header: dict, data: bytes):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("entry,err,match", [
    ({"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}, CorruptFileError, "needs 16 bytes"),
    ({"dtype": "F32", "shape": [2, -2], "data_offsets": [0, 16]}, CorruptFileError, "malformed shape"),
    ({"dtype": "F32", "shape": [2, 2], "data_offsets": [16, 0]}, CorruptFileError, "malformed data_offsets"),
    ({"dtype": "Q9", "shape": [2, 2], "data_offsets": [0, 16]}, TensorDTypeError, "'Q9'"),
])
def test_malformed_header_entry(tmp_path, entry, err, match):
    _raw_safetensors(tmp_path / "w.safetensors", {"t": entry}, bytes(16))
    with pytest.raises(err, match=match) as e:
        read_header(tmp_path / "w.safetensors")
    assert "'t'" in str(e.value) and "w.safetensors" in str(e.value)


# ---- shapes and dtypes --------------------------------------------------------------------------------

def test_wrong_shape_and_dtype(tmp_path, rng):
    f = _single(tmp_path, {"m.weight": _rand(rng, 6, 10, dtype=torch.bfloat16), "v.weight": _rand(rng, 5)})
    with Checkpoint(tmp_path) as ckpt:
        with pytest.raises(TensorShapeError, match=r"'m\.weight' has shape \[6, 10\], expected \[6, 12\]") as e:
            ckpt.read("m.weight", shape=(6, 12))
        assert str(f) in str(e.value) and isinstance(e.value, ShapeError)
        assert ckpt.read("m.weight", shape=(6, None)).shape == (6, 10)
        with pytest.raises(TensorShapeError, match=r"matrix 'm' has shape \[6, 10\], expected \[10, 6\]"):
            ckpt.read_matrix("m", shape=(10, 6))
        with pytest.raises(TensorDTypeError, match=r"'m\.weight' has dtype BF16, expected F32") as e:
            ckpt.read("m.weight", dtype=torch.float32)
        assert isinstance(e.value, DTypeError)
        with pytest.raises(TensorShapeError, match=r"'v\.weight' has shape \[5\], expected a 2-D"):
            ckpt.read_matrix("v")


def test_matrix_with_unsupported_dtype(tmp_path, rng):
    _single(tmp_path, {"q.weight": torch.from_numpy(rng.integers(-127, 128, size=(4, 8), dtype=np.int8))})
    with Checkpoint(tmp_path) as ckpt, pytest.raises(TensorDTypeError, match=r"'q\.weight' has dtype I8"):
        ckpt.read_matrix("q")


def test_fp8_scale_missing_or_misshapen(tmp_path, rng):
    w8 = _rand(rng, 200, 130).to(torch.float8_e4m3fn)
    _single(tmp_path, {"a.weight": w8, "b.weight": w8.clone(), "b.weight_scale_inv": torch.ones(1, 2),
                       "c.weight": w8.clone(), "c.weight_scale": torch.ones(200, 1),
                       "d.weight": w8.clone(), "d.weight_scale_inv": torch.ones(2, 2, dtype=torch.int32)})
    with Checkpoint(tmp_path) as ckpt:
        with pytest.raises(MissingTensorError, match=r"FP8 block scale 'a\.weight_scale_inv'"):
            ckpt.read_matrix("a")
        with pytest.raises(TensorShapeError, match=r"'b\.weight_scale_inv' has shape \[1, 2\], expected \[2, 2\]"):
            ckpt.read_matrix("b")
        with pytest.raises(QuantizedLayoutError, match="per-tensor/per-channel"):
            ckpt.read_matrix("c")
        with pytest.raises(TensorDTypeError, match=r"'d\.weight_scale_inv' has dtype I32"):
            ckpt.read_matrix("d")


def test_scale_next_to_float_weight_is_refused(tmp_path, rng):
    _single(tmp_path, {"a.weight": _rand(rng, 4, 4), "a.weight_scale_inv": torch.ones(1, 1)})
    with Checkpoint(tmp_path) as ckpt, pytest.raises(QuantizedLayoutError, match="takes no scale"):
        ckpt.read_matrix("a")


# ---- inconsistent packed int4 ------------------------------------------------------------------------

def test_int4_weight_shape_disagrees_with_packed(tmp_path, rng):
    t = _int4(rng, 8, 64)
    t["p.weight_shape"] = torch.tensor([8, 128], dtype=torch.int32)  # packed holds 64 columns, not 128
    f = _single(tmp_path, t)
    with Checkpoint(tmp_path) as ckpt, pytest.raises(QuantizedLayoutError) as e:
        ckpt.read_matrix("p")
    msg = str(e.value)
    assert str(f) in msg and "weight_shape [8, 128]" in msg and "[8, 16]" in msg and "[8, 8]" in msg
    assert isinstance(e.value, FormatError)


@pytest.mark.parametrize("change,err,match", [
    (lambda t: t.update({"p.weight_scale": t["p.weight_scale"][:4]}), QuantizedLayoutError, r"expected \[8, groups\]"),
    (lambda t: t.update({"p.weight_scale": torch.ones(8, 3)}), QuantizedLayoutError, "match no supported group"),
    (lambda t: t.update({"p.weight_shape": torch.tensor([8, 64, 1], dtype=torch.int32)}), TensorShapeError, "weight_shape"),
    (lambda t: t.update({"p.weight_shape": torch.tensor([0, 64], dtype=torch.int32)}), QuantizedLayoutError, "not a positive"),
    (lambda t: t.update({"p.weight_packed": t["p.weight_packed"].to(torch.int64)}), TensorDTypeError, "weight_packed"),
    (lambda t: t.pop("p.weight_shape"), MissingTensorError, r"companion tensor 'p\.weight_shape'"),
    (lambda t: t.pop("p.weight_scale"), MissingTensorError, r"companion tensor 'p\.weight_scale'"),
    (lambda t: t.update({"p.weight_zero_point": torch.zeros(8, 2, dtype=torch.int32)}), QuantizedLayoutError, "zero point"),
])
def test_int4_inconsistencies(tmp_path, rng, change, err, match):
    t = _int4(rng, 8, 64)
    change(t)
    _single(tmp_path, t)
    with Checkpoint(tmp_path) as ckpt, pytest.raises(err, match=match) as e:
        ckpt.read_matrix("p")
    assert "model.safetensors" in str(e.value)


def test_int4_group_size_hint_must_fit(tmp_path, rng):
    _single(tmp_path, _int4(rng, 8, 256, group=32))
    with Checkpoint(tmp_path) as ckpt:
        assert ckpt.matrix_format("p").name == "int4_g32"
        with pytest.raises(QuantizedLayoutError, match="group size 64"):
            ckpt.read_matrix("p", group_size=64)


def test_writer_refuses_formats_without_a_convention(rng):
    with pytest.raises(FormatError, match="int8"):
        matrix_tensors("x", quantize(_rand(rng, 4, 8), "int8"))


# ---- fused tensors ------------------------------------------------------------------------------------

def test_fused_errors(tmp_path, rng):
    _single(tmp_path, {"gu": _rand(rng, 3, 8, 5), "odd": _rand(rng, 3, 7, 5), "flat": _rand(rng, 8, 5),
                       "f8": _rand(rng, 3, 8, 5).to(torch.float8_e4m3fn)})
    with Checkpoint(tmp_path) as ckpt:
        with pytest.raises(ExpertIdError, match=r"'gu' holds experts 0\.\.2, asked for 3"):
            ckpt.read_fused_gate_up("gu", 3)
        with pytest.raises(ExpertIdError):
            ckpt.read_fused_matrix("gu", -1)
        with pytest.raises(TensorShapeError, match=r"expected fused \[E, 2I, H\]"):
            ckpt.read_fused_gate_up("odd", 0)
        with pytest.raises(TensorShapeError, match="expected fused"):
            ckpt.read_fused_matrix("flat", 0)
        with pytest.raises(TensorShapeError, match=r"asked for \[4, 9\)"):
            ckpt.read_fused_matrix("gu", 0, rows=(4, 9))
        with pytest.raises(TensorShapeError, match="expected"):
            ckpt.read_fused_matrix("gu", 0, shape=(5, 8))
        with pytest.raises(TensorDTypeError, match="'f8'"):
            ckpt.read_fused_matrix("f8", 0)
        with pytest.raises(CheckpointError, match="bad index"):
            ckpt.read_slice("gu", (0, 0, 0, 0))


def test_dequantize_target_must_be_float(tmp_path, rng):
    _single(tmp_path, {"a.weight": _rand(rng, 4, 4)})
    with Checkpoint(tmp_path) as ckpt:
        with pytest.raises(DTypeError, match="dequantize"):
            ckpt.read_matrix("a", to=torch.int8)
        with pytest.raises(FormatError, match="unknown weight format"):
            ckpt.read_matrix("a", to="int3")


def test_int4_with_activation_order_is_refused(tmp_path, rng):
    t = _int4(rng, 8, 64)
    t["p.weight_g_idx"] = torch.zeros(64, dtype=torch.int32)
    _single(tmp_path, t)
    with Checkpoint(tmp_path) as ckpt, pytest.raises(QuantizedLayoutError, match="g_idx"):
        ckpt.read_matrix("p")


@pytest.mark.parametrize("offsets,extra,match", [
    ({"a": [0, 16], "b": [8, 24]}, 0, r"'b' overlaps"),
    ({"a": [0, 16], "b": [20, 36]}, 0, r"'b' leaves a gap"),
    ({"a": [0, 16], "b": [16, 32]}, 8, "8 bytes after the last tensor"),
])
def test_data_offsets_must_tile_the_file(tmp_path, offsets, extra, match):
    header = {k: {"dtype": "F32", "shape": [4], "data_offsets": v} for k, v in offsets.items()}
    end = max(v[1] for v in offsets.values())
    _raw_safetensors(tmp_path / "model.safetensors", header, bytes(end + extra))
    with pytest.raises(CorruptFileError, match=match):
        Checkpoint(tmp_path)


def test_bad_config_json(tmp_path, rng):
    _single(tmp_path, {"a": _rand(rng, 2)})
    (tmp_path / "config.json").write_text("{oops")
    with Checkpoint(tmp_path) as ckpt, pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        ckpt.config
