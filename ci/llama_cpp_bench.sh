#!/usr/bin/env bash
# llama.cpp on the same weights as `moetier bench model`: builds llama-cpp-python from source in its own
# virtual environment, converts the synthetic checkpoint to GGUF (BF16, Q8_0, Q4_0, Q4_K_M) and measures
# prefill and decode the way the moetier bench does (greedy, median of repeats after a warm-up).
#
#   moetier bench model --model build/bench-model --json moetier.json     # writes the checkpoint (and runs)
#   ci/llama_cpp_bench.sh build/bench-model llama.json [--quick]          # this script
#   moetier bench model --model build/bench-model --llama-cpp llama.json  # side by side
#
# With --logits N it writes llama.cpp's logits over an N-token prompt instead of timing, for
# ci/llama_cpp_compare.py (moetier's logits on the same weights against llama.cpp's and transformers'):
#   moetier bench model --dims tiny-deepseek --model build/tiny-ds --no-transformers --format bf16
#   ci/llama_cpp_bench.sh build/tiny-ds logits.npz --logits 32 --types BF16,Q8_0
#   python ci/llama_cpp_compare.py build/tiny-ds logits.npz
#
# Not part of the test run: building llama.cpp takes minutes and needs PyPI (or a local mirror).
# Environment: LLAMA_VENV (default build/llama-venv), LLAMA_CPP_PYTHON_VERSION (default: newest), PYTHON,
# THREADS (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 2 ]; then
    echo "usage: ci/llama_cpp_bench.sh CHECKPOINT_DIR RESULTS.json [--quick] [--types BF16,Q8_0,Q4_0,Q4_K_M]" >&2
    exit 2
fi
CKPT=$1; OUT=$2; shift 2
VENV=${LLAMA_VENV:-build/llama-venv}
PY=${PYTHON:-python3}
SPEC="llama-cpp-python${LLAMA_CPP_PYTHON_VERSION:+==$LLAMA_CPP_PYTHON_VERSION}"

if [ ! -f "$CKPT/config.json" ]; then
    echo "ci/llama_cpp_bench.sh: $CKPT has no config.json; write the checkpoint first with" \
         "\`moetier bench model --model $CKPT\`" >&2
    exit 2
fi
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
# numpy, safetensors and gguf: the converter (ci/llama_cpp_bench.py) reads the safetensors checkpoint and
# writes GGUF with llama.cpp's own writer package; torch is not needed in this environment.
if ! "$VENV/bin/python" -m pip install --quiet numpy safetensors "gguf>=0.19"; then
    echo "ci/llama_cpp_bench.sh: could not install numpy, safetensors and gguf into $VENV (no package index" \
         "reachable?)" >&2
    exit 3
fi
if ! "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
    # From source, for this CPU's instruction set (GGML_NATIVE), as a user building llama.cpp would.
    if ! CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_OPENMP=ON" FORCE_CMAKE=1 \
         "$VENV/bin/python" -m pip install --no-binary llama-cpp-python --no-cache-dir "$SPEC"; then
        echo "ci/llama_cpp_bench.sh: could not build $SPEC from source: its source distribution must come" \
             "from PyPI (or a mirror) and the build needs cmake and a C++ compiler; nothing was measured" >&2
        exit 3
    fi
fi
THREADS=${THREADS:-2} exec "$VENV/bin/python" ci/llama_cpp_bench.py "$CKPT" "$OUT" "$@"
