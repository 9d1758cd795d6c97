"""The training text: the Python standard library's own .py sources, which every machine has offline.

Files are listed in sorted relative-path order and split into train and held-out by a hash of the
relative path, so the split of a file never depends on which other files exist: a different Python
version adds or drops a few files without moving any other file across the split. Left out: tests
(`test`/`tests` directories: generated data, deliberately broken files), `encodings` (code-page tables)
and `pydoc_data` (one large string of documentation); files that are not UTF-8 are skipped.
"""
from __future__ import annotations

import hashlib
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

HELDOUT_PERCENT = 5
EXCLUDED_DIRS = frozenset({"test", "tests", "site-packages", "encodings", "pydoc_data", "__pycache__"})
SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class SourceFile:
    """One .py file of the corpus: `rel` is its posix path relative to the standard library root."""

    root: Path
    rel: str

    @property
    def split(self) -> str:
        return split_of(self.rel)

    def read(self) -> str | None:
        """The file's text, or None when it is not UTF-8."""
        try:
            return (self.root / self.rel).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            return None


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(rel: str) -> str:
    """'heldout' for HELDOUT_PERCENT of relative paths (by SHA-256, stable across machines), else 'train'."""
    bucket = int.from_bytes(hashlib.sha256(rel.encode("utf-8")).digest()[:8], "big") % 100
    return "heldout" if bucket < HELDOUT_PERCENT else "train"


def source_files(split: str | None = None, root: Path | None = None) -> list[SourceFile]:
    """The corpus files of `split` ("train", "heldout" or None for both), in sorted relative-path order."""
    if split not in (None, *SPLITS):
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    root = Path(root) if root is not None else stdlib_root()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]  # pruned, not walked
        for name in filenames:
            if name.endswith(".py"):
                f = SourceFile(root, (Path(dirpath) / name).relative_to(root).as_posix())
                if split is None or f.split == split:
                    files.append(f)
    return sorted(files, key=lambda f: f.rel)


def texts(split: str | None = None, root: Path | None = None) -> Iterator[str]:
    """The text of every readable file of `split`, in corpus order."""
    for f in source_files(split, root):
        text = f.read()
        if text:
            yield text
