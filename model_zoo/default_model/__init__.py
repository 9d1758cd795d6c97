"""The default model: a small Qwen3-MoE language model trained on the Python standard library's sources,
shipped inside the package so that a first run needs nothing downloaded.

    from moetier.model_zoo.default_model import checkpoint_dir
    folder = checkpoint_dir()     # config.json, model.safetensors (bf16, per-expert), tokenizer files

Modules: `corpus` (the text and its train/held-out split), `tokenizer` (byte-level BPE), `train` (the
training script that made the shipped files), `evaluate` (perplexity per weight format, routing counts and
skew, generation). Importing this package imports neither transformers nor tokenizers.
"""
from __future__ import annotations

from pathlib import Path

from moetier.errors import CheckpointError

NAME = "default"
DATA_DIR = Path(__file__).parent / "data"
CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def checkpoint_dir() -> Path:
    """The folder of the shipped checkpoint; CheckpointError when the installation lacks its files."""
    missing = [f for f in CHECKPOINT_FILES if not (DATA_DIR / f).is_file()]
    if missing:
        raise CheckpointError(
            f"the default model's files are missing from {DATA_DIR}: {', '.join(missing)}; reinstall moetier "
            f"(they ship as package data) or retrain them: python -m moetier.model_zoo.default_model.train --out DIR")
    return DATA_DIR


__all__ = ["CHECKPOINT_FILES", "DATA_DIR", "NAME", "checkpoint_dir"]
