#!/usr/bin/env bash
# Tier-1 tests on a lent GPU machine in one call (docs/testing.md#tiers): the files in the order
# they matter. Nothing here is timed or time-limited: every part runs to its end (a short lease
# is bounded by the device tool's own timeout, outside the tests).
# Every failure's traceback is appended to $OUT/failures.log as it happens (tests/conftest.py).
# Usage there: bash tests/tier1/run.sh
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
part() {  # name, pytest args...
  local name=$1; shift
  python3 -m pytest -q -p no:cacheprovider -m "not model" -n 8 "$@" > "$OUT/$name.log" 2>&1
  echo "== $name rc=$?: $(grep -E '^(FAILED|ERROR)|[0-9]+ (passed|failed)' "$OUT/$name.log" | tail -12 | tr '\n' ' ')"
}
part A tests/test_kv_exact_keys.py tests/test_moe_gpu.py tests/test_kv_gpu.py tests/test_kv_codes_attention.py \
  tests/test_kernel_scores.py tests/test_kv_protected.py tests/test_kv_quant.py tests/test_kv_nsnquant.py tests/test_decode.py
part B tests/test_kv.py tests/test_kvzip.py tests/test_kernel_layers.py tests/test_patch.py tests/test_quant.py \
  tests/test_quant_formats.py tests/test_moe_offload.py tests/test_bad_input.py tests/test_backend.py tests/test_attention_ops.py
part C tests/test_attention_gpu.py tests/test_attention_triton.py tests/test_attention_varlen.py tests/test_attention_torch.py
echo "failures logged: $(grep -c '' "$OUT/failures.log" 2>/dev/null || echo 0) lines"
