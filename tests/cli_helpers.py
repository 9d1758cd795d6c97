"""Run the real `moetier` console script, the way a user does."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


def moetier_script() -> str:
    """The `moetier` script installed beside this interpreter (a virtualenv's bin/), else the one on PATH."""
    beside = Path(sys.executable).parent / "moetier"
    if beside.is_file():
        return str(beside)
    found = shutil.which("moetier")
    assert found, "the moetier console script is not installed"
    return found


def moetier(*args, env: dict | None = None, cwd=None, timeout: float = 600, **env_overrides):
    """CompletedProcess of `moetier ARGS` (text mode). env_overrides are added to the current environment;
    a value of None removes that variable."""
    full = dict(os.environ if env is None else env)
    for k, v in env_overrides.items():
        if v is None:
            full.pop(k, None)
        else:
            full[k] = v
    return subprocess.run([moetier_script(), *map(str, args)], capture_output=True, text=True, env=full, cwd=cwd,
                          timeout=timeout)


def assert_usage_error(r, *needles: str) -> None:
    """Exit 2, one line on stderr naming the problem, no traceback anywhere."""
    assert r.returncode == 2, (r.returncode, r.stdout[-1500:], r.stderr[-1500:])
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
