"""`python -m vicuna_sky.train.restarts --url URL --max N`: may a failed training run be
restarted once more? Exit 0 (and the restart is counted) or 1 (the N restarts are spent).

sky/train.yaml leaves SkyPilot's own `max_restarts_on_errors` at 0, so a failure is final unless
the run exits with a code in `recover_on_exit_codes`: 75 after a preemption notice (always
recovered), 76 for a crash that may pass on a fresh machine, while restarts remain. The count
lives beside the run's checkpoints (`URL/restarts/<n>`), so every attempt, on any machine, sees
the same one; SkyPilot's counter lives in the jobs controller's memory only. Each launch
(`--launch`, the launcher's LAUNCH_ID) counts its own (`URL/restarts/<launch>/<n>`): a run
relaunched after its crash was fixed has its restarts again. A failure the trainer knows a
restart cannot fix (missing data, a model it cannot load, out of GPU memory) never gets here.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


def restart_allowed(url: str, limit: int, launch: str = "") -> tuple[bool, int]:
    """(allowed, restarts `launch` used before this one); an allowed restart is recorded."""
    from checkpoints_sync.factory import open_store

    store = open_store(url)
    prefix = f"restarts/{launch}/" if launch else "restarts/"
    used = len([o for o in store.list(prefix) if "/" not in o.key[len(prefix) :]])
    if used >= limit:
        return False, used
    with tempfile.NamedTemporaryFile() as marker:
        store.put_file(Path(marker.name), f"{prefix}{used + 1}")
    return True, used


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m vicuna_sky.train.restarts")
    p.add_argument("--url", required=True, help="the run's checkpoint URL")
    p.add_argument("--max", type=int, required=True, help="restarts allowed after a failure")
    p.add_argument("--launch", default="", help="the launch whose restarts count (LAUNCH_ID)")
    args = p.parse_args(argv)
    if "/" in args.launch:
        p.error("--launch: one name, no '/'")
    allowed, used = restart_allowed(args.url, args.max, args.launch)
    if allowed:
        print(f"restarting after a failure ({used + 1} of {args.max})", file=sys.stderr)
        sys.exit(0)
    print(f"not restarting: {used} of {args.max} restarts after failures used", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
    main()
