"""Training data from this machine to the run's bucket, where sky/train.yaml reads it.

A recipe's `data.path` that names a file here is uploaded before the job launches, under a key
made from its content (`data/sha256-<16 hex>/<file name>`): the same file is never uploaded
twice, a changed file gets a new key, and the job is pointed at that exact object
(`DATA_PATH`), so a rerun with changed data trains on the new data and a recovery reads the
same bytes as the first attempt. Uploads go through checkpoints_sync's stores, which never let
a reader see half an object. A `data.path` that is not a file here names an object already in
the bucket, as before.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from vicuna_sky.errors import VicunaSkyError
from vicuna_sky.launch.tasks import one_line

CHUNK = 1 << 20


@dataclass(frozen=True)
class Pushed:
    source: Path
    key: str
    """Where the data is, relative to the bucket root: what DATA_PATH says."""
    bytes: int
    uploaded: bool
    """False when the bucket already had this content."""


def content_key(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return f"data/sha256-{digest.hexdigest()[:16]}/{path.name}"


def local_data(data_path: str) -> Path | None:
    """The file a recipe's `data.path` names on this machine, or None (an object in the
    bucket)."""
    path = Path(data_path).expanduser()
    return path if path.is_file() else None


def check_format(path: Path) -> int:
    """The file parses as ShareGPT data with at least one well-formed conversation; returns
    how many there are. One line naming the file otherwise."""
    from vicuna_sky.data import sharegpt

    samples, problems = sharegpt.load(path)  # its errors name the file already
    if not samples:
        first = f" (first problem: {problems[0]})" if problems else ""
        raise VicunaSkyError(f"data {path}: no well-formed ShareGPT conversation{first}")
    return len(samples)


def push(path: Path, bucket: str, dry_run: bool = False) -> Pushed:
    """Upload `path` to the bucket at URL or directory `bucket` under its content key, unless
    that key is there already. `dry_run`: only say what would happen."""
    from checkpoints_sync.factory import open_store

    key = content_key(path)
    size = path.stat().st_size
    try:
        store = open_store(bucket)
        present = store.exists(key)
        if not present and not dry_run:
            store.put_file(path, key)
    except Exception as e:  # StoreError, credentials, network: the SDK's own error, one line
        raise VicunaSkyError(f"cannot upload {path} to {bucket}: {one_line(e)}") from None
    return Pushed(path, key, size, uploaded=not present)


def describe(pushed: Pushed, bucket: str, dry_run: bool = False) -> str:
    """One line for the user; `bucket` as they know it (the recipe's URL)."""
    size = f"{pushed.bytes / 2**20:.1f} MiB" if pushed.bytes >= 2**20 else f"{pushed.bytes} B"
    where = f"{bucket.rstrip('/')}/{pushed.key}"
    if not pushed.uploaded:
        return f"data: {pushed.source} is already in the bucket ({where}, {size})"
    verb = "would upload" if dry_run else "uploaded"
    return f"data: {verb} {pushed.source} ({size}) to {where}"
