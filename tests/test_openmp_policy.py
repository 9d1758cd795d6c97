"""torch's OpenMP workers sleep between ops when moetier is imported first (they would spin on the cores
moetier's pinned pool needs: prefill measured 2-4x slower); a user's own policy is kept; torch imported
first makes moetier.load say what to do. Each case in a fresh interpreter: the policy is read at torch's
import."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def run(code: str, env_policy: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if env_policy is not None:
        env["OMP_WAIT_POLICY"] = env_policy
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


REPORT = "import json, os; print(json.dumps({'policy': os.environ.get('OMP_WAIT_POLICY'), " \
         "'spin': moetier.openmp.workers_may_spin()}))"


def test_importing_moetier_first_makes_the_workers_sleep():
    assert run("import moetier, torch; " + REPORT) == {"policy": "PASSIVE", "spin": False}


def test_a_policy_the_user_chose_is_kept():
    assert run("import moetier, torch; " + REPORT, env_policy="ACTIVE") == {"policy": "ACTIVE", "spin": False}


def test_torch_first_is_detected():
    assert run("import torch, moetier; " + REPORT) == {"policy": None, "spin": True}
    assert run("import torch, moetier; " + REPORT, env_policy="passive")["spin"] is False


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from moetier.plugins import load_registry

    out = tmp_path_factory.mktemp("omp") / "qwen"
    load_registry().family("qwen").tiny("Qwen3-30B-A3B", str(out), quant=None)
    return out


@pytest.mark.parametrize("first,warned", [("torch", True), ("moetier", False)])
def test_load_warns_when_torch_came_first(tiny, first, warned):
    imports = "import torch, moetier" if first == "torch" else "import moetier, torch"
    code = (f"{imports}, json, warnings\n"
            "torch.set_num_threads(2)\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            f"    m = moetier.load({str(tiny)!r}, backend='cpu.torch', device='cpu', progress=False)\n"
            "print(json.dumps([str(x.message) for x in w if issubclass(x.category, RuntimeWarning)]))")
    messages = run(code)
    assert any("import moetier first" in m and "OMP_WAIT_POLICY=PASSIVE" in m for m in messages) == warned, messages
