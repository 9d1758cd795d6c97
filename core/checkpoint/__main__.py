"""`python -m moetier.checkpoint PATH`: check every shard header and summarize a checkpoint (no data read)."""
from __future__ import annotations

import argparse
import sys
from collections import Counter

from ..errors import CheckpointError
from .header import dtype_name
from .reader import Checkpoint


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moetier.checkpoint", description=__doc__)
    p.add_argument("path", help="checkpoint directory or .safetensors file")
    p.add_argument("--list", action="store_true", help="print every tensor's name, dtype and shape")
    args = p.parse_args(argv)
    try:
        with Checkpoint(args.path) as ckpt:
            n = ckpt.verify_files()
            infos = ckpt.infos()
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    dtypes = Counter()
    for i in infos:
        dtypes[dtype_name(i.dtype)] += i.nbytes
    print(f"{args.path}: {n} tensors in {len(ckpt.files)} file(s), {sum(dtypes.values()) / 2**30:.3f} GiB")
    for code, nbytes in dtypes.most_common():
        print(f"  {code:8s} {nbytes / 2**30:10.3f} GiB")
    if args.list:
        for i in infos:
            print(f"{i.name}\t{dtype_name(i.dtype)}\t{list(i.shape)}\t{i.file.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
