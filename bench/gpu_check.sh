#!/usr/bin/env bash
# GPU check of issue 11, in one go (about 10 minutes on one H100/H200):
#   1. the CUDA tests: the tiles on the GPU in fp32, bf16, fp16 and auto give the CPU's
#      float32 results bit for bit (tests/test_precision.py -k cuda);
#   2. bench/gpu_check.py: exact 1M x 512 and 10M x 512 from float16 stores with tensor-core
#      candidates (precision auto; --precisions fp16,bf16 for more), checked against fp32 on sampled row blocks,
#      the GPU GEMM rates, and the encoder's embedding throughput.
# Usage: bash bench/gpu_check.sh [extra gpu_check.py arguments, e.g. --sizes 1000000]
# Writes $OUT/gpu_check.log and $OUT/gpu_check.json when $OUT is set.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
OUT=${OUT:-bench/_out}
mkdir -p "$OUT"
export OUT DEDUP_INDEX_PROGRESS=0
{
  echo "== nvidia-smi"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  echo "== CUDA tests"
  timeout 240 "$PY" -m pytest -q -x tests/test_precision.py tests/test_gpu_path.py tests/test_gpu_encode.py tests/test_index.py -k cuda -p no:cacheprovider
  tests=$?
  echo "== CUDA tests on Ray (each tile task on its GPU)"
  timeout 120 "$PY" -m pytest -q -x tests/test_distributed.py -k cuda -p no:cacheprovider || tests=$((tests + 100))
  echo "== GPU benchmark"
  timeout 540 "$PY" bench/gpu_check.py "$@"
  bench=$?
  echo "== exit: tests $tests, benchmark $bench"
} 2>&1 | tee "$OUT/gpu_check.log"
