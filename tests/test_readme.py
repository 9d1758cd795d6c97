"""The README's promises, run as a reader would: the main job names the built-in model, and the Python
example runs as printed (a fresh interpreter, the README's own text)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"

pytest.importorskip("transformers")


def code_blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README.read_text(encoding="utf-8"), re.M | re.S)


def test_main_job_runs_the_default_model():
    main_job = code_blocks("")[0]
    assert "moetier doctor" in main_job and "moetier run default --prompt" in main_job, main_job


def test_python_example_runs_as_printed(tmp_path):
    (example,) = code_blocks("python")
    r = subprocess.run([sys.executable, "-c", "import torch; torch.set_num_threads(1)\n" + example],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    text, tiers = r.stdout.rstrip("\n").rsplit("\n", 1)
    assert text.startswith("def fibonacci(n):") and len(text) > len("def fibonacci(n):") + 10, text
    assert re.fullmatch(r"\{'cpu:numa0': \d+\}", tiers), tiers
