# One command each for a fresh machine: `make serve` and `make test` create .venv themselves.
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install serve test test-fast lint bench-prefill

$(BIN)/packserve: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first, so nothing pulls a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,bench]'
	touch $@

install: $(BIN)/packserve

serve: install
	$(BIN)/packserve serve --host $(HOST) --port $(PORT)

test: install
	$(BIN)/ruff check .
	$(BIN)/pytest

# The in-process tests of the packages (no server, no external tool), minus those marked slow:
# ~3 min on 2 cores (README). `make test` (CI) runs everything.
test-fast: install
	$(BIN)/pytest -m "not slow" \
		tests/scheduler tests/engine tests/kernels tests/models tests/test_package.py

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy packserve

bench-prefill: install
	$(BIN)/python -m bench.prefill
