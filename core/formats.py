"""Weight formats: one reference quantize and dequantize per format, used by every backend and test.

A quantized matrix is always stored in PyTorch's [out, in] orientation. Scales multiply (they are what
checkpoints call `weight_scale_inv`, the inverse of the quantization factor). Packed layouts depend on
the matrix alone, never on the thread or NUMA count of the machine that made them.

Block formats keep other projects' storage byte for byte, so their files are computed without conversion:
the GGUF types q8_0, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k, q4_k, q5_k, q6_k, iq4_nl, iq4_xs (llama.cpp's block
structs; see `ggml_blocks`) and mxfp4
(OCP microscaling as gpt-oss ships it; see `mxfp4`). Their rows are whole blocks: `in` must be a multiple
of the block size (32, or 256 for the K-quants), and any other shape is refused with a FormatError.

A layer's experts may keep gate/up in one format and down in another, as llama.cpp's Q4_K_M files do
(ffn_down in Q6_K where its "use_more_bits" rule says so): the mixed format "q4_k+q6_k" names both
(`gate_up`, `down`), so a layer still has one format value. A matrix is always in a plain format.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from . import ggml_blocks, mxfp4
from .errors import DTypeError, FormatError, NonFiniteError, ShapeError

FP8_BLOCK = 128
FP8_E4M3_MAX = 448.0
INT4_GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class WeightFormat:
    """One storage format of expert weights.

    kind: "float" (bf16/fp16/fp32), "int8" (symmetric per output row), "int4" (symmetric groups along the
    input dimension, two values per byte, low nibble first, stored as q+8), "fp8" (e4m3 with 128x128
    block scales: the DeepSeek-V3 / Kimi-K2 / MiniMax-M2 shipping format), "gguf" (llama.cpp blocks of
    `block_size` values in `block_bytes` bytes, scales inside the blocks), "mxfp4" (blocks of 32 e2m1
    values plus one e8m0 scale byte each, codes and scales in separate arrays).
    """

    name: str
    kind: str
    dtype: torch.dtype | None = None  # float formats: the storage dtype
    group_size: int | None = None  # int4: elements per scale along the input dimension
    block: tuple[int, int] | None = None  # fp8: (rows, cols) per scale
    block_size: int | None = None  # gguf / mxfp4: values per block along the input dimension
    block_bytes: int | None = None  # gguf / mxfp4: bytes per block, scales included
    split: tuple[WeightFormat, WeightFormat] | None = None  # kind "mixed": (gate/up format, down format)

    def __str__(self) -> str:
        return self.name

    @property
    def gate_up(self) -> WeightFormat:
        """The format of the gate and up matrices (the format itself unless it is mixed)."""
        return self.split[0] if self.split else self

    @property
    def down(self) -> WeightFormat:
        """The format of the down matrix (the format itself unless it is mixed)."""
        return self.split[1] if self.split else self

    @property
    def parts(self) -> tuple[WeightFormat, ...]:
        """The plain formats a layer in this format computes: (gate/up, down) when mixed, else (self,)."""
        return self.split or (self,)

    def check_in_features(self, in_features: int) -> None:
        """FormatError unless a row of `in_features` values is whole blocks (block formats only; a mixed
        format: in each of its parts)."""
        for p in self.split or ():
            p.check_in_features(in_features)
        if self.block_size is not None and in_features % self.block_size:
            origin = "GGUF" if self.kind == "gguf" else "MXFP4"
            raise FormatError(f"format {self.name} stores rows as whole blocks of {self.block_size} values ({origin} "
                              f"requires in_features % {self.block_size} == 0); got in_features={in_features}")

    def nbytes(self, out_features: int, in_features: int) -> int:
        """Bytes one [out, in] matrix occupies in this format, scales included."""
        n = out_features * in_features
        if self.kind == "float":
            return n * torch.empty((), dtype=self.dtype).element_size()
        if self.kind == "int8":
            return n + 4 * out_features
        if self.kind == "int4":
            return out_features * ((in_features + 1) // 2) + 4 * out_features * math.ceil(in_features / self.group_size)
        if self.kind == "fp8":
            return n + 4 * math.ceil(out_features / FP8_BLOCK) * math.ceil(in_features / FP8_BLOCK)
        if self.kind in ("gguf", "mxfp4"):
            self.check_in_features(in_features)
            return out_features * (in_features // self.block_size) * self.block_bytes
        if self.kind == "mixed":
            raise FormatError(f"format {self.name} is a layer's gate/up and down formats; a single matrix is in one "
                              f"of them ({self.gate_up} or {self.down})")
        raise FormatError(f"unknown format kind {self.kind!r}")

    def expert_nbytes(self, hidden: int, intermediate: int) -> int:
        """Bytes of one expert's three matrices (gate and up [I, H], down [H, I]) in this format."""
        return 2 * self.gate_up.nbytes(intermediate, hidden) + self.down.nbytes(hidden, intermediate)


FORMATS: dict[str, WeightFormat] = {
    "fp32": WeightFormat("fp32", "float", dtype=torch.float32),
    "bf16": WeightFormat("bf16", "float", dtype=torch.bfloat16),
    "fp16": WeightFormat("fp16", "float", dtype=torch.float16),
    "int8": WeightFormat("int8", "int8"),
    **{f"int4_g{g}": WeightFormat(f"int4_g{g}", "int4", group_size=g) for g in INT4_GROUP_SIZES},
    "fp8_e4m3": WeightFormat("fp8_e4m3", "fp8", block=(FP8_BLOCK, FP8_BLOCK)),
    **{b.name: WeightFormat(b.name, "gguf", block_size=b.block_size, block_bytes=b.type_size)
       for b in ggml_blocks.BLOCK_TYPES.values()},
    "mxfp4": WeightFormat("mxfp4", "mxfp4", block_size=mxfp4.BLOCK, block_bytes=mxfp4.BLOCK // 2 + 1),
}


MIXED_SEP = "+"


def get_format(fmt: str | WeightFormat) -> WeightFormat:
    """The format named `fmt` (or `fmt` itself): a name of FORMATS, or a mixed "GATEUP+DOWN" (see
    `mixed_format`). FormatError lists the known names otherwise."""
    if isinstance(fmt, WeightFormat):
        return fmt
    if isinstance(fmt, str) and MIXED_SEP in fmt:
        parts = fmt.split(MIXED_SEP)
        if len(parts) != 2 or not all(p in FORMATS for p in parts):
            raise FormatError(f"mixed weight format {fmt!r}: write it GATEUP{MIXED_SEP}DOWN, two expert formats (the "
                              f"gate/up one, then the down one, e.g. q4_k{MIXED_SEP}q6_k) of: {', '.join(FORMATS)}")
        return mixed_format(FORMATS[parts[0]], FORMATS[parts[1]])
    try:
        return FORMATS[fmt]
    except (KeyError, TypeError):
        raise FormatError(f"unknown weight format {fmt!r}; known formats: {', '.join(FORMATS)} (or a mixed "
                          f"GATEUP{MIXED_SEP}DOWN, e.g. q4_k{MIXED_SEP}q6_k)") from None


def mixed_format(gate_up: str | WeightFormat, down: str | WeightFormat) -> WeightFormat:
    """The format of a layer whose gate and up matrices are in `gate_up` and down in `down`; the plain
    format itself when both are the same. FormatError unless both are plain formats of FORMATS."""
    gu, dn = get_format(gate_up), get_format(down)
    for part in (gu, dn):
        if part.split is not None or FORMATS.get(part.name) != part:
            raise FormatError(f"mixed weight format {gu}{MIXED_SEP}{dn}: each part must be one expert format "
                              f"({', '.join(FORMATS)}), got {part.name!r}")
    if gu == dn:
        return gu
    return WeightFormat(f"{gu.name}{MIXED_SEP}{dn.name}", "mixed", split=(gu, dn))


def computes(declared: Iterable[str], fmt: str | WeightFormat, *, mixed: bool) -> bool:
    """Whether a backend declaring the plain formats `declared` computes `fmt`. A mixed format needs a backend
    that computes each projection in its own format (`mixed`) and declares both parts."""
    f = get_format(fmt)
    if f.split is not None and not mixed:
        return False
    names = set(declared)
    return all(p.name in names for p in f.parts)


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """A [out, in] weight matrix in one format.

    data: float formats: the matrix in `fmt.dtype`; int8: int8 [out, in]; int4: uint8 [out, ceil(in/2)];
    fp8: torch.float8_e4m3fn [out, in]; gguf: uint8 [out, in/block_size * block_bytes], each row its
    blocks' raw bytes; mxfp4: uint8 [out, in/2] e2m1 codes.
    scales (fp32): int8: [out]; int4: [out, ceil(in/group)]; fp8: [ceil(out/128), ceil(in/128)];
    mxfp4: uint8 e8m0 [out, in/32]; gguf: none (they sit inside the blocks).
    """

    fmt: WeightFormat
    shape: tuple[int, int]
    data: torch.Tensor
    scales: torch.Tensor | None = None

    def __post_init__(self):
        _check_layout(self)

    @property
    def nbytes(self) -> int:
        return self.fmt.nbytes(*self.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self, dtype)


def _scale_shape(fmt: WeightFormat, out_f: int, in_f: int) -> tuple[int, ...] | None:
    if fmt.kind == "int8":
        return (out_f,)
    if fmt.kind == "int4":
        return (out_f, math.ceil(in_f / fmt.group_size))
    if fmt.kind == "fp8":
        return (math.ceil(out_f / fmt.block[0]), math.ceil(in_f / fmt.block[1]))
    if fmt.kind == "mxfp4":
        return (out_f, in_f // mxfp4.BLOCK)
    return None


def _scale_dtype(fmt: WeightFormat) -> torch.dtype:
    return torch.uint8 if fmt.kind == "mxfp4" else torch.float32


def _data_spec(fmt: WeightFormat, out_f: int, in_f: int) -> tuple[tuple[int, int], torch.dtype]:
    if fmt.kind == "float":
        return (out_f, in_f), fmt.dtype
    if fmt.kind == "int8":
        return (out_f, in_f), torch.int8
    if fmt.kind == "int4":
        return (out_f, (in_f + 1) // 2), torch.uint8
    if fmt.kind == "gguf":
        return (out_f, in_f // fmt.block_size * fmt.block_bytes), torch.uint8
    if fmt.kind == "mxfp4":
        return (out_f, in_f // 2), torch.uint8
    return (out_f, in_f), torch.float8_e4m3fn


def _check_layout(q: QuantizedTensor) -> None:
    if q.fmt.split is not None:
        raise FormatError(f"a matrix is in one format, not the mixed {q.fmt} (its gate/up matrices are in {q.fmt.gate_up}, "
                          f"its down matrix in {q.fmt.down})")
    if len(q.shape) != 2 or min(q.shape) < 1:
        raise ShapeError(f"{q.fmt} tensor: logical shape must be [out, in] with positive sizes, got {q.shape}")
    q.fmt.check_in_features(q.shape[1])
    want_shape, want_dtype = _data_spec(q.fmt, *q.shape)
    if tuple(q.data.shape) != want_shape:
        raise ShapeError(f"{q.fmt} tensor of shape {q.shape}: data must be {list(want_shape)}, got {list(q.data.shape)}")
    if q.data.dtype != want_dtype:
        raise DTypeError(f"{q.fmt} tensor: data must be {want_dtype}, got {q.data.dtype}")
    want_scales = _scale_shape(q.fmt, *q.shape)
    if want_scales is None:
        if q.scales is not None:
            raise FormatError(f"{q.fmt} tensor takes no scales")
        return
    if q.scales is None:
        raise FormatError(f"{q.fmt} tensor needs scales of shape {list(want_scales)}")
    if tuple(q.scales.shape) != want_scales:
        raise ShapeError(f"{q.fmt} tensor of shape {q.shape}: scales must be {list(want_scales)}, got {list(q.scales.shape)}")
    if q.scales.dtype != _scale_dtype(q.fmt):
        raise DTypeError(f"{q.fmt} tensor: scales must be {_scale_dtype(q.fmt)}, got {q.scales.dtype}")


def _safe_scale(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    # An all-zero row or group gets scale 1: its codes are 0 and it dequantizes to exact zeros.
    return torch.where(amax > 0, amax / qmax, torch.ones_like(amax)).to(torch.float32)


def quantize(weight: torch.Tensor, fmt: str | WeightFormat) -> QuantizedTensor:
    """Quantize a float [out, in] matrix to `fmt` with the reference (round-to-nearest) scheme."""
    fmt = get_format(fmt)
    if fmt.split is not None:
        raise FormatError(f"a matrix is quantized to one format, not the mixed {fmt}: quantize gate/up to "
                          f"{fmt.gate_up} and down to {fmt.down}")
    if weight.ndim != 2:
        raise ShapeError(f"expected a 2-D [out, in] weight, got shape {list(weight.shape)}")
    if not weight.is_floating_point():
        raise DTypeError(f"expected a floating-point weight, got {weight.dtype}")
    fmt.check_in_features(weight.shape[1])
    if not torch.isfinite(weight).all():
        raise NonFiniteError("weight contains NaN or Inf; refusing to quantize it")
    out_f, in_f = weight.shape
    if fmt.kind == "float":  # no fp32 copy: a bf16 LM head of a large vocabulary is gigabytes in fp32
        return QuantizedTensor(fmt, (out_f, in_f), weight.detach().to(fmt.dtype).contiguous())
    w = weight.detach().to(torch.float32)
    if fmt.kind == "int8":
        scale = _safe_scale(w.abs().amax(dim=1), 127.0)
        q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
        return QuantizedTensor(fmt, (out_f, in_f), q.contiguous(), scale.contiguous())
    if fmt.kind == "int4":
        g = fmt.group_size
        n_groups = math.ceil(in_f / g)
        padded = torch.zeros(out_f, n_groups * g, dtype=torch.float32)
        padded[:, :in_f] = w
        grouped = padded.view(out_f, n_groups, g)
        scale = _safe_scale(grouped.abs().amax(dim=2), 7.0)
        q = torch.clamp(torch.round(grouped / scale[:, :, None]), -7, 7).view(out_f, -1)[:, :in_f]
        return QuantizedTensor(fmt, (out_f, in_f), pack_int4(q.to(torch.int8)), scale.contiguous())
    if fmt.kind == "fp8":
        br, bc = fmt.block
        sr, sc = math.ceil(out_f / br), math.ceil(in_f / bc)
        padded = torch.zeros(sr * br, sc * bc, dtype=torch.float32)
        padded[:out_f, :in_f] = w
        blocks = padded.view(sr, br, sc, bc)
        scale = _safe_scale(blocks.abs().amax(dim=(1, 3)), FP8_E4M3_MAX)
        scaled = w / _expand_blocks(scale, out_f, in_f, fmt.block)
        q = scaled.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
        return QuantizedTensor(fmt, (out_f, in_f), q.contiguous(), scale.contiguous())
    if fmt.kind == "gguf":
        return QuantizedTensor(fmt, (out_f, in_f), ggml_blocks.quantize_rows(fmt.name, w))
    if fmt.kind == "mxfp4":
        codes, scales = mxfp4.quantize(w)
        return QuantizedTensor(fmt, (out_f, in_f), codes, scales)
    raise FormatError(f"no quantizer for format {fmt}")


def dequantize(q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float matrix a QuantizedTensor stands for (exact: no rounding beyond `dtype`'s)."""
    out_f, in_f = q.shape
    fmt = q.fmt
    if fmt.kind == "float":
        return q.data.to(dtype)
    # Block formats are defined by their fp32 dequantizers (gguf's and transformers'), so that is what
    # every dtype starts from: float64 gets exactly those fp32 values.
    if fmt.kind == "gguf":
        return ggml_blocks.dequantize_rows(fmt.name, q.data, in_f).to(dtype)
    if fmt.kind == "mxfp4":
        return mxfp4.dequantize(q.data, q.scales, in_f).to(dtype)
    # code (<= 8 significant bits) x fp32 scale is exact in float64 and rounds once to `dtype`. For an
    # fp32 result a single fp32 multiply rounds that same exact product once: bit-identical, and cheaper.
    work = torch.float32 if dtype == torch.float32 else torch.float64
    if fmt.kind == "int8":
        w = q.data.to(work) * q.scales.to(work)[:, None]
    elif fmt.kind == "int4":
        codes = unpack_int4(q.data, in_f).to(work)
        w = codes * q.scales.to(work).repeat_interleave(fmt.group_size, dim=1)[:, :in_f]
    elif fmt.kind == "fp8":
        w = q.data.to(work) * _expand_blocks(q.scales.to(work), out_f, in_f, fmt.block)
    else:
        raise FormatError(f"no dequantizer for format {fmt}")
    return w.to(dtype)


def convert(q: QuantizedTensor, fmt: str | WeightFormat) -> QuantizedTensor:
    """`q` in another format (identity when it already is): dequantize, then the reference quantize."""
    fmt = get_format(fmt)
    if q.fmt == fmt:
        return q
    if fmt.split is not None:
        raise FormatError(f"a matrix converts to one format, not the mixed {fmt}: gate/up go to {fmt.gate_up}, "
                          f"down to {fmt.down} (ExpertTensors.to_format does that)")
    if q.fmt.name == "q4_0" and fmt.name == "int4_g32":
        return _q4_0_as_int4_g32(q)
    return quantize(dequantize(q, torch.float32), fmt)


def _q4_0_as_int4_g32(q: QuantizedTensor) -> QuantizedTensor:
    """Q4_0 is symmetric int4 in groups of 32 (x = d * (u - 8)) with an fp16 scale: the same values in
    int4_g32, exactly (codes moved between nibbles, d widened to fp32), so the int4 kernels compute it."""
    out_f, in_f = q.shape
    blocks = q.data.reshape(out_f, in_f // 32, 18)
    scales = blocks[..., :2].contiguous().view(torch.float16).reshape(out_f, in_f // 32).to(torch.float32)
    qs = blocks[..., 2:]
    u = torch.cat([qs & 0x0F, qs >> 4], dim=-1).reshape(out_f, in_f)  # value j of a block: nibble order
    packed = (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()  # pack_int4's layout: even column low, stored q+8
    return QuantizedTensor(FORMATS["int4_g32"], (out_f, in_f), packed, scales.contiguous())


def _expand_blocks(scale: torch.Tensor, out_f: int, in_f: int, block: tuple[int, int]) -> torch.Tensor:
    # Partial last blocks keep the full block size: row r uses scale row r // 128, never out/n_blocks.
    return scale.repeat_interleave(block[0], dim=0)[:out_f].repeat_interleave(block[1], dim=1)[:, :in_f]


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Signed codes in [-8, 7], [out, in] -> uint8 [out, ceil(in/2)]: even column in the low nibble, stored as q+8."""
    out_f, in_f = codes.shape
    u = (codes.to(torch.int16) + 8).to(torch.uint8)
    if in_f % 2:
        u = torch.cat([u, torch.full((out_f, 1), 8, dtype=torch.uint8)], dim=1)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of pack_int4: int8 codes [out, in_features]."""
    lo = (packed & 0x0F).to(torch.int8) - 8
    hi = (packed >> 4).to(torch.int8) - 8
    return torch.stack([lo, hi], dim=2).view(packed.shape[0], -1)[:, :in_features]
