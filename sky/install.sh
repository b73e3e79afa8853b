#!/usr/bin/env bash
# The package on a SkyPilot node (each spec's setup runs this from the synced workdir).
#
#   bash sky/install.sh          the node set: training, evaluation, the fleet's controller
#   bash sky/install.sh vllm     a GPU serving worker with vLLM (vLLM brings its own torch)
#
# Skipped when the image already has it: a `resources.image_id` with the package (and vLLM)
# preinstalled makes every relaunch's setup near zero. Otherwise uv, which SkyPilot installs on
# every node for its own runtime ($HOME/.local/bin/uv), installs into the task's Python (the
# user env SkyPilot activates) with parallel downloads; pip where uv is missing. Never skypilot
# (the launcher's) or flash-attn (an sdist whose build fails the whole install).
set -euo pipefail
extra="${1:-}"
probe="import vicuna_sky"
target="."
if [ -n "$extra" ]; then
  probe="import vicuna_sky, $extra"
  target=".[$extra]"
fi
if python -c "$probe" 2>/dev/null; then
  echo "install: already in this image ($probe)"
  exit 0
fi
uv="$HOME/.local/bin/uv"
start=$(date +%s)
if [ -x "$uv" ]; then
  tool=uv
  # `editables`: the editable wheel hatchling builds imports it at start-up, and uv (unlike
  # pip) does not install it (measured: benchmarks/node_install.sh).
  "$uv" pip install --quiet --python "$(command -v python)" editables -e "$target"
else
  tool=pip
  python -m pip install --quiet -e "$target"
fi
echo "install: $target with $tool in $(( $(date +%s) - start )) s"
