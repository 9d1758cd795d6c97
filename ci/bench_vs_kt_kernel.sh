#!/usr/bin/env bash
# The side-by-side comparison, repeatable by anyone: the peer's published CPU kernels (kt-kernel, in
# their own virtual environment) and moetier's, on the same shapes, weights, routings and byte counts.
#
#   ci/bench_vs_kt_kernel.sh [OUTDIR] [bench options...]
#   ci/bench_vs_kt_kernel.sh bench-results --quick
#   ci/bench_vs_kt_kernel.sh bench-results --shapes qwen3-30b --formats bf16,int8 --batches 1,512
#
# Writes OUTDIR/kt-kernel.{json,txt} and OUTDIR/moetier.{json,txt,md}; the moetier table carries the
# kt-kernel rate and the ratio per shape, format, batch and thread count.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench-results}
shift || true
mkdir -p "$OUT"
VENV=$(ci/kt_kernel_env.sh | tail -n 1)
"$VENV/bin/python" ci/bench_kt_kernel.py "$@" --json "$OUT/kt-kernel.json" 2>&1 | tee "$OUT/kt-kernel.txt"
python -m moetier.cli bench kernels "$@" --peer "$OUT/kt-kernel.json" --json "$OUT/moetier.json" \
    --markdown "$OUT/moetier.md" 2>&1 | tee "$OUT/moetier.txt"
