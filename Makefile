# The README's commands. Each one creates the virtual environment on first use:
# it installs the pinned CPU torch first when no torch is importable (so pip never pulls the
# multi-GB CUDA build on a CPU machine), then this package with its dev tools.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.valleys-installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		echo "torch found in $(PYTHON): the venv will reuse it"; \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV); \
	fi
	@$(BIN)/python -c "import torch" 2>/dev/null || \
		$(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $@

demo: $(STAMP)
	$(BIN)/valleys demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check src tests benchmarks examples
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check src tests benchmarks examples

# Every benchmark script in benchmarks/, one after the other, each with the arguments that
# benchmarks/RESULTS.md records for it (BENCH_ARGS_<script name>; none for most).
BENCHMARKS := $(sort $(wildcard benchmarks/*.py))
BENCH_ARGS_loader_overhead := --threads 1
BENCH_ARGS_harness_overhead := --threads 1

bench: $(STAMP)
	@set -e; $(foreach b,$(BENCHMARKS),echo "== $(b)"; \
		$(BIN)/python $(b) $(BENCH_ARGS_$(basename $(notdir $(b)))); )

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
