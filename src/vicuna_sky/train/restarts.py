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

Every node of a multi-node run asks when its training fails: SkyPilot keeps the code of the node
that ends first and cancels the others (137), so each node must be able to say 76. A restart is
recorded under the attempt's name (`URL/restarts/<launch>/attempt-<id>`, the same on every node
of one cluster), so the nodes of one attempt count it once. A bucket that does not answer is
tried again for 30 s; after that the job ends, saying so, rather than restart uncounted.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

RETRY_SECONDS = (1.0, 2.0, 4.0, 8.0, 15.0)
"""Waits between tries of the bucket (30 s in all): a bucket that hiccups as the run crashes
must not end a job that a restart would carry on."""


def restart_allowed(url: str, limit: int, launch: str = "", attempt: str = "") -> tuple[bool, int]:
    """(allowed, restarts `launch` used before this one); an allowed restart is recorded.
    `attempt` names the failed attempt: every node of a multi-node run may ask for the same one
    (whichever ends first decides the job's code), and it is counted once."""
    from checkpoints_sync.factory import open_store

    store = open_store(url)
    prefix = f"restarts/{launch}/" if launch else "restarts/"
    keys = {
        o.key[len(prefix) :]
        for o in patiently(lambda: store.list(prefix))
        if "/" not in o.key[len(prefix) :]
    }
    mine = f"attempt-{attempt}" if attempt else f"{len(keys) + 1}"
    if mine in keys:  # another node of this attempt was allowed it
        return True, len(keys) - 1
    if len(keys) >= limit:
        return False, len(keys)
    with tempfile.NamedTemporaryFile() as marker:
        patiently(lambda: store.put_file(Path(marker.name), prefix + mine))
    return True, len(keys)


def patiently(call: Callable[[], T]) -> T:
    """`call`, tried again after each of RETRY_SECONDS while it raises."""
    for wait in RETRY_SECONDS:
        try:
            return call()
        except Exception as e:  # any store's error: S3's, GCS's, a file system's
            print(
                f"the bucket did not answer ({type(e).__name__}); again in {wait:.0f} s",
                file=sys.stderr,
            )
            time.sleep(wait)
    return call()


def this_attempt() -> str:
    """The attempt this node belongs to, the same on every node of it and new with each
    cluster SkyPilot provisions (its nodes' addresses and zone); empty off SkyPilot."""
    ips = os.environ.get("SKYPILOT_NODE_IPS", "")
    if not ips:
        return ""
    cluster = os.environ.get("SKYPILOT_CLUSTER_INFO", "")
    return hashlib.sha256(f"{ips}\n{cluster}".encode()).hexdigest()[:16]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m vicuna_sky.train.restarts")
    p.add_argument("--url", required=True, help="the run's checkpoint URL")
    p.add_argument("--max", type=int, required=True, help="restarts allowed after a failure")
    p.add_argument("--launch", default="", help="the launch whose restarts count (LAUNCH_ID)")
    args = p.parse_args(argv)
    if "/" in args.launch:
        p.error("--launch: one name, no '/'")
    try:
        allowed, used = restart_allowed(args.url, args.max, args.launch, this_attempt())
    except Exception as e:
        print(f"not restarting: the bucket did not answer ({one_line(e)})", file=sys.stderr)
        sys.exit(1)
    if allowed:
        print(f"restarting after a failure ({used + 1} of {args.max})", file=sys.stderr)
        sys.exit(0)
    print(f"not restarting: {used} of {args.max} restarts after failures used", file=sys.stderr)
    sys.exit(1)


def one_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


if __name__ == "__main__":
    main()
