# Two entry points, both self-contained on a fresh machine:
#   make demo   create/update .venv, then run the whole pipeline on the tiny recipe
#   make test   create/update .venv, then lint and run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint env browser clean

env: $(STAMP) browser

# The chat UI's tests drive Debian's Chromium headless (playwright with executable_path);
# installed from the distribution's packages when missing and we may.
browser:
	@test -x /usr/bin/chromium || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get install -y -qq chromium >/dev/null 2>&1 || \
	    { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1; }; \
	  else echo "note: install chromium (Debian package) for the chat UI tests"; fi; }

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
