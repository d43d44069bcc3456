#!/usr/bin/env bash
# Tier-1 tests on a lent GPU machine in one call (docs/testing.md#tiers): the files in the order
# they matter. No test is timed: a part runs to its end unless given an optional wall-clock
# budget (seconds; 0 or none: no budget), which only decides how much of the device time a part
# may use; a part stopped by its budget is reported as not finished, never as a failure.
# Every failure's traceback is appended to $OUT/failures.log as it happens (tests/conftest.py).
# Usage there: bash tests/tier1/run.sh [BUDGET_A BUDGET_B BUDGET_C]  (e.g. 130 130 300 on a 15-minute lease)
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
part() {  # name, budget seconds (0: none), pytest args...
  local name=$1 secs=$2; shift 2
  local t0=$SECONDS rc
  local run=(python3 -m pytest -q -p no:cacheprovider -m "not model" -n 8 "$@")
  if [ "$secs" -gt 0 ]; then timeout "$secs" "${run[@]}" > "$OUT/$name.log" 2>&1; else "${run[@]}" > "$OUT/$name.log" 2>&1; fi
  rc=$?
  local state="rc=$rc"; [ "$rc" -eq 124 ] && state="not finished: its ${secs}s budget ran out (not a failure)"
  echo "== $name $state $((SECONDS - t0))s: $(grep -E '^(FAILED|ERROR)|[0-9]+ (passed|failed)' "$OUT/$name.log" | tail -12 | tr '\n' ' ')"
}
part A "${1:-0}" tests/test_kv_exact_keys.py tests/test_moe_gpu.py tests/test_kv_gpu.py tests/test_kv_codes_attention.py \
  tests/test_kernel_scores.py tests/test_kv_protected.py tests/test_kv_quant.py tests/test_kv_nsnquant.py tests/test_decode.py
part B "${2:-0}" tests/test_kv.py tests/test_kvzip.py tests/test_kernel_layers.py tests/test_patch.py tests/test_quant.py \
  tests/test_quant_formats.py tests/test_moe_offload.py tests/test_bad_input.py tests/test_backend.py tests/test_attention_ops.py
part C "${3:-0}" tests/test_attention_gpu.py tests/test_attention_triton.py tests/test_attention_varlen.py tests/test_attention_torch.py
echo "failures logged: $(grep -c '' "$OUT/failures.log" 2>/dev/null || echo 0) lines"
