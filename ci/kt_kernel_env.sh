#!/usr/bin/env bash
# Create (or reuse) a separate virtual environment holding the peer project's published CPU kernels
# (PyPI `kt-kernel`). It is separate because kt-kernel pins its own torch version.
#
#   ci/kt_kernel_env.sh            # venv in build/kt-venv (override with KT_VENV=DIR)
#   KT_KERNEL_VERSION=0.7.2 ci/kt_kernel_env.sh
#
# kt-kernel ships cp3XX wheels: use the same Python version as the main environment (PYTHON=...).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${KT_VENV:-build/kt-venv}
KT_VERSION=${KT_KERNEL_VERSION:-0.7.2}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# pluggy and rich: the runner imports moetier's workload definitions (shapes, routing, byte accounting)
# from this checkout so that both sides measure exactly the same thing.
"$VENV/bin/python" -m pip install "kt-kernel==$KT_VERSION" pluggy rich
# Make this checkout's `moetier` importable in the venv without building it again: a link named
# moetier to core/, found through a .pth file (only pure-Python modules and the bench probes are used).
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
mkdir -p "$VENV/moetier-checkout"
ln -sfn "$PWD/core" "$VENV/moetier-checkout/moetier"
echo "$(cd "$VENV/moetier-checkout" && pwd)" > "$SITE/moetier_checkout.pth"
"$VENV/bin/python" -c "import kt_kernel, torch, moetier.bench.workload; print('kt-kernel', kt_kernel.__version__, 'variant', kt_kernel.__cpu_variant__, 'torch', torch.__version__)"
echo "$VENV"
