"""The safetensors header: tensor names, dtypes, shapes and byte ranges, read without touching tensor data.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
({name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}), then the data, with
offsets relative to the first data byte. Checking the header against the file size here, before the
file is memory-mapped, turns a truncated download into an error instead of a SIGBUS on first access.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CorruptFileError, TensorDTypeError, TruncatedFileError

# safetensors' limit on the header size; a larger length field means the file is not safetensors.
MAX_HEADER_BYTES = 100_000_000

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
}
if hasattr(torch, "float8_e8m0fnu"):
    _DTYPES["F8_E8M0"] = torch.float8_e8m0fnu
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype ("BF16" for torch.bfloat16)."""
    return _DTYPE_NAMES.get(dtype, str(dtype))


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the header describes it. `offsets` are absolute byte positions in `file`."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offsets: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return self.offsets[1] - self.offsets[0]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class FileHeader:
    """A parsed and size-checked safetensors header."""

    file: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int  # absolute offset of the first data byte


def read_header(path: str | os.PathLike) -> FileHeader:
    """Parse `path`'s header and check it against the file size (TruncatedFileError, CorruptFileError)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise TruncatedFileError(f"{path}: {size} bytes, too short to hold a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise CorruptFileError(f"{path}: header length field says {n} bytes; not a safetensors file")
            if 8 + n > size:
                raise TruncatedFileError(f"{path}: header of {n} bytes does not fit in the file's {size} bytes "
                                         "(truncated download?)")
            raw = f.read(n)
    except OSError as e:
        raise CorruptFileError(f"{path}: cannot read ({e.strerror or e})") from e
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"{path}: header is not valid JSON ({e}); not a safetensors file") from None
    if not isinstance(obj, dict):
        raise CorruptFileError(f"{path}: header is not a JSON object")
    data_start = 8 + n
    metadata = obj.pop("__metadata__", None) or {}
    tensors: dict[str, TensorInfo] = {}
    end_max, last_name = 0, None
    for name, entry in obj.items():
        info = _parse_entry(path, name, entry, data_start)
        tensors[name] = info
        if info.offsets[1] > end_max:
            end_max, last_name = info.offsets[1], name
    if end_max > size:
        raise TruncatedFileError(
            f"{path}: the header promises {end_max} bytes but the file holds {size} "
            f"(tensor {last_name!r} ends past the end of the file; truncated download?)")
    # safetensors itself insists on tensors tiling the data section exactly; say which one breaks it.
    pos = data_start
    for info in sorted(tensors.values(), key=lambda i: i.offsets):
        if info.offsets[0] != pos:
            what = "overlaps the previous tensor" if info.offsets[0] < pos else "leaves a gap before it"
            raise CorruptFileError(f"{path}: tensor {info.name!r} {what} (data_offsets do not tile the data)")
        pos = info.offsets[1]
    if pos != size:
        raise CorruptFileError(f"{path}: {size - pos} bytes after the last tensor; the header does not cover the file")
    return FileHeader(path, tensors, dict(metadata), data_start)


def _parse_entry(path: Path, name: str, entry, data_start: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise CorruptFileError(f"{path}: header entry for tensor {name!r} is not an object")
    code, shape, offs = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if code not in _DTYPES:
        raise TensorDTypeError(f"{path}: tensor {name!r} has dtype {code!r}, which torch cannot hold "
                               f"(known: {', '.join(_DTYPES)})")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise CorruptFileError(f"{path}: tensor {name!r} has a malformed shape {shape!r}")
    if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs)
            and 0 <= offs[0] <= offs[1]):
        raise CorruptFileError(f"{path}: tensor {name!r} has malformed data_offsets {offs!r}")
    dtype = _DTYPES[code]
    want = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if offs[1] - offs[0] != want:
        raise CorruptFileError(f"{path}: tensor {name!r} ({code} {shape}) needs {want} bytes but its "
                               f"data_offsets span {offs[1] - offs[0]}")
    return TensorInfo(name, path, dtype, tuple(shape), (data_start + offs[0], data_start + offs[1]))
