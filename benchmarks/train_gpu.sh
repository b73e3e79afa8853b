#!/usr/bin/env bash
# The GPU training benchmark as one command (issue #14), from any directory, on a machine with
# one GPU and torch + transformers installed; installs the package's node set only if they are
# missing. Under 5 minutes on an H100/H200; extra arguments go to train_gpu.py (--layers 4 ...).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
"$PY" -c "import torch, transformers, safetensors, rich, yaml" 2>/dev/null \
  || "$PY" -m pip install --quiet -e .
exec timeout 330 "$PY" benchmarks/train_gpu.py "$@"
