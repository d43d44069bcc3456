#!/usr/bin/env bash
# Tier-1 tests on a lent GPU machine in one call (docs/testing.md#tiers): the files in the order
# they matter, each part under its own time limit so one slow part cannot take the others' time
# (a part stopped by it says rc=124; no single test is failed for being slow).
# Every failure's traceback is appended to $OUT/failures.log as it happens (tests/conftest.py).
# Usage there: bash tests/tier1/run.sh [PART_SECONDS_A PART_SECONDS_B PART_SECONDS_C]
set -u
OUT=${OUT:-/tmp/tier1}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CI=1 EFFLLM_FAILURE_LOG="$OUT/failures.log"
if ls .whl/*.whl >/dev/null 2>&1; then  # carried wheels (the image's transformers is older than ours)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:src
else
  export PYTHONPATH=src
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
part() {  # name, seconds, pytest args...
  local name=$1 secs=$2; shift 2
  local t0=$SECONDS
  timeout "$secs" python3 -m pytest -q -p no:cacheprovider -m "not model" -n 8 "$@" > "$OUT/$name.log" 2>&1
  echo "== $name rc=$? $((SECONDS - t0))s: $(grep -E '^(FAILED|ERROR)|[0-9]+ (passed|failed)' "$OUT/$name.log" | tail -12 | tr '\n' ' ')"
}
part A "${1:-130}" tests/test_kv_exact_keys.py tests/test_moe_gpu.py tests/test_kv_gpu.py tests/test_kv_codes_attention.py \
  tests/test_kernel_scores.py tests/test_kv_protected.py tests/test_kv_quant.py tests/test_kv_nsnquant.py tests/test_decode.py
part B "${2:-130}" tests/test_kv.py tests/test_kvzip.py tests/test_kernel_layers.py tests/test_patch.py tests/test_quant.py \
  tests/test_quant_formats.py tests/test_moe_offload.py tests/test_bad_input.py tests/test_backend.py tests/test_attention_ops.py
part C "${3:-300}" tests/test_attention_gpu.py tests/test_attention_triton.py tests/test_attention_varlen.py tests/test_attention_torch.py
echo "failures logged: $(grep -c '' "$OUT/failures.log" 2>/dev/null || echo 0) lines"
