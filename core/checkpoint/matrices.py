"""Weight matrices on disk, both directions: recognise a matrix by the tensors next to `<base>.weight`,
read it as a moetier QuantizedTensor, and write a QuantizedTensor back in the checkpoint's own convention.

Conventions (PyTorch [out, in] orientation everywhere):
- plain:  `<base>.weight` bf16 / fp16 / fp32                                  -> format bf16 / fp16 / fp32
- FP8 block (DeepSeek-V3, Kimi-K2, MiniMax-M2, Qwen3-FP8): `<base>.weight` float8_e4m3fn [out, in]
  + `<base>.weight_scale_inv` fp32 [ceil(out/128), ceil(in/128)]; W[r, c] = w[r, c] * s[r // 128, c // 128]
  (a partial last block keeps the full 128 stride)                           -> format fp8_e4m3
- compressed-tensors INT4 pack-quantized (Kimi-K2-Thinking, Kimi-K2.5): `<base>.weight_packed` int32
  [out, ceil(in/8)] (element c of a row at bit 4c of the row's little-endian bit stream, stored q+8),
  `<base>.weight_scale` bf16/fp32 [out, ceil(in/group)], `<base>.weight_shape` int32 [2] = [out, in];
  symmetric (no zero point)                                                  -> format int4_g<group>
  The bit stream of a little-endian int32 row is exactly moetier's int4 byte layout (low nibble = even
  column, q+8), so the conversion is a byte view plus dropping the padding.
- fused experts (Qwen3.5 on disk, transformers 5 in memory): `gate_up_proj` [E, 2I, H] (gate rows first,
  then up) and `down_proj` [E, H, I], float only; one expert is read with safetensors' get_slice.
- fused MXFP4 experts (gpt-oss as shipped): `<name>_blocks` uint8 [E, out, in/32, 16] (two e2m1 codes a
  byte, low nibble = even element) and `<name>_scales` uint8 [E, out, in/32] (e8m0, bias 127) next to
  where a float `<name>` would be, rows in [out, in] orientation (transformers dequantizes them, then
  transposes to its x @ W layout)                                             -> format mxfp4
  The bytes of one expert's rows are moetier's mxfp4 layout as they are: no conversion.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import DTypeError, ExpertIdError, FormatError
from ..formats import FORMATS, FP8_BLOCK, INT4_GROUP_SIZES, QuantizedTensor, WeightFormat, convert, dequantize, get_format
from ..mxfp4 import BLOCK as MX_BLOCK
from .errors import QuantizedLayoutError, TensorDTypeError, TensorShapeError
from .header import dtype_name

WEIGHT = "weight"
FP8_SCALE = "weight_scale_inv"
INT4_PACKED = "weight_packed"
INT4_SCALE = "weight_scale"
INT4_SHAPE = "weight_shape"
INT4_ZERO_POINT = "weight_zero_point"
INT4_G_IDX = "weight_g_idx"
MX_BLOCKS = "_blocks"
MX_SCALES = "_scales"

FLOAT_FORMATS: dict[torch.dtype, str] = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# Scales are widened to fp32 exactly; e8m0 (powers of two) is how some FP8 exports store block scales.
SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16) + (
    (torch.float8_e8m0fnu,) if hasattr(torch, "float8_e8m0fnu") else ())

Target = torch.dtype | str | WeightFormat | None


@dataclass(frozen=True)
class MatrixOnDisk:
    """Where matrix `base` lives: its native format, logical [out, in] shape, and tensor names."""

    base: str
    fmt: WeightFormat
    shape: tuple[int, int]
    data: str
    scales: str | None = None


def _n(base: str, suffix: str) -> str:
    return f"{base}.{suffix}"


def detect_matrix(ckpt, base: str, *, group_size: int | None = None) -> MatrixOnDisk:
    """Recognise matrix `base` from the tensors present next to it (headers only, plus int4's weight_shape)."""
    if _n(base, INT4_PACKED) in ckpt:
        return _detect_int4(ckpt, base, group_size)
    name = _n(base, WEIGHT)
    if name not in ckpt:
        raise ckpt.missing(name, note=f"matrix {base!r} has neither .{WEIGHT} nor .{INT4_PACKED}")
    info = ckpt.info(name)
    if len(info.shape) != 2:
        raise TensorShapeError(f"{info.file}: tensor {name!r} has shape {list(info.shape)}, expected a 2-D [out, in] matrix")
    out_f, in_f = info.shape
    if info.dtype == torch.float8_e4m3fn:
        scale = _n(base, FP8_SCALE)
        if scale not in ckpt:
            if _n(base, INT4_SCALE) in ckpt:
                raise QuantizedLayoutError(f"{info.file}: {name!r} is FP8 with a per-tensor/per-channel "
                                           f"{INT4_SCALE!r}; only 128x128 block scales ({FP8_SCALE!r}) are supported")
            raise ckpt.missing(scale, "FP8 block scale")
        ckpt.check(scale, shape=(math.ceil(out_f / FP8_BLOCK), math.ceil(in_f / FP8_BLOCK)), dtype=SCALE_DTYPES)
        return MatrixOnDisk(base, FORMATS["fp8_e4m3"], (out_f, in_f), name, scale)
    if info.dtype in FLOAT_FORMATS:
        for suffix in (FP8_SCALE, INT4_SCALE):
            if _n(base, suffix) in ckpt:
                raise QuantizedLayoutError(f"{info.file}: {name!r} is {dtype_name(info.dtype)} but {_n(base, suffix)!r} "
                                           "sits next to it; a float weight takes no scale")
        return MatrixOnDisk(base, FORMATS[FLOAT_FORMATS[info.dtype]], (out_f, in_f), name)
    raise TensorDTypeError(f"{info.file}: tensor {name!r} has dtype {dtype_name(info.dtype)}; a matrix weight must be "
                           f"BF16, F16, F32, or F8_E4M3 with {FP8_SCALE}")


def _detect_int4(ckpt, base: str, group_size: int | None) -> MatrixOnDisk:
    packed_name = _n(base, INT4_PACKED)
    packed = ckpt.check(packed_name, dtype=torch.int32)
    for suffix in (INT4_SCALE, INT4_SHAPE):
        if _n(base, suffix) not in ckpt:
            raise ckpt.missing(_n(base, suffix), "INT4 companion tensor")
    if _n(base, INT4_ZERO_POINT) in ckpt:
        raise QuantizedLayoutError(f"{ckpt.file_of(packed_name)}: {base!r} has {INT4_ZERO_POINT!r}; only symmetric "
                                   "INT4 (no zero point) is supported")
    if _n(base, INT4_G_IDX) in ckpt:
        raise QuantizedLayoutError(f"{ckpt.file_of(packed_name)}: {base!r} has {INT4_G_IDX!r} (activation-ordered "
                                   "groups); only contiguous groups along the input dimension are supported")
    shape_name = _n(base, INT4_SHAPE)
    ckpt.check(shape_name, shape=(2,), dtype=(torch.int32, torch.int64))
    out_f, in_f = (int(v) for v in ckpt.read(shape_name).tolist())
    where = f"{packed.file}: {base!r}"
    if out_f < 1 or in_f < 1:
        raise QuantizedLayoutError(f"{where}: {INT4_SHAPE} is [{out_f}, {in_f}], not a positive [out, in]")
    want = (out_f, math.ceil(in_f / 8))
    if packed.shape != want:
        raise QuantizedLayoutError(f"{where}: {INT4_SHAPE} [{out_f}, {in_f}] needs {INT4_PACKED} of shape {list(want)} "
                                   f"(8 values per int32), got {list(packed.shape)}")
    scale = ckpt.check(_n(base, INT4_SCALE), dtype=SCALE_DTYPES)
    if len(scale.shape) != 2 or scale.shape[0] != out_f:
        raise QuantizedLayoutError(f"{where}: {INT4_SCALE} has shape {list(scale.shape)}, expected [{out_f}, groups]")
    g = infer_group_size(in_f, scale.shape[1], group_size, where)
    return MatrixOnDisk(base, FORMATS[f"int4_g{g}"], (out_f, in_f), packed_name, scale.name)


def infer_group_size(in_f: int, n_groups: int, hint: int | None = None, where: str = "") -> int:
    """The int4 group size that gives `n_groups` scales per row of `in_f` values (hint wins if consistent)."""
    if hint is not None:
        if hint not in INT4_GROUP_SIZES or math.ceil(in_f / hint) != n_groups:
            raise QuantizedLayoutError(f"{where}: group size {hint} does not give {n_groups} scale columns for "
                                       f"{in_f} inputs (supported sizes {INT4_GROUP_SIZES})")
        return hint
    if n_groups >= 1 and in_f % n_groups == 0 and in_f // n_groups in INT4_GROUP_SIZES:
        return in_f // n_groups
    fits = [g for g in INT4_GROUP_SIZES if math.ceil(in_f / g) == n_groups]
    if len(fits) == 1:
        return fits[0]
    if not fits:
        raise QuantizedLayoutError(f"{where}: {n_groups} scale columns for {in_f} inputs match no supported group "
                                   f"size {INT4_GROUP_SIZES}")
    raise QuantizedLayoutError(f"{where}: {n_groups} scale columns for {in_f} inputs fit group sizes {fits}; "
                               "pass group_size (from quantization_config)")


def read_matrix(ckpt, base: str, *, shape: Sequence[int | None] | None = None, to: Target = None,
                group_size: int | None = None) -> QuantizedTensor:
    """Matrix `base` in its native format, or converted as `to` asks (see `convert_to`)."""
    m = detect_matrix(ckpt, base, group_size=group_size)
    if shape is not None:
        if len(shape) != 2 or any(w is not None and a != w for a, w in zip(m.shape, shape)):
            raise TensorShapeError(f"{ckpt.file_of(m.data)}: matrix {base!r} has shape {list(m.shape)}, "
                                   f"expected {[('*' if d is None else d) for d in shape]}")
    data = ckpt.read(m.data)
    scales = ckpt.read(m.scales).to(torch.float32).contiguous() if m.scales else None
    if m.fmt.kind == "int4":
        data = int4_from_packed(data, m.shape[1])
    return convert_to(QuantizedTensor(m.fmt, m.shape, data, scales), to)


def read_fused_matrix(ckpt, name: str, expert: int, rows: tuple[int, int] | None = None, *,
                      shape: Sequence[int | None] | None = None, to: Target = None) -> QuantizedTensor:
    """Rows [r0, r1) of expert `expert` in a fused float [E, out, in] tensor, reading only those bytes."""
    info = ckpt.check(name, dtype=tuple(FLOAT_FORMATS))
    if len(info.shape) != 3:
        raise TensorShapeError(f"{info.file}: tensor {name!r} has shape {list(info.shape)}, expected fused [E, out, in]")
    n_exp, n_rows, n_cols = info.shape
    if not (isinstance(expert, int) and 0 <= expert < n_exp):
        raise ExpertIdError(f"{info.file}: tensor {name!r} holds experts 0..{n_exp - 1}, asked for {expert!r}")
    r0, r1 = rows if rows is not None else (0, n_rows)
    if not 0 <= r0 < r1 <= n_rows:
        raise TensorShapeError(f"{info.file}: tensor {name!r} has {n_rows} rows per expert, asked for [{r0}, {r1})")
    if shape is not None and (len(shape) != 2 or any(w is not None and a != w for a, w in zip((r1 - r0, n_cols), shape))):
        raise TensorShapeError(f"{info.file}: expert {expert} of {name!r} is [{r1 - r0}, {n_cols}], expected {list(shape)}")
    data = ckpt.read_slice(name, (expert, slice(r0, r1)))
    return convert_to(QuantizedTensor(FORMATS[FLOAT_FORMATS[info.dtype]], (r1 - r0, n_cols), data.contiguous()), to)


def read_fused_gate_up(ckpt, name: str, expert: int, *, to: Target = None) -> tuple[QuantizedTensor, QuantizedTensor]:
    """(gate, up) of one expert from a fused [E, 2I, H] gate_up_proj: gate is rows 0..I-1, up rows I..2I-1."""
    info = ckpt.info(name)
    if len(info.shape) != 3 or info.shape[1] % 2:
        raise TensorShapeError(f"{info.file}: tensor {name!r} has shape {list(info.shape)}, expected fused [E, 2I, H]")
    i = info.shape[1] // 2
    return (read_fused_matrix(ckpt, name, expert, (0, i), to=to),
            read_fused_matrix(ckpt, name, expert, (i, 2 * i), to=to))


def fused_is_mxfp4(ckpt, name: str) -> bool:
    """Whether the fused expert tensor `name` is stored as MXFP4 `<name>_blocks` / `<name>_scales`."""
    return name + MX_BLOCKS in ckpt and name not in ckpt


def check_fused_mxfp4(ckpt, name: str, shape: tuple[int, int, int]) -> None:
    """The MXFP4 blocks and scales of fused [E, out, in] tensor `name` against `shape`, from the headers."""
    E, out_f, in_f = shape
    if in_f % MX_BLOCK:
        raise QuantizedLayoutError(f"{ckpt.file_of(name + MX_BLOCKS)}: {name!r} is MXFP4 but its rows of {in_f} values "
                                   f"are not whole blocks of {MX_BLOCK}")
    ckpt.check(name + MX_BLOCKS, shape=(E, out_f, in_f // MX_BLOCK, MX_BLOCK // 2), dtype=torch.uint8)
    if name + MX_SCALES not in ckpt:
        raise ckpt.missing(name + MX_SCALES, "MXFP4 scale tensor")
    ckpt.check(name + MX_SCALES, shape=(E, out_f, in_f // MX_BLOCK), dtype=torch.uint8)


def read_fused_mxfp4(ckpt, name: str, expert: int, rows: slice = slice(None), *, to: Target = None) -> QuantizedTensor:
    """Rows `rows` of expert `expert` of the MXFP4 fused tensor `name`, reading that expert's bytes only
    (gpt-oss's gate and up are the even and odd rows of gate_up_proj)."""
    info = ckpt.check(name + MX_BLOCKS, dtype=torch.uint8)
    if len(info.shape) != 4 or info.shape[3] != MX_BLOCK // 2:
        raise TensorShapeError(f"{info.file}: tensor {info.name!r} has shape {list(info.shape)}, expected MXFP4 "
                               f"blocks [E, out, in/{MX_BLOCK}, {MX_BLOCK // 2}]")
    n_exp, out_f, groups, _ = info.shape
    check_fused_mxfp4(ckpt, name, (n_exp, out_f, groups * MX_BLOCK))
    if not (isinstance(expert, int) and 0 <= expert < n_exp):
        raise ExpertIdError(f"{info.file}: tensor {info.name!r} holds experts 0..{n_exp - 1}, asked for {expert!r}")
    codes = ckpt.read_slice(name + MX_BLOCKS, (expert,))[rows].reshape(-1, groups * MX_BLOCK // 2)
    scales = ckpt.read_slice(name + MX_SCALES, (expert,))[rows]
    q = QuantizedTensor(FORMATS["mxfp4"], (codes.shape[0], groups * MX_BLOCK), codes.contiguous(), scales.contiguous())
    return convert_to(q, to)


def mxfp4_fused_tensors(name: str, mats) -> dict[str, torch.Tensor]:
    """`<name>_blocks` [E, out, in/32, 16] and `<name>_scales` [E, out, in/32] for mxfp4 matrices [out, in]."""
    for q in mats:
        if q.fmt.kind != "mxfp4":
            raise FormatError(f"{name}: expected mxfp4 matrices, got {q.fmt}")
    blocks = torch.stack([q.data.reshape(q.shape[0], -1, MX_BLOCK // 2) for q in mats])
    return {name + MX_BLOCKS: blocks.contiguous(), name + MX_SCALES: torch.stack([q.scales for q in mats]).contiguous()}


# Conversions run over blocks of rows: the core's reference dequantize works in float64 on the whole
# matrix (several times its size in temporaries); per block the peak stays bounded and the result is
# identical, because every format's scales are row-local at 128-row granularity (fp8 blocks are 128 rows).
# About 1M elements (8 MiB of float64) per block: bounds the temporaries, keeps per-op overhead small.
BLOCK_ELEMENTS = 1 << 20


def convert_to(q: QuantizedTensor, to: Target) -> QuantizedTensor:
    """`q` as asked: None keeps the native format; a float torch dtype dequantizes to that dtype; a format
    name or WeightFormat converts through the core's reference dequantize + quantize (same result as
    moetier.formats.convert, computed block of rows by block of rows)."""
    if to is None:
        return q
    if isinstance(to, torch.dtype):
        if to not in FLOAT_FORMATS:
            raise DTypeError(f"can only dequantize to {', '.join(str(d) for d in FLOAT_FORMATS)}, not {to}")
        fmt = FORMATS[FLOAT_FORMATS[to]]
        if q.fmt == fmt:
            return q
        out = torch.empty(q.shape, dtype=to)
        for r0, r1, part in _row_blocks(q):
            out[r0:r1] = dequantize(part, to)
        return QuantizedTensor(fmt, q.shape, out)
    fmt = get_format(to)
    if q.fmt == fmt:
        return q
    parts = [convert(part, fmt) for _, _, part in _row_blocks(q)]
    scales = None if parts[0].scales is None else torch.cat([p.scales for p in parts])
    return QuantizedTensor(fmt, q.shape, torch.cat([p.data for p in parts]), scales)


def _row_blocks(q: QuantizedTensor):
    out_f, in_f = q.shape
    rows = max(FP8_BLOCK, BLOCK_ELEMENTS // in_f // FP8_BLOCK * FP8_BLOCK)
    for r0 in range(0, out_f, rows):
        r1 = min(r0 + rows, out_f)
        if q.scales is None:
            scales = None
        elif q.fmt.kind == "fp8":
            scales = q.scales[r0 // FP8_BLOCK: math.ceil(r1 / FP8_BLOCK)]
        else:
            scales = q.scales[r0:r1]
        yield r0, r1, QuantizedTensor(q.fmt, (r1 - r0, in_f), q.data[r0:r1], scales)


def int4_from_packed(packed: torch.Tensor, in_f: int) -> torch.Tensor:
    """compressed-tensors int32 [out, ceil(in/8)] -> moetier uint8 [out, ceil(in/2)] (a byte view)."""
    le = np.ascontiguousarray(packed.numpy()).astype("<i4", copy=False)  # the bit stream is little-endian
    data = torch.from_numpy(le.view(np.uint8).reshape(packed.shape[0], -1)[:, : (in_f + 1) // 2].copy())
    if in_f % 2:
        # The unused high nibble of an odd row: compressed-tensors pads with 0, moetier with code 0 (stored 8).
        data[:, -1] = (data[:, -1] & 0x0F) | 0x80
    return data


def int4_to_packed(data: torch.Tensor, in_f: int) -> torch.Tensor:
    """moetier uint8 [out, ceil(in/2)] -> compressed-tensors int32 [out, ceil(in/8)], padding nibbles 0."""
    out_f = data.shape[0]
    words = math.ceil(in_f / 8)
    buf = np.zeros((out_f, 4 * words), dtype=np.uint8)
    buf[:, : data.shape[1]] = data.numpy()
    if in_f % 2:
        buf[:, data.shape[1] - 1] &= 0x0F
    return torch.from_numpy(buf.view("<i4").astype(np.int32))


def matrix_tensors(base: str, q: QuantizedTensor, *, scale_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The tensors that store `q` under `base` in the checkpoint convention of its format (see module doc).

    scale_dtype: dtype of the scales written (Kimi ships INT4 scales in bfloat16; rounding them is then
    the caller's choice, and what is read back is what was written)."""
    out_f, in_f = q.shape
    if q.fmt.kind == "float":
        return {_n(base, WEIGHT): q.data.contiguous()}
    if q.fmt.kind == "fp8":
        return {_n(base, WEIGHT): q.data.contiguous(), _n(base, FP8_SCALE): q.scales.to(scale_dtype).contiguous()}
    if q.fmt.kind == "int4":
        return {_n(base, INT4_PACKED): int4_to_packed(q.data, in_f),
                _n(base, INT4_SCALE): q.scales.to(scale_dtype).contiguous(),
                _n(base, INT4_SHAPE): torch.tensor([out_f, in_f], dtype=torch.int32)}
    raise FormatError(f"format {q.fmt} has no checkpoint convention here (plain float, fp8_e4m3 and int4 do)")


def fused_expert_tensors(prefix: str, gate: Sequence[torch.Tensor], up: Sequence[torch.Tensor],
                         down: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """`<prefix>.gate_up_proj` [E, 2I, H] (gate rows, then up rows) and `<prefix>.down_proj` [E, H, I]."""
    gate_up = torch.stack([torch.cat([g, u], dim=0) for g, u in zip(gate, up, strict=True)])
    return {f"{prefix}.gate_up_proj": gate_up.contiguous(), f"{prefix}.down_proj": torch.stack(list(down)).contiguous()}
