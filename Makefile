# One entry point for a fresh machine with Python 3.10+: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-unit test-integration lint audit browser clean

setup: $(STAMP)

$(STAMP): pyproject.toml client/pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU build of torch for dev and CI (a local wheel here; unpinned torch would pull a multi-GB CUDA build).
	$(BIN)/python -m pip install -q torch==2.13.0
	# Only the tritonserver binary, Python backend and stubs of this wheel are used; its Python API's
	# dependencies (numpy<2 included) are not needed.
	$(BIN)/python -m pip install -q --no-deps nvidia-pytriton==0.7.0
	$(BIN)/python -m pip install -q -e ".[dev]" -e ./client
	touch $(STAMP)

demo: setup
	$(BIN)/python scripts/demo.py

lint: setup
	$(BIN)/ruff check .
	bash scripts/lint_deploy.sh

test-unit: setup
	$(BIN)/python -m pytest tests/unit -q

test-integration: setup
	$(BIN)/python -m pytest tests/integration -q

audit: setup
	bash scripts/audit.sh

# Debian's chromium and chromedriver for the playground's browser test (root or sudo; a no-op when installed).
browser:
	bash scripts/install_browser.sh

test: lint
	$(BIN)/python -m pytest -q -ra tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
