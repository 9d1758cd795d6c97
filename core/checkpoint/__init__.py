"""Reading (and writing) safetensors checkpoints lazily, one tensor at a time.

The whole model is never materialized: shard headers are parsed on demand (and checked against the file
size before any mmap access), shards are memory-mapped by safetensors' `safe_open`, and each read touches
only the bytes of the tensor (or expert slice) asked for, copies them out, and unmaps the shards once
`max_mapped_bytes` were read, so resident memory stays what the caller keeps plus about one tensor.
Families build their tensor naming and their ExpertSource on top of this module; it knows nothing about
families.

Reading
-------
    from moetier.checkpoint import Checkpoint

    with Checkpoint(path) as ckpt:          # a directory (index / model.safetensors / *.safetensors) or one file
                                            # options: max_open_files=32, max_mapped_bytes=64 MiB (see Checkpoint)
        ckpt.names(prefix="model.layers.3.")  # sorted names, no data read
        "x.weight" in ckpt                    # membership
        ckpt.info(name)                       # TensorInfo(name, file, dtype, shape, offsets, nbytes)
        ckpt.check(name, shape=(8, None), dtype=torch.bfloat16)   # info after checking; None = any size
        ckpt.read(name, shape=..., dtype=...) # one whole tensor, in memory of its own (valid after close)
        ckpt.read_slice(name, (e, slice(0, 64)))                   # basic indexing, only those bytes
        ckpt.config                           # parsed config.json next to the weights, or None
        ckpt.release()                        # unmap the open shards now (e.g. after each layer); stays usable
        ckpt.verify_files()                   # size-check every shard header up front; returns the tensor count
    Reads are serialized by a lock, so one Checkpoint may be shared by threads.

Matrices (`base` is the name without `.weight`, e.g. "model.layers.3.mlp.experts.7.gate_proj"):

        ckpt.matrix_format(base)      # WeightFormat recognised from the tensors present (see below)
        ckpt.matrix_shape(base)       # logical (out, in)
        ckpt.read_matrix(base, shape=(I, H))          # QuantizedTensor in its NATIVE format
        ckpt.read_matrix(base, to=torch.float32)      # dequantized: a QuantizedTensor of format fp32/bf16/fp16
        ckpt.read_matrix(base, to="int4_g128")        # converted with the core's reference quantizer
        ckpt.read_matrix(base, group_size=32)         # int4 group size hint (else inferred from the scales)

    Native on-disk conventions recognised next to `<base>`:
        `.weight` bf16/fp16/fp32                                          -> bf16 / fp16 / fp32
        `.weight` float8_e4m3fn + `.weight_scale_inv` [ceil(o/128), ceil(i/128)]   -> fp8_e4m3
        `.weight_packed` int32 [o, ceil(i/8)] + `.weight_scale` [o, groups] + `.weight_shape` [2]
            (compressed-tensors pack-quantized, symmetric)                -> int4_g<group>

Fused experts (Qwen3.5 on disk; float only):

        ckpt.read_fused_gate_up("...mlp.experts.gate_up_proj", e)   # (gate, up) from [E, 2I, H]
        ckpt.read_fused_matrix("...mlp.experts.down_proj", e)       # [H, I] from [E, H, I]
        ckpt.read_fused_matrix(name, e, rows=(r0, r1))              # any row range of one expert

    Both read only expert e's bytes and take `to=` like read_matrix.

Many matrices with a progress bar (one resident at a time; silent when stderr is not a TTY):

        for base, q in ckpt.iter_matrices(bases, to=None, description="layer 3"): ...
        from moetier.checkpoint import track      # the same bar around any iterable
        with TrackedExperts(source, total=len(ids), description=f"layer {i}") as src:
            backend.prepare(spec, src, ids, fmt)   # a bar per expert read through any ExpertSource
        ProgressBar(total, description)           # the bar itself: advance(n), close(); a no-op when quiet

Writing (tests, `moetier zoo tiny`)
-----------------------------------
        matrix_tensors(base, q, scale_dtype=torch.float32) -> {name: tensor}   # q in its native convention
        fused_expert_tensors(prefix, gates, ups, downs) -> {prefix.gate_up_proj, prefix.down_proj}
        write_checkpoint(dir, tensors, max_shard_bytes=None, config=None)      # single file or shards + index
        write_safetensors(path, tensors)

Errors (all subclasses of moetier.errors.CheckpointError; every message names the file and the tensor)
        MissingTensorError   (also LookupError)  absent tensor; lists close names
        TensorShapeError     (also ShapeError)   shape differs from the expected one
        TensorDTypeError     (also DTypeError)   dtype not accepted there
        TruncatedFileError   file shorter than its header promises (checked before any mmap access)
        CorruptFileError     not a safetensors file, malformed header, duplicate tensor across files
        CheckpointIndexError malformed index JSON / weight_map, or index and shard disagree
        MissingShardError    the index names a shard file that is not there (checked at open)
        QuantizedLayoutError (also FormatError)  tensors of one quantized matrix disagree
An expert id outside a fused tensor raises moetier.errors.ExpertIdError.

`python -m moetier.checkpoint PATH [--list]` checks every header and summarizes a checkpoint.
"""
from .errors import (CheckpointIndexError, CorruptFileError, MissingShardError, MissingTensorError,
                     QuantizedLayoutError, TensorDTypeError, TensorShapeError, TruncatedFileError)
from .header import FileHeader, TensorInfo, read_header
from .matrices import (MatrixOnDisk, convert_to, detect_matrix, fused_expert_tensors, infer_group_size,
                       int4_from_packed, int4_to_packed, matrix_tensors)
from .progress import ProgressBar, TrackedExperts, progress_enabled, track
from .reader import Checkpoint, open_checkpoint
from .writer import shard_plan, write_checkpoint, write_safetensors

__all__ = [
    "Checkpoint", "open_checkpoint", "TensorInfo", "FileHeader", "read_header",
    "MatrixOnDisk", "detect_matrix", "convert_to", "infer_group_size", "int4_from_packed", "int4_to_packed",
    "matrix_tensors", "fused_expert_tensors", "write_checkpoint", "write_safetensors", "shard_plan",
    "track", "progress_enabled", "ProgressBar", "TrackedExperts",
    "MissingTensorError", "TensorShapeError", "TensorDTypeError", "TruncatedFileError", "CorruptFileError",
    "CheckpointIndexError", "MissingShardError", "QuantizedLayoutError",
]
