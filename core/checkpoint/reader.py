"""`Checkpoint`: a lazy, read-one-tensor-at-a-time view of a safetensors checkpoint.

Accepted layouts: a single `.safetensors` file; a directory with `model.safetensors.index.json`
(its `weight_map` names the shard of every tensor); a directory with `model.safetensors`; a directory
whose `*.safetensors` files together form the checkpoint (no index); the `config.json` of any such
directory (meaning the directory). Headers are parsed on first use
of a shard and checked against the file size; shards are opened with safetensors' `safe_open` (mmap) and
their handles kept in a small LRU cache until `close()`. Reading a tensor touches only its own bytes.
"""
from __future__ import annotations

import bisect
import difflib
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import CheckpointError
from ..formats import QuantizedTensor, WeightFormat
from .errors import (CheckpointIndexError, CorruptFileError, MissingShardError, MissingTensorError,
                     TensorDTypeError, TensorShapeError)
from .header import FileHeader, TensorInfo, dtype_name, read_header

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

ShapeSpec = Sequence[int | None]  # None matches any size on that axis


class Checkpoint:
    """A safetensors checkpoint (directory or single file), read lazily. Use as a context manager.

    max_open_files: shard handles kept open (least recently used closed first).
    max_mapped_bytes: after this many bytes were read through the open handles, they are all closed
    (and reopened on demand). Pages of a memory-mapped file stay in the process's RSS until it is
    unmapped, so without this an expert-by-expert load would show the whole checkpoint as resident.
    Every tensor returned owns its memory (it is copied out of the mapping), so closing never
    invalidates it and peak memory is what the caller keeps plus one tensor plus this budget.
    drop_page_cache: after each read, unmap and tell the OS to drop the bytes read from its page cache
    (the disk tier keeps its own bounded cache of packed experts; the file's pages would otherwise fill
    memory that no budget accounts for, and make "disk" reads memory copies).
    """

    def __init__(self, path: str | os.PathLike, *, max_open_files: int = 32, max_mapped_bytes: int = 64 * 2**20,
                 drop_page_cache: bool = False):
        self.drop_page_cache = drop_page_cache and hasattr(os, "posix_fadvise")
        self.path = Path(path)
        if self.path.is_file() and self.path.name == CONFIG_FILE:
            self.path = self.path.parent  # a model named by its config.json: the checkpoint beside it
        self._max_open = max(1, int(max_open_files))
        self._max_mapped = max(0, int(max_mapped_bytes))
        self._mapped = 0
        self._headers: dict[Path, FileHeader] = {}
        self._handles: OrderedDict[Path, object] = OrderedDict()
        self._lock = threading.RLock()
        self._closed = False
        self._sorted: list[str] | None = None
        self.index_file: Path | None = None
        if self.path.is_file() and self.path.name.endswith(".index.json"):
            self.root = self.path.parent  # the index itself was named: read the checkpoint it describes
            self.index_file = self.path
            self._weight_map, self._files = self._read_index(self.path)
        elif self.path.is_file():
            self.root = self.path.parent
            self._weight_map = None
            self._files = (self.path,)
        elif self.path.is_dir():
            self.root = self.path
            self._weight_map, self._files = self._discover()
        else:
            raise CheckpointError(f"{self.path}: no such checkpoint file or directory")
        if self._weight_map is None:
            self._weight_map = self._map_from_headers()

    # -- discovery ---------------------------------------------------------------------------------

    def _discover(self) -> tuple[dict[str, Path] | None, tuple[Path, ...]]:
        index = self.root / INDEX_FILE
        if index.is_file():
            self.index_file = index
            return self._read_index(index)
        single = self.root / SINGLE_FILE
        if single.is_file():
            return None, (single,)
        files = tuple(sorted(self.root.glob("*.safetensors")))
        if not files:
            raise CheckpointError(f"{self.root}: no {INDEX_FILE}, no {SINGLE_FILE} and no *.safetensors file")
        return None, files

    def _read_index(self, index: Path) -> tuple[dict[str, Path], tuple[Path, ...]]:
        try:
            obj = json.loads(index.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointIndexError(f"{index}: not valid JSON ({e})") from None
        wm = obj.get("weight_map") if isinstance(obj, dict) else None
        if not isinstance(wm, dict) or not wm:
            raise CheckpointIndexError(f"{index}: no non-empty object 'weight_map' (tensor name -> shard file)")
        weight_map: dict[str, Path] = {}
        paths: dict[str, Path] = {}  # one Path per shard: real indexes list ~10^5 tensors over ~10^2 shards
        shards: dict[Path, list[str]] = {}
        for name, shard in wm.items():
            p = paths.get(shard) if isinstance(shard, str) else None
            if p is None:
                if not isinstance(shard, str) or not shard:
                    raise CheckpointIndexError(f"{index}: tensor {name!r} maps to {shard!r}, not a file name")
                # Checked lexically: hub caches make shards symlinks into a blob store elsewhere, which is fine.
                if Path(shard).is_absolute() or ".." in Path(shard).parts:
                    raise CheckpointIndexError(f"{index}: tensor {name!r} maps to {shard!r}, outside the checkpoint directory")
                p = paths[shard] = self.root / shard
                shards[p] = []
            weight_map[name] = p
            shards[p].append(name)
        for p, names in shards.items():
            if not p.is_file():
                some = ", ".join(repr(n) for n in names[:3]) + (", ..." if len(names) > 3 else "")
                raise MissingShardError(f"{index}: shard {p.name!r} is missing from {self.root} "
                                        f"({len(names)} tensors map to it: {some})")
        return weight_map, tuple(sorted(shards))

    def _map_from_headers(self) -> dict[str, Path]:
        out: dict[str, Path] = {}
        for f in self._files:
            for name in self._header(f).tensors:
                if name in out:
                    raise CorruptFileError(f"tensor {name!r} is in both {out[name]} and {f}")
                out[name] = f
        return out

    def _header(self, file: Path) -> FileHeader:
        with self._lock:
            h = self._headers.get(file)
            if h is None:
                h = self._headers[file] = read_header(file)
            return h

    # -- listing -----------------------------------------------------------------------------------

    @property
    def files(self) -> tuple[Path, ...]:
        """The safetensors files of this checkpoint."""
        return self._files

    def names(self, prefix: str = "") -> list[str]:
        """Sorted tensor names (those starting with `prefix`), from the index or headers: no data read."""
        if self._sorted is None:
            self._sorted = sorted(self._weight_map)
        if not prefix:
            return list(self._sorted)
        lo = bisect.bisect_left(self._sorted, prefix)
        hi = lo
        while hi < len(self._sorted) and self._sorted[hi].startswith(prefix):
            hi += 1
        return self._sorted[lo:hi]

    def __contains__(self, name: str) -> bool:
        return name in self._weight_map

    def __len__(self) -> int:
        return len(self._weight_map)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def file_of(self, name: str) -> Path:
        """The file holding tensor `name` (MissingTensorError otherwise)."""
        try:
            return self._weight_map[name]
        except KeyError:
            raise self.missing(name) from None

    def info(self, name: str) -> TensorInfo:
        """Name, file, dtype, shape and byte range of `name`, from its shard's header (no data read)."""
        file = self.file_of(name)
        info = self._header(file).tensors.get(name)
        if info is None:
            raise CheckpointIndexError(f"{self.index_file or file}: the index maps {name!r} to {file.name!r}, "
                                       "which does not hold it")
        return info

    def infos(self, prefix: str = "") -> list[TensorInfo]:
        """`info` of every tensor whose name starts with `prefix` (reads the shards' headers only)."""
        return [self.info(n) for n in self.names(prefix)]

    def verify_files(self) -> int:
        """Parse and size-check every shard's header now (truncated or corrupt shards fail here instead of
        midway through a load); return the number of tensors found. Reads headers only."""
        n = 0
        for f in self._files:
            n += len(self._header(f).tensors)
        for name, f in self._weight_map.items():
            if name not in self._header(f).tensors:
                raise CheckpointIndexError(f"{self.index_file or f}: the index maps {name!r} to {f.name!r}, "
                                           "which does not hold it")
        return n

    @property
    def total_bytes(self) -> int:
        """Tensor data bytes of the whole checkpoint (reads every shard's header, no data)."""
        return sum(i.nbytes for f in self._files for i in self._header(f).tensors.values())

    @property
    def config(self) -> dict | None:
        """The parsed `config.json` next to the weights, or None when there is none."""
        p = self.root / CONFIG_FILE
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{p}: not valid JSON ({e})") from None

    def missing(self, name: str, what: str = "tensor", note: str = "") -> MissingTensorError:
        """The error for an absent tensor, listing the names closest to it."""
        close = _close_names(name, self._weight_map)
        hint = f"; close names: {', '.join(close)}" if close else ""
        note = f" ({note})" if note else ""
        return MissingTensorError(f"{self._where()}: no {what} {name!r}{note}{hint}")

    def _where(self) -> str:
        if self.index_file is not None:
            return str(self.index_file)
        return str(self._files[0]) if len(self._files) == 1 else str(self.root)

    # -- reading -----------------------------------------------------------------------------------

    def check(self, name: str, *, shape: ShapeSpec | None = None,
              dtype: torch.dtype | Iterable[torch.dtype] | None = None) -> TensorInfo:
        """`info(name)` after checking its shape and dtype against what the caller expects."""
        info = self.info(name)
        if shape is not None and not _shape_matches(info.shape, shape):
            want = [("*" if d is None else d) for d in shape]
            raise TensorShapeError(f"{info.file}: tensor {name!r} has shape {list(info.shape)}, expected {want}")
        if dtype is not None:
            allowed = (dtype,) if isinstance(dtype, torch.dtype) else tuple(dtype)
            if info.dtype not in allowed:
                raise TensorDTypeError(f"{info.file}: tensor {name!r} has dtype {dtype_name(info.dtype)}, expected "
                                       f"{' or '.join(dtype_name(d) for d in allowed)}")
        return info

    def read(self, name: str, *, shape: ShapeSpec | None = None,
             dtype: torch.dtype | Iterable[torch.dtype] | None = None) -> torch.Tensor:
        """One whole tensor, in memory of its own (only its bytes are read from the file)."""
        info = self.check(name, shape=shape, dtype=dtype)
        return self._get(info, None)

    def read_slice(self, name: str, index) -> torch.Tensor:
        """`tensor[index]` for basic indexing (ints and slices), reading only the bytes it covers."""
        return self._get(self.info(name), index)

    def _get(self, info: TensorInfo, index) -> torch.Tensor:
        with self._lock:
            h = self._handle(info.file)
            try:
                view = h.get_tensor(info.name) if index is None else h.get_slice(info.name)[index]
            except SafetensorError as e:
                raise CorruptFileError(f"{info.file}: cannot read tensor {info.name!r}: {e}") from None
            except (IndexError, TypeError, ValueError) as e:
                raise CheckpointError(f"{info.file}: bad index {index!r} for tensor {info.name!r} "
                                      f"of shape {list(info.shape)}: {e}") from None
            # safetensors hands out views of its mmap: copy, so the mapping can be dropped below.
            out = view.clone(memory_format=torch.contiguous_format)
            del view
            self._mapped += out.numel() * out.element_size()
            if self._mapped > self._max_mapped or self.drop_page_cache:
                self._release_locked()
            if self.drop_page_cache:
                _drop_cached(info)
            return out

    def release(self) -> None:
        """Close the open shard handles (unmapping their pages); the checkpoint stays usable."""
        with self._lock:
            self._release_locked()

    def _release_locked(self) -> None:
        while self._handles:
            _, h = self._handles.popitem()
            _close_handle(h)
        self._mapped = 0

    def _handle(self, file: Path):
        if self._closed:
            raise CheckpointError(f"{self._where()}: checkpoint is closed")
        h = self._handles.get(file)
        if h is not None:
            self._handles.move_to_end(file)
            return h
        self._header(file)  # size check first: a truncated file must fail here, not SIGBUS under mmap
        try:
            h = safe_open(str(file), framework="pt")
        except SafetensorError as e:
            raise CorruptFileError(f"{file}: safetensors refuses to open it: {e}") from None
        self._handles[file] = h
        while len(self._handles) > self._max_open:
            _, old = self._handles.popitem(last=False)
            _close_handle(old)
        return h

    # -- matrices (see matrices.py for the on-disk conventions) ------------------------------------

    def matrix_format(self, base: str, *, group_size: int | None = None) -> WeightFormat:
        """The native format of matrix `base` (recognised by the tensors next to `base`), no data read."""
        from .matrices import detect_matrix
        return detect_matrix(self, base, group_size=group_size).fmt

    def matrix_shape(self, base: str) -> tuple[int, int]:
        """The logical [out, in] shape of matrix `base` (int4 reads its 2-element `weight_shape`)."""
        from .matrices import detect_matrix
        return detect_matrix(self, base).shape

    def read_matrix(self, base: str, *, shape: ShapeSpec | None = None,
                    to: torch.dtype | str | WeightFormat | None = None,
                    group_size: int | None = None) -> QuantizedTensor:
        """Matrix `base` as a QuantizedTensor: native format by default; `to` a float dtype dequantizes,
        `to` a format name converts (dequantize + reference quantize)."""
        from .matrices import read_matrix
        return read_matrix(self, base, shape=shape, to=to, group_size=group_size)

    def read_fused_matrix(self, name: str, expert: int, rows: tuple[int, int] | None = None, *,
                          shape: ShapeSpec | None = None,
                          to: torch.dtype | str | WeightFormat | None = None) -> QuantizedTensor:
        """Expert `expert`'s [rows, in] matrix of a fused [E, out, in] float tensor, reading only its bytes."""
        from .matrices import read_fused_matrix
        return read_fused_matrix(self, name, expert, rows, shape=shape, to=to)

    def read_fused_gate_up(self, name: str, expert: int, *,
                           to: torch.dtype | str | WeightFormat | None = None) -> tuple[QuantizedTensor, QuantizedTensor]:
        """(gate, up) of expert `expert` from a fused [E, 2I, H] `gate_up_proj` (gate = rows 0..I-1)."""
        from .matrices import read_fused_gate_up
        return read_fused_gate_up(self, name, expert, to=to)

    def iter_matrices(self, bases: Sequence[str], *, to: torch.dtype | str | WeightFormat | None = None,
                      progress: bool | None = None, description: str = "reading") -> Iterator[tuple[str, QuantizedTensor]]:
        """(base, matrix) for each base, read one at a time under a progress bar (see progress.track)."""
        from .progress import track
        for base in track(bases, total=len(bases), description=description, enabled=progress):
            yield base, self.read_matrix(base, to=to)

    # -- lifetime ----------------------------------------------------------------------------------

    def close(self) -> None:
        """Close every open shard. Tensors already returned stay valid."""
        with self._lock:
            self._release_locked()
            self._closed = True

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self._weight_map)} tensors in {len(self._files)} files)"


def open_checkpoint(path: str | os.PathLike, **kw) -> Checkpoint:
    """`Checkpoint(path)`; reads as `with open_checkpoint(d) as ckpt: ...`."""
    return Checkpoint(path, **kw)


def _drop_cached(info: TensorInfo) -> None:
    drop_cached(info.file, info.offsets[0], info.nbytes)


def drop_cached(path, offset: int, nbytes: int) -> None:
    """Tell the OS to drop bytes [offset, offset + nbytes) of file `path` from its page cache (a disk tier's
    reads live in its own bounded cache, not twice in memory)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _close_handle(h) -> None:
    try:
        h.__exit__(None, None, None)
    except SafetensorError:
        pass


def _shape_matches(actual: tuple[int, ...], want: ShapeSpec) -> bool:
    return len(actual) == len(want) and all(w is None or a == w for a, w in zip(actual, want))


def _close_names(name: str, names: Iterable[str], n: int = 5) -> list[str]:
    # Narrow to names sharing the same parent first: difflib over ~100k names is slow and noisy.
    names = list(names)
    parts = name.split(".")
    for keep in range(len(parts) - 1, 0, -1):
        stem = ".".join(parts[:keep]) + "."
        pool = [x for x in names if x.startswith(stem)]
        if pool:
            return difflib.get_close_matches(name, pool[:20000], n=n, cutoff=0.5) or sorted(pool)[:n]
    return difflib.get_close_matches(name, names[:20000], n=n, cutoff=0.5)
