#!/usr/bin/env bash
# The GPU training benchmark as one command (issue #14), from any directory, on a machine with
# one GPU. It measures this checkout (PYTHONPATH); the node set (`pip install -e .`) is
# installed only when the trainer's imports are missing. Under 5 minutes on an H100/H200;
# arguments go to train_gpu.py (--layers 4, --attention sdpa, --activation-checkpointing ...).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import vicuna_sky.train.trainer, vicuna_sky.tiny" 2>/dev/null \
  || "$PY" -m pip install --quiet -e .
exec timeout 330 "$PY" benchmarks/train_gpu.py "$@"
