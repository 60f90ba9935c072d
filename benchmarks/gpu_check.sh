#!/usr/bin/env bash
# The one GPU check a lent machine runs (< 8 minutes, no network): the GPU tests with compiled
# kernels, then the kernel and decode benchmarks; their short tables are printed last.
# Usage (repo root): bash benchmarks/gpu_check.sh   # logs and JSON go to $OUT (default /tmp/gpu_check)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
PY=${PY:-python3}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'commit', '$(git rev-parse --short HEAD 2>/dev/null)')" | tee -a "$OUT/gpu.txt"

echo "== GPU tests (compiled kernels) =="
timeout 170 $PY -m pytest -q -rf --tb=line tests/kernels tests/model tests/server 2>&1 | tee "$OUT/tests.log" | tail -n 15
tests_rc=${PIPESTATUS[0]}

echo "== kernel benchmark =="
timeout 230 $PY benchmarks/kernels/bench_expert_linear.py --json "$OUT/bench_expert_linear.json" 2>&1 \
    | grep -v "benchmarking:" | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}

echo "== decode benchmark (CogVLM-17B architecture, random weights) =="
timeout 200 $PY benchmarks/bench_decode.py 2>&1 | tee "$OUT/bench_decode.log" | tail -n 6
decode_rc=${PIPESTATUS[0]}
echo "tests exit $tests_rc, kernel benchmark exit $bench_rc, decode benchmark exit $decode_rc"
exit $(( tests_rc || bench_rc || decode_rc ))
