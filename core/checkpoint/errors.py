"""Checkpoint errors. Each is a CheckpointError (so one `except CheckpointError` catches them all) and,
where a generic moetier error fits too (ShapeError, DTypeError, FormatError), also that one.
Every message names the file and, when there is one, the tensor."""
from __future__ import annotations

from ..errors import CheckpointError, DTypeError, FormatError, ShapeError


class MissingTensorError(CheckpointError, LookupError):
    """A tensor the caller asked for is not in the checkpoint (the message lists close names)."""


class TensorShapeError(CheckpointError, ShapeError):
    """A tensor on disk has another shape than expected."""


class TensorDTypeError(CheckpointError, DTypeError):
    """A tensor on disk has a dtype the reader does not accept there."""


class TruncatedFileError(CheckpointError):
    """A safetensors file is shorter than its header promises (an interrupted download or copy)."""


class CorruptFileError(CheckpointError):
    """A file is not a readable safetensors file: bad header length, bad JSON, inconsistent offsets."""


class CheckpointIndexError(CheckpointError):
    """`model.safetensors.index.json` is malformed, or disagrees with the shards it names."""


class MissingShardError(CheckpointError):
    """The index names a shard file that is not there."""


class QuantizedLayoutError(CheckpointError, FormatError):
    """The tensors of one quantized matrix disagree (e.g. int4 `weight_shape` vs `weight_packed`)."""
