#!/usr/bin/env bash
# The GPU checks and figures of issue 12 in one call on a lent NVIDIA machine (the `device` tool), whose
# image already holds jax (CUDA), flax, optax, torch and transformers:
#   the attention-path tests on the GPU (cuDNN's fused kernel against the einsum path in bf16),
#   score_throughput and train_step for flan-t5-large in bf16 against torch on the same GPU,
#   then, while the budget lasts, the same with the einsum attention path (what the fused kernel buys).
#
#   OUT=/tmp/gpu BUDGET=540 bash benchmarks/gpu_suite.sh
#
# Wheels under .whl/ (gin-config, which the image lacks) are installed first.
# Each stage runs under `timeout`, capped by what is left of BUDGET seconds, and logs to $OUT/suite.log;
# a stage that fails or runs out of time does not stop the next one.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_suite}
BUDGET=${BUDGET:-540}
PY=${PY:-python3}
mkdir -p "$OUT"
LOG="$OUT/suite.log"
if ls .whl/*.whl > /dev/null 2>&1; then  # what the image lacks (gin-config), carried as wheels
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.45  # jax and torch share the GPU in one process

stage() {  # stage NAME LIMIT_S COMMAND...
  local name=$1 limit=$2 left=$((BUDGET - SECONDS))
  shift 2
  if [ "$left" -lt 40 ]; then echo "== $name: skipped, ${left}s of the budget left" | tee -a "$LOG"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s, at ${SECONDS}s)" | tee -a "$LOG"
  timeout -k 5 "$limit" "$@" > "$OUT/stage.log" 2>&1
  local rc=$?
  cat "$OUT/stage.log" >> "$LOG"
  grep -vE "^(WARNING|[IWE][0-9]{4} )|absl::InitializeLog|^\s*$" "$OUT/stage.log" | tail -n 40
  echo "== $name rc=$rc at ${SECONDS}s" | tee -a "$LOG"
}

[ -n "${SKIP_ENV:-}" ] || stage gpu 30 nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv
[ -n "${SKIP_ENV:-}" ] || stage versions 60 "$PY" -c "import flax, jax, optax, torch, transformers as t; print('jax', jax.__version__, 'flax', \
flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, 'transformers', t.__version__, jax.devices())"
# The tests' conftest pins CPU with 8 simulated devices unless told otherwise; here: the GPU, and fp32
# matmuls at full precision (XLA's GPU default is TF32) so the fp32 paths agree to 1e-5 as on CPU.
stage attention_tests 120 env JAX_PLATFORMS=cuda CUDA_VISIBLE_DEVICES=0 XLA_FLAGS= \
  JAX_DEFAULT_MATMUL_PRECISION=highest XLA_PYTHON_CLIENT_MEM_FRACTION=0.2 \
  "$PY" -m pytest -q -p no:cacheprovider tests/test_attention_paths.py ${TEST_FILTER:+-k "$TEST_FILTER"}
stage train_large 150 "$PY" benchmarks/train_step.py --preset flan-t5-large --dtype bfloat16 --steps 10 \
  --scan_layers --skip_warm_compile
# Four length buckets: each (rows, bucket) shape of flan-t5-large takes seconds to compile on the GPU.
stage score_large 170 "$PY" benchmarks/score_throughput.py --preset flan-t5-large --dtype bfloat16 \
  --pairs 4300 --batch_size 128 --rounds 2 --scan_layers --length_buckets 128,256,384,512 --skip_warm_compile
stage score_large_einsum 150 "$PY" benchmarks/score_throughput.py --preset flan-t5-large --dtype bfloat16 \
  --pairs 4300 --batch_size 128 --rounds 2 --scan_layers --length_buckets 128,256,384,512 --attention einsum \
  --skip_warm_compile
stage train_large_einsum 110 "$PY" benchmarks/train_step.py --preset flan-t5-large --dtype bfloat16 \
  --steps 5 --scan_layers --attention einsum --skip_warm_compile
rm -f "$OUT/stage.log"
echo "== summary"
grep -E "^== |ratio_vs_torch|pairs/s|steps/s|MFU|first-step loss|max \|ours|compile_s|passed|failed|Error" "$LOG" \
  | grep -v "^== .*(limit"
