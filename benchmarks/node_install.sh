#!/usr/bin/env bash
# A relaunched node's install, pip against uv (sky/install.sh uses uv when SkyPilot has put it on
# the node): the node set (`-e .`, torch included) into an empty venv, each from a cold cache,
# from this machine's package index. Prints the seconds each took.
#
#   bash benchmarks/node_install.sh          (needs .venv: its uv; takes a few minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
uv="$PWD/.venv/bin/uv"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# The CPU wheel of torch stands in for the GPU node's CUDA one (it is what this index has).
pin="torch==2.13.0"

python3 -m venv "$work/pip"
start=$(date +%s)
PIP_CACHE_DIR="$work/pip-cache" "$work/pip/bin/python" -m pip install --quiet "$pin" -e . \
  2>&1 | grep -v "^WARNING: Location" || true
pip_s=$(( $(date +%s) - start ))

python3 -m venv --without-pip "$work/uv"
start=$(date +%s)
UV_CACHE_DIR="$work/uv-cache" "$uv" pip install --quiet --python "$work/uv/bin/python" "$pin" \
  editables -e .
uv_s=$(( $(date +%s) - start ))

"$work/pip/bin/python" -c "import vicuna_sky, torch"
"$work/uv/bin/python" -c "import vicuna_sky, torch"
echo "node install (-e . with $pin), cold cache: pip ${pip_s} s, uv ${uv_s} s"
