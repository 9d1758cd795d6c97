"""The command line as a user runs it."""
import json

from cli_helpers import assert_usage_error, moetier
from conftest import INVENTORIES


def test_doctor_reports_this_machine():
    r = moetier("doctor")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for word in ("CPU", "ISA", "NUMA 0", "Backends", "Chosen", "cpu.torch", "cpu.amx"):
        assert word in out


def test_doctor_json_on_a_recorded_amx_server():
    r = moetier("doctor", "--json", "--inventory", str(INVENTORIES / "xeon_amx_2socket_rtx4090.json"))
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["inventory"]["cpu"]["model"].startswith("Intel(R) Xeon(R) Platinum")
    assert len(data["inventory"]["numa_nodes"]) == 2
    names = {b["name"]: b for b in data["backends"]}
    assert names["cuda"]["chosen"] is False and "RTX 4090" in names["cuda"]["reason"]
    assert data["chosen"]["cpu"] == "cpu.amx"


def test_doctor_strict_and_forced_errors_speak_plainly():
    r = moetier("doctor", "--strict", "--inventory", str(INVENTORIES / "xeon_amx_2socket_rtx4090.json"))
    assert r.returncode == 2 and "--strict: cuda would be downgraded" in r.stderr and "Traceback" not in r.stderr
    r = moetier("doctor", "--backend", "cpu.amx", "--inventory", str(INVENTORIES / "zen4_avx512_2core.json"))
    assert r.returncode == 2 and "CPU lacks amx_tile" in r.stderr


def test_conformance_command_writes_a_report(tmp_path):
    report = tmp_path / "r.json"
    r = moetier("conformance", "--backend", "cpu.torch", "--format", "int4_g64", "--report", str(report), "-q")
    assert r.returncode == 0, r.stdout[-2000:]
    data = json.loads(report.read_text())
    s = data["summary"]["cpu.torch"]["int4_g64"]
    assert data["ok"] and s["run"] == s["passed"] > 40 and s["failed"] == 0
    assert "PASSED" in r.stdout


def test_conformance_on_a_backend_that_cannot_run_fails():
    r = moetier("conformance", "--backend", "cpu.amx", "-q", "--inventory", str(INVENTORIES / "zen4_avx512_2core.json"))
    assert_usage_error(r, "cpu.amx", "amx_tile")
