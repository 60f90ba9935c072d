# The few verbs people use. Everything runs from the repo's own .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODEL ?= models/cogvlm-tiny-shapes
# The lent GPUs' Triton (3.6) beside the venv's (3.7): the tests compile every kernel for sm_90 with both.
TRITON36 := .triton36

.PHONY: install test serve generate lint format bench compile-check compile-check-triton36 train evaluate clean

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	# NOTE: pin the CPU wheel first: an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

$(TRITON36)/triton/__init__.py: | $(STAMP)
	$(BIN)/pip install -q --no-deps --target $(TRITON36) "triton==3.6.0"

# Two workers, a test file each at a time (module fixtures stay in one process): 237 s against
# about 500 one after the other on this 2-core machine, whose suite neared CI's 10 minutes cold.
test: $(STAMP) $(TRITON36)/triton/__init__.py
	$(BIN)/python -m pytest -n 2 --dist loadfile

# The OpenAI-compatible server on the embedded model: http://127.0.0.1:8000/v1/chat/completions
serve: $(STAMP)
	$(BIN)/cogserve serve --model $(MODEL) --served-model-name cogvlm-tiny --host 127.0.0.1 --port 8000

# One generation on the embedded model, no server.
generate: $(STAMP)
	$(BIN)/cogserve generate --model $(MODEL) --image docs/example-shapes.png --template vqa \
		--prompt "What color is the circle?" --max-tokens 16

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python benchmarks/offline_throughput.py
	$(BIN)/python benchmarks/scheduler_overhead.py
	$(BIN)/python benchmarks/api_overhead.py
	$(BIN)/python benchmarks/load_weights.py

# Every Triton kernel and config the GPU path launches, compiled for sm_90 on this machine (no GPU needed).
compile-check: $(STAMP)
	env -u TRITON_INTERPRET $(BIN)/python -m tests.kernels.hopper_compile

# The same with the lent GPU machines' Triton (3.6).
compile-check-triton36: $(STAMP) $(TRITON36)/triton/__init__.py
	env -u TRITON_INTERPRET PYTHONPATH=$(TRITON36) $(BIN)/python -m tests.kernels.hopper_compile

# Retrain the embedded model (28 minutes on one CPU thread, then a held-out score on the reference path);
# `make evaluate` scores it through the server.
train: $(STAMP)
	$(BIN)/pip install -q -e ".[train]"
	$(BIN)/python -m training.train --out $(MODEL) --eval-per-task 100

evaluate: $(STAMP)
	$(BIN)/python -m training.evaluate --model $(MODEL) --per-task 500 --json $(MODEL)/eval.json

clean:
	rm -rf $(VENV) checkpoints $(TRITON36)
