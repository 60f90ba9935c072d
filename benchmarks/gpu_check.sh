#!/usr/bin/env bash
# The one GPU check a lent machine runs (< 8 minutes, no network): the GPU tests with compiled
# kernels, then the kernel and decode benchmarks; their short tables are printed last.
# Usage (repo root): bash benchmarks/gpu_check.sh [tests] [kernels] [decode] [gemv]   # no argument: all
# Logs and JSON go to $OUT (default /tmp/gpu_check). COMMIT=abc1234 names the commit where .git is absent or stale.
set -uo pipefail
PARTS=${*:-tests kernels decode gemv}
want() { [[ " $PARTS " == *" $1 "* ]]; }
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
PY=${PY:-python3}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'commit', '${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}')" | tee -a "$OUT/gpu.txt"

tests_rc=0 bench_rc=0 decode_rc=0 gemv_rc=0
# The GPU machine has no HTTP stack (fastapi, pydantic, openai): the tests that need CUDA are in
# the kernels, the model and the engine; the HTTP tests run on CPU in CI.
if want tests; then
    echo "== GPU tests (compiled kernels) =="
    timeout 240 $PY -m pytest -rf --tb=short tests/kernels tests/model tests/server/test_engine.py \
        tests/server/test_scheduler.py tests/server/test_detokenizer.py \
        tests/server/test_async_scheduling.py::test_lookahead_on_cuda_gives_the_same_outputs \
        2>&1 | tee "$OUT/tests.log" | tail -n 40
    tests_rc=${PIPESTATUS[0]}
fi

if want kernels; then
    echo "== kernel benchmark =="
    timeout 300 $PY benchmarks/kernels/bench_expert_linear.py --json "$OUT/bench_expert_linear.json" 2>&1 \
        | tee "$OUT/bench.log"
    bench_rc=${PIPESTATUS[0]}
fi

if want decode; then
    echo "== decode benchmark (CogVLM-17B architecture, random weights) =="
    timeout 200 $PY benchmarks/bench_decode.py 2>&1 | tee "$OUT/bench_decode.log" | tail -n 12
    decode_rc=${PIPESTATUS[0]}
fi
if want gemv; then
    echo "== GEMV experiment (one row, CogVLM-17B's decode shapes: Triton split-K against cuBLAS) =="
    timeout 150 $PY benchmarks/kernels/bench_gemv.py 2>&1 | tee "$OUT/bench_gemv.log"
    gemv_rc=${PIPESTATUS[0]}
fi
echo "tests exit $tests_rc, kernel benchmark exit $bench_rc, decode benchmark exit $decode_rc, gemv exit $gemv_rc"
exit $(( tests_rc || bench_rc || decode_rc || gemv_rc ))
