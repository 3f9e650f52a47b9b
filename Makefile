# The two commands: `make run` (install + default pipeline) and `make test` (install + tests).
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install run test bench clean

install: $(VENV)/.installed

# torch goes first: the CPU wheel is pinned here, and anything that depends on torch
# installed before it would pull the multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	touch $@

run: install
	$(BIN)/rlhf run $(ARGS)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/python benchmarks/validate_throughput.py

clean:
	rm -rf .rlhf
