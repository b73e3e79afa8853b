# Two entry points, both self-contained on a fresh machine:
#   make demo   create/update .venv, then run the whole pipeline on the tiny recipe
#   make test   create/update .venv, then lint and run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint env clean

env: $(STAMP)

# torch==2.13.0 goes in first: it resolves to the local CPU wheel, and every
# later requirement is then satisfied by it instead of pulling CUDA builds.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: env
	$(BIN)/vicuna-sky demo

lint: env
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
