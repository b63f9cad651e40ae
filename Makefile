# Quick start: `make demo` (set up, then run the whole pipeline on phantoms) and
# `make test` (set up, then run the default test suite). Needs Python 3.11, pip, make.

PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
WORKDIR ?= ribfrac-demo
PYTEST_ARGS ?=

.PHONY: venv demo test test-slow test-all benchmark clean

# The stamp is rebuilt when pyproject.toml changes, so `make test` reuses a
# current environment and repairs an outdated one.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(BIN)/ribfrac-ray demo --workdir $(WORKDIR)

test: venv
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: venv
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

test-all: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

benchmark: venv
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf $(VENV) $(WORKDIR) .pytest_cache
