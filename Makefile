# The few verbs people use. Everything runs from the repo's own .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODEL ?= checkpoints/tiny-cogvlm

.PHONY: install test serve generate lint format bench gpu-check clean

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	# NOTE: pin the CPU wheel first: an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

$(MODEL)/config.json: | $(STAMP)
	$(BIN)/cogserve init-tiny $(MODEL) --generation 1

# The OpenAI-compatible server on the embedded model: http://127.0.0.1:8000/v1/chat/completions
serve: $(STAMP) $(MODEL)/config.json
	$(BIN)/cogserve serve --model $(MODEL) --served-model-name cogvlm-tiny --host 127.0.0.1 --port 8000

# One generation on the embedded model, no server.
generate: $(STAMP) $(MODEL)/config.json
	$(BIN)/cogserve generate --model $(MODEL) --image tests/assets/shapes.png \
		--prompt "What is in the image?" --max-tokens 16

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

clean:
	rm -rf $(VENV) checkpoints
