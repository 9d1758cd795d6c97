#!/usr/bin/env bash
# The GPU-machine check: on a machine with an NVIDIA GPU, one run of this script gives every figure
# moetier needs from such a machine, within ten minutes, with every result written under one folder.
#
#   ci/device_check.sh [OUT_DIR] [--cpu-only] [--no-install] [--smoke] [--python=PATH]
#
# OUT_DIR      where results go (default: $OUT if set, else ./device-check). At most 8 files:
#                summary.txt            one line per step: status, seconds, what it found
#                log.txt                everything every step printed
#                doctor.json            moetier doctor --json (inventory, every backend's verdict: cpu.amx
#                                       says whether the host CPU has AMX)
#                conformance_cuda.json  the conformance suite on the cuda backend
#                conformance_amx.json   the conformance suite on cpu.amx (hosts with AMX only)
#                decode_gpu.json        the decode step on the GPU (eager and graph-replayed): time per step
#                                       and GB/s of expert bytes, DeepSeek-V3 expert shape
#                bench_kernels.json     moetier bench kernels --quick on the host CPU
#                bench_hybrid.json      moetier bench hybrid: per share of experts on the GPU and batch, the
#                                       CPU part, the GPU part and the joint step (CUDA graphs), overlap
#                                       efficiency, GPU expert bytes/s as a share of memory bandwidth,
#                                       host-function costs (--cpu-only: the CPU stand-in, tiny shape)
# --cpu-only   skip every GPU step (the test suite runs the script so on machines without a GPU)
# --no-install use the Python environment as it is (moetier already installed there)
# --smoke      the CPU benchmark on its tiny shape only (seconds instead of minutes; for the test suite)
# --python=P   the Python to use (default: python3 on PATH, the one holding torch on the GPU machines)
#
# Installs: a CUDA build of torch 2.13.0 (the version CI's CPU build has) when the machine has none or
# another version and pip can reach one; otherwise it says which torch it uses. Then moetier itself
# (pip install --no-build-isolation: setuptools and pybind11 must be there, the kernels compile here).
set -uo pipefail

OUT_DIR="${OUT:-./device-check}"
CPU_ONLY=0 INSTALL=1 SMOKE=0 PY=python3
for arg in "$@"; do
    case "$arg" in
        --cpu-only) CPU_ONLY=1 ;;
        --no-install) INSTALL=0 ;;
        --smoke) SMOKE=1 ;;
        --python=*) PY="${arg#--python=}" ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 0 ;;
        -*) echo "device_check.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
        *) OUT_DIR="$arg" ;;
    esac
done
cd "$(dirname "$0")/.."
mkdir -p "$OUT_DIR" || { echo "device_check.sh: cannot create $OUT_DIR" >&2; exit 2; }
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
SUMMARY="$OUT_DIR/summary.txt" LOG="$OUT_DIR/log.txt"
: >"$SUMMARY"; : >"$LOG"
command -v "$PY" >/dev/null || { echo "device_check.sh: no Python at $PY" >&2; exit 2; }
TORCH_WANTED=2.13.0
START=$(date +%s)
DEADLINE=$((START + 570))  # ten minutes, less a margin for writing up
export PYTHONUNBUFFERED=1
FAILED=0

note() { echo "$*" | tee -a "$SUMMARY" "$LOG"; }

# step NAME BUDGET_S CMD...: runs CMD with a timeout (its budget, or what is left of the ten minutes),
# appends its output to log.txt and one line to summary.txt.
step() {
    local name="$1" budget="$2"; shift 2
    local now left t0 rc secs
    now=$(date +%s); left=$((DEADLINE - now))
    if [ "$left" -lt 15 ]; then note "SKIP  $name: out of time"; return 0; fi
    [ "$budget" -gt "$left" ] && budget=$left
    echo "===== $name ($budget s): $*" >>"$LOG"
    t0=$(date +%s)
    timeout --kill-after=10 "$budget" "$@" >>"$LOG" 2>&1
    rc=$?
    secs=$(( $(date +%s) - t0 ))
    if [ "$rc" -eq 0 ]; then note "OK    $name (${secs}s)"
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then note "FAIL  $name: timed out after ${secs}s"; FAILED=1
    else note "FAIL  $name: exit $rc after ${secs}s (see log.txt)"; FAILED=1
    fi
    return "$rc"
}

skip() { note "SKIP  $1: $2"; }

note "moetier device check, $(date -u +%Y-%m-%dT%H:%M:%SZ), output in $OUT_DIR"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | sed 's/^/gpu:  /' | tee -a "$SUMMARY" "$LOG"
else
    note "gpu:  nvidia-smi not found"
fi

torch_facts() {  # "VERSION CUDA_VERSION_OR_None CUDA_AVAILABLE" or nothing
    "$PY" -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())' 2>/dev/null
}

# ---- install -------------------------------------------------------------------------------------
GPU_OK=0
if [ "$CPU_ONLY" -eq 0 ]; then
    facts="$(torch_facts)"
    if [ -z "$facts" ]; then
        note "torch: not importable with $PY"
    else
        note "torch: $facts (version, CUDA, GPU visible)"
    fi
    version="${facts%% *}"
    if [ "$INSTALL" -eq 1 ] && { [ -z "$facts" ] || [ "$(echo "$facts" | cut -d' ' -f2)" = "None" ] || [ "${version%%+*}" != "$TORCH_WANTED" ]; }; then
        # PyPI's Linux x86-64 wheel of torch is the CUDA build.
        if step "install torch $TORCH_WANTED (CUDA build)" 240 "$PY" -m pip install --quiet --retries 0 --timeout 15 "torch==$TORCH_WANTED"; then
            note "torch: now $(torch_facts)"
        else
            note "torch: pip could not install torch $TORCH_WANTED (no index reachable?); using what is there: ${facts:-none}"
        fi
    fi
    facts="$(torch_facts)"
    if [ "$(echo "$facts" | cut -d' ' -f3)" = "True" ] && [ "$(echo "$facts" | cut -d' ' -f2)" != "None" ]; then
        GPU_OK=1
        [ "${facts%%+*}" != "$TORCH_WANTED" ] && note "torch: NOTE the figures below come from torch ${facts%% *}, not $TORCH_WANTED"
    else
        note "torch: no CUDA build seeing a GPU (${facts:-torch missing}): GPU steps are skipped"
    fi
fi
if [ "$INSTALL" -eq 1 ]; then
    missing="$("$PY" -c '
import importlib.util
need = {"pluggy": "pluggy", "numpy": "numpy", "safetensors": "safetensors", "rich": "rich", "pybind11": "pybind11",
        "setuptools": "setuptools", "wheel": "wheel", "pytest": "pytest"}
print(" ".join(p for m, p in need.items() if importlib.util.find_spec(m) is None))')"
    if [ -n "$missing" ]; then
        step "install missing packages: $missing" 120 "$PY" -m pip install --quiet --retries 0 --timeout 15 $missing
    fi
    step "pip install . (builds the kernels)" 300 "$PY" -m pip install --quiet --no-build-isolation --no-deps . || {
        note "moetier did not install: nothing else can run"; exit 1; }
fi
MOETIER="$("$PY" -c 'import os, sys; print(os.path.join(os.path.dirname(sys.executable), "moetier"))')"
[ -x "$MOETIER" ] || { note "no moetier command next to $PY"; exit 1; }

# ---- what this machine is --------------------------------------------------------------------------
step "moetier doctor" 90 "$MOETIER" doctor
"$MOETIER" doctor --json >"$OUT_DIR/doctor.json" 2>>"$LOG" || note "FAIL  moetier doctor --json"
AMX="$("$PY" - "$OUT_DIR/doctor.json" <<'PYEOF'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
    v = [b for b in d["backends"] if b["name"] == "cpu.amx"][0]
    print(("yes " if v["score"] > 0 else "no ") + v["reason"])
except Exception as exc:
    print(f"unknown (doctor.json unreadable: {exc})")
PYEOF
)"
note "host CPU AMX: $AMX"

# ---- the GPU -----------------------------------------------------------------------------------------
if [ "$CPU_ONLY" -eq 1 ]; then
    for s in "conformance on cuda" "GPU tests" "decode step on the GPU"; do skip "$s" "--cpu-only"; done
elif [ "$GPU_OK" -eq 0 ]; then
    for s in "conformance on cuda" "GPU tests" "decode step on the GPU" "bench hybrid"; do
        skip "$s" "no usable CUDA torch"
    done
else
    step "conformance on cuda" 150 "$MOETIER" conformance --backend cuda -q --report "$OUT_DIR/conformance_cuda.json"
    step "GPU tests" 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_accel_gpu.py tests/test_hybrid_gpu.py
    step "decode step on the GPU" 120 "$PY" - "$OUT_DIR/decode_gpu.json" <<'PYEOF'
# The decode step at DeepSeek-V3's expert shape (H 7168, I 2048), 32 experts held, 8 routed per token:
# time per step eager and graph-replayed, and GB/s of the distinct experts' bytes each step reads.
import json, sys, time
import torch
from moetier.experts import ExpertLayerSpec, ExpertTensors, ExpertWeights
from moetier.formats import quantize
from moetier.hardware import load_inventory
from moetier.plugins import get_registry

backend = get_registry().backend("cuda").factory(load_inventory())
E, K, H, I = 32, 8, 7168, 2048
layer = ExpertLayerSpec(E, K, H, I)
rows = []
for fmt in ("bf16", "fp8_e4m3", "int4_g128", "int8"):
    g = torch.Generator().manual_seed(0)
    base = [quantize(torch.randn(n, m, generator=g) / m ** 0.5, fmt) for n, m in ((I, H), (I, H), (H, I))]
    weights = ExpertWeights({e: ExpertTensors(*base) for e in range(E)})  # same bytes per expert: timing only
    p = backend.prepare(layer, weights, range(E), fmt)
    for batch in (1, 8):
        ids = torch.stack([torch.randperm(E)[:K] for _ in range(batch)]).cuda()
        x = torch.randn(batch, H, device="cuda", dtype=torch.bfloat16)
        w = torch.softmax(torch.randn(batch, K, device="cuda"), -1)
        distinct = int(ids.unique().numel())
        for graph in (False, True):
            try:
                r = backend.decode_runner(p, batch, graph=graph)
            except Exception as exc:
                rows.append(dict(fmt=fmt, batch=batch, graph=graph, error=f"{type(exc).__name__}: {exc}"))
                continue
            for _ in range(3):
                r.run(x, ids, w)
            torch.cuda.synchronize()
            n = 50
            t0 = time.perf_counter()
            for _ in range(n):
                r.run(x, ids, w)
            torch.cuda.synchronize()
            dt = (time.perf_counter() - t0) / n
            gbs = distinct * layer.expert_bytes(fmt) / dt / 1e9
            rows.append(dict(fmt=fmt, batch=batch, graph=graph, path=r.path, us_per_step=dt * 1e6,
                             distinct_experts=distinct, expert_gb_per_s=gbs))
            print(f"{fmt:10s} batch {batch:2d} {'graph' if graph else 'eager'}  {r.path:8s} "
                  f"{dt * 1e6:9.1f} us/step  {gbs:8.1f} GB/s of expert bytes ({distinct} experts)")
json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows},
          open(sys.argv[1], "w"), indent=1)
PYEOF
fi

# ---- the hybrid step ------------------------------------------------------------------------------------
# Right after the GPU steps, so that the host-CPU steps below, not this one, absorb a slow build. Its own
# budget (--time-budget) stops it starting new configurations in time to finish within the step's; the
# JSON is rewritten after every configuration, so a cut-short run still leaves what it measured.
if [ "$CPU_ONLY" -eq 1 ]; then
    step "bench hybrid (CPU stand-in)" 120 "$MOETIER" bench hybrid --cpu-stand-in --quick --shapes tiny --batches 1 \
        --shares 0,0.5,1 --json "$OUT_DIR/bench_hybrid.json"
elif [ "$GPU_OK" -eq 1 ]; then
    step "bench hybrid" 200 "$MOETIER" bench hybrid --quick --time-budget 140 --json "$OUT_DIR/bench_hybrid.json"
fi

# ---- the host CPU ------------------------------------------------------------------------------------
case "$AMX" in
    yes*) step "conformance on cpu.amx" 150 "$MOETIER" conformance --backend cpu.amx -q --report "$OUT_DIR/conformance_amx.json" ;;
    *) skip "conformance on cpu.amx" "the host CPU has no usable AMX" ;;
esac
if [ "$SMOKE" -eq 1 ]; then
    step "bench kernels (smoke)" 120 "$MOETIER" bench kernels --quick --shapes tiny --batches 1 --formats bf16 \
        --json "$OUT_DIR/bench_kernels.json"
else
    step "bench kernels --quick" 240 "$MOETIER" bench kernels --quick --json "$OUT_DIR/bench_kernels.json"
fi


note "done in $(( $(date +%s) - START ))s"
exit "$FAILED"
