"""ci/device_check.sh as far as it runs without a GPU: every CPU step for real, the GPU steps skipped
and said so, at most 8 result files (what a GPU lease brings back)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "ci" / "device_check.sh"


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def test_cpu_only_run_writes_every_cpu_result_and_names_each_skipped_gpu_step(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(SCRIPT), str(out), "--cpu-only", "--no-install", "--smoke",
                           f"--python={sys.executable}"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = (out / "summary.txt").read_text()
    for line in ("OK    moetier doctor", "SKIP  conformance on cuda: --cpu-only", "SKIP  GPU tests: --cpu-only",
                 "SKIP  decode step on the GPU: --cpu-only", "OK    bench kernels (smoke)",
                 "OK    bench hybrid (CPU stand-in)", "host CPU AMX: "):
        assert line in summary, summary
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and {"summary.txt", "log.txt", "doctor.json", "bench_kernels.json",
                                "bench_hybrid.json"} <= set(files)
    doctor = json.loads((out / "doctor.json").read_text())
    verdicts = {b["name"]: b for b in doctor["backends"]}
    assert {"cuda", "cpu.amx", "cpu.accel"} <= set(verdicts)
    amx_line = next(line for line in summary.splitlines() if line.startswith("host CPU AMX: "))
    assert amx_line.startswith("host CPU AMX: yes" if verdicts["cpu.amx"]["score"] > 0 else "host CPU AMX: no")
    bench = json.loads((out / "bench_kernels.json").read_text())
    assert len(bench["records"]) >= 1  # timings of a real (tiny) run
    hybrid = json.loads((out / "bench_hybrid.json").read_text())
    assert hybrid["stand_in"] is True and len(hybrid["rows"]) == 3  # shares 0, 0.5, 1 at batch 1
    assert all(r["matches_standard_path"] for r in hybrid["rows"])
    assert "Traceback" not in (out / "log.txt").read_text()


def test_unknown_option_is_a_usage_error(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), "--frobnicate"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "device_check.sh: unknown option --frobnicate (see --help)"
