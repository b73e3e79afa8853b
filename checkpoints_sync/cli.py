"""`python -m checkpoints_sync`: push, pull, ls, gc, watch."""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from checkpoints_sync.checkpoints import Checkpoints, parse_step, step_dir
from checkpoints_sync.factory import open_store
from checkpoints_sync.local import LocalStore
from checkpoints_sync.manifest import NAME as MANIFEST
from checkpoints_sync.manifest import InvalidManifest, local_files
from checkpoints_sync.store import StoreError
from checkpoints_sync.uploader import AsyncUploader

log = logging.getLogger("checkpoints_sync")


def _checkpoints(url: str, workers: int, must_exist: bool = False) -> Checkpoints:
    store = open_store(url, max_concurrency=workers)
    # A local "bucket" that is not there lists as empty; for ls and gc that is a typo, not an
    # empty bucket (S3 and GCS say NoSuchBucket themselves).
    if must_exist and isinstance(store, LocalStore) and not store.root.is_dir():
        raise StoreError(f"{url}: no such bucket directory")
    return Checkpoints(store, max_workers=workers)


def _number(kind: type, low: float, strict: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number >= low (> low when strict)."""

    def parse(text: str) -> float:
        value = kind(text)
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"{text} is not {'>' if strict else '>='} {low}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in "invalid int value" messages
    return parse


def _step_of(directory: Path, step: int | None) -> int:
    if step is not None:
        return step
    parsed = parse_step(directory.name)
    if parsed is None:
        raise StoreError(f"{directory.name} is not named step-N; pass --step")
    return parsed


def cmd_push(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    if not directory.is_dir():
        raise StoreError(f"{directory} is not a directory")
    step = _step_of(directory, args.step)
    cps = _checkpoints(args.url, args.workers)
    if not args.overwrite and cps.store.exists(f"{step_dir(step)}/{MANIFEST}"):
        # Re-committing replaces a committed checkpoint: the user says so, or it stays.
        raise StoreError(f"step-{step} is already committed in {args.url}: pass --overwrite")
    manifest = cps.commit(directory, step)
    print(f"committed step-{step}: {len(manifest.files)} files, {manifest.total_bytes} bytes")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    cps = _checkpoints(args.url, args.workers)
    if args.step == "latest":
        step = cps.restore_latest(Path(args.dir))
        if step is None:
            raise StoreError(f"no committed checkpoint under {args.url}")
    else:
        step = parse_step(f"step-{args.step}")
        if step is None:
            raise StoreError(f"--step must be a whole number >= 0 or latest, not {args.step!r}")
        cps.download(step, Path(args.dir))
    print(f"step-{step} -> {args.dir}")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    for step in _checkpoints(args.url, args.workers, must_exist=True).committed():
        print(f"step-{step}")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    deleted = _checkpoints(args.url, args.workers, must_exist=True).gc(args.keep)
    print(f"deleted {len(deleted)} step(s)" + (f": {deleted}" if deleted else ""))
    return 0


def _ready(directory: Path, ready_file: str, settle: float) -> bool:
    """A checkpoint written by code that is not ours is ready when its marker file exists
    (DCP writes `.metadata` last), or when its files have not changed for `settle` seconds."""
    if ready_file and (directory / ready_file).exists():
        return True
    files = [directory / f for f in local_files(directory)]
    if not files:
        return False
    newest = max(f.stat().st_mtime for f in files)
    return time.time() - newest >= settle


def cmd_watch(args: argparse.Namespace) -> int:
    root = Path(args.dir)
    if not root.is_dir():
        raise StoreError(f"{root}: no such directory to watch")
    cps = _checkpoints(args.url, args.workers)
    uploader = AsyncUploader(cps, keep=args.keep)
    done = set(cps.committed())
    stop = {"now": False}

    def request_stop(signum: int, _frame: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    while True:
        candidates = sorted(
            (step, d)
            for d in (root.iterdir() if root.is_dir() else [])
            if d.is_dir() and (step := parse_step(d.name)) is not None
        )
        for step, directory in candidates:
            if step not in done and _ready(directory, args.ready_file, args.settle):
                done.add(step)
                log.info("uploading %s", directory)
                uploader.submit(directory, step)
        if args.once or stop["now"]:
            break
        time.sleep(args.interval)
    uploader.wait()  # a stop request still finishes what was handed over
    uploader.close()
    return 0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, as every other error of this tool (argparse would add the whole usage).
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m checkpoints_sync", description=__doc__)
    p.add_argument(
        "--workers", type=_number(int, 1), default=8, help="parallel transfers (default 8)"
    )
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    push = sub.add_parser("push", help="commit a local step-N directory to URL")
    push.add_argument("dir")
    push.add_argument("url")
    push.add_argument(
        "--step", type=_number(int, 0), default=None, help="default: from DIR's name step-N"
    )
    push.add_argument(
        "--overwrite", action="store_true", help="replace the step if it is already committed"
    )
    push.set_defaults(fn=cmd_push)
    pull = sub.add_parser("pull", help="download a committed step, verified")
    pull.add_argument("url")
    pull.add_argument("dir")
    pull.add_argument("--step", default="latest", help="N or latest (default)")
    pull.set_defaults(fn=cmd_pull)
    ls = sub.add_parser("ls", help="committed steps, oldest first")
    ls.add_argument("url")
    ls.set_defaults(fn=cmd_ls)
    gc = sub.add_parser("gc", help="keep the newest K committed steps")
    gc.add_argument("url")
    gc.add_argument("--keep", type=_number(int, 1), required=True)
    gc.set_defaults(fn=cmd_gc)
    watch = sub.add_parser("watch", help="upload each new DIR/step-N as it appears")
    watch.add_argument("dir")
    watch.add_argument("url")
    watch.add_argument("--keep", type=_number(int, 1), default=2)
    watch.add_argument(
        "--interval", type=_number(float, 0, strict=True), default=5.0, help="seconds between scans"
    )
    watch.add_argument(
        "--settle",
        type=_number(float, 0),
        default=10.0,
        help="seconds without changes that make a directory ready",
    )
    watch.add_argument(
        "--ready-file",
        default=".metadata",
        help="a file whose presence makes a directory ready ('' = none)",
    )
    watch.add_argument("--once", action="store_true", help="one scan, upload, exit")
    watch.set_defaults(fn=cmd_watch)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s"
    )
    try:
        return args.fn(args)
    except (StoreError, InvalidManifest, ValueError, OSError) as e:
        print(f"checkpoints_sync: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
