#!/usr/bin/env bash
# The package on a SkyPilot node (each spec's setup runs this from the synced workdir).
#
#   bash sky/install.sh             the node set: training, evaluation, serving workers
#   bash sky/install.sh vllm        a GPU serving worker with vLLM (vLLM brings its own torch)
#   bash sky/install.sh controller  the fleet's controller and chat UI: sky/controller.lock, no
#                                   torch or model stack (a controller routes requests)
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
lock=""
if [ "$extra" = controller ]; then
  probe="import vicuna_sky.serve.controller, gradio"
  extra=""
  lock=sky/controller.lock
elif [ -n "$extra" ]; then
  probe="import vicuna_sky, $extra"
  target=".[$extra]"
fi
if python -c "$probe" 2>/dev/null; then
  echo "install: already in this image ($probe)"
  exit 0
fi
uv="$HOME/.local/bin/uv"
# The node set at the versions of sky/node.lock (`make lock`: uv's resolution for every Python
# and platform a node may have), so every attempt of a run, on any machine, gets the same
# versions and a resumed run computes as it did. vLLM's set stays vLLM's (it pins its own).
if [ -z "$lock" ] && [ -z "$extra" ] && [ -f sky/node.lock ]; then lock=sky/node.lock; fi
install() {
  if [ -x "$uv" ]; then
    # `editables`: the editable wheel hatchling builds imports it at start-up, and uv (unlike
    # pip) does not install it (measured: benchmarks/node_install.sh).
    if [ -n "$lock" ]; then
      "$uv" pip install --quiet --python "$(command -v python)" -r "$lock" editables &&
        "$uv" pip install --quiet --python "$(command -v python)" --no-deps -e "$target"
    else
      "$uv" pip install --quiet --python "$(command -v python)" editables -e "$target"
    fi
  elif [ -n "$lock" ]; then
    python -m pip install --quiet -r "$lock" && python -m pip install --quiet --no-deps -e "$target"
  else
    python -m pip install --quiet -e "$target"
  fi
}
tool=pip
if [ -x "$uv" ]; then tool=uv; fi
start=$(date +%s)
said=$(mktemp)
# An index or a mirror that fails for a minute must not end a multi-day run: tried again, and
# when it still cannot reach one, 76, which sky/train.yaml recovers on a new cluster without
# counting a restart (SkyPilot 0.14.1 sends setup exit codes through recover_on_exit_codes).
# A set that cannot be resolved here fails at once: no new cluster would change that, and
# recovering it would bill machine after machine.
tries=1
for wait in ${INSTALL_RETRY_SECONDS:-15 60} end; do
  if install 2>"$said"; then
    cat "$said" >&2
    echo "install: $target${lock:+ (pinned by $lock)} with $tool in $(( $(date +%s) - start )) s"
    exit 0
  fi
  cat "$said" >&2
  if ! grep -qiE "fetch|request|connect|timed out|dns|network|temporar|ssl|reset|http" "$said"; then
    echo "install: $target cannot be installed on this node (above); not retried" >&2
    exit 1
  fi
  if [ "$wait" = end ]; then break; fi
  echo "install: try $tries could not reach the package index; again in $wait s" >&2
  sleep "$wait"
  tries=$((tries + 1))
done
echo "install: no package index answered in $tries tries: exit 76 (a new cluster tries again)" >&2
exit 76
