#!/usr/bin/env bash
# The wheels a lent GPU machine lacks (it has no internet, no pydantic and no xgrammar): fetched here
# into .whl/ (git-ignored) for CPython 3.12 on x86-64, about 7 MB. Carried with `carry: [".whl"]`,
# gpu_check.sh installs them, and the CUDA look-ahead test then runs structured outputs (grammar
# bitmasks from the host, unpacked and applied after a decode-graph replay) on the GPU.
# Usage (repo root, on the machine with the registry): bash benchmarks/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# One version of each (two stop the whole install there). xgrammar within pyproject's [structured]
# range; the rest are its needs and pydantic's (Requires-Dist of each wheel) that the GPU image lacks.
# torch, transformers, triton and numpy are in the image already.
WHEELS=(
    xgrammar==0.2.8
    apache-tvm-ffi==0.1.15.post2
    pydantic==2.14.4
    pydantic-core==2.50.5
    annotated-types==0.8.0
    typing-inspection==0.4.5
    typing-extensions==4.16.0  # pydantic-core 2.50 needs >= 4.16; the image's may be older
)
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
ls .whl
du -sh .whl
