"""The accelerator backend's Triton kernel, run by Triton's interpreter on the CPU (no GPU needed)."""
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install moetier[test] brings it)")

HERE = Path(__file__).parent


def test_triton_kernel_matches_the_oracle_for_every_format_under_the_interpreter():
    seed = secrets.randbits(16)
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(HERE / "accel_triton_check.py"), str(seed)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"seed {seed}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    lines = proc.stdout.splitlines()
    assert lines[-1] == "all triton checks passed"
    assert sum(line.startswith("ok ") for line in lines) == 8 * 3 + 8  # 8 formats x 3 shapes + 8 decode steps
