"""The `Store` protocol: objects under a prefix, and the URL that picks an implementation.

`file:///path` (or a plain path) is a local directory, `s3://bucket/prefix` S3 or any
S3-compatible store (boto3; `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` honoured),
`gs://bucket/prefix` Google Cloud Storage (`STORAGE_EMULATOR_HOST` honoured). Keys are
'/'-separated and relative to the store's prefix. Credentials come from each SDK's usual chain.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from checkpoints_sync.atomic import atomic_file


class StoreError(Exception):
    """A storage operation failed (after the SDK's own retries)."""


class NotFound(StoreError):
    """The object does not exist."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int


class Store(Protocol):
    url: str

    def put_file(self, path: Path, key: str) -> None:
        """Upload a local file; a reader never sees a partly written object."""

    def get_file(self, key: str, path: Path) -> None:
        """Download to `path` (written whole or not at all); NotFound if absent."""

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Every object whose key starts with `prefix`, in no particular order."""

    def delete(self, keys: list[str]) -> None:
        """Delete objects; absent ones are ignored."""

    def exists(self, key: str) -> bool: ...


def join(prefix: str, key: str) -> str:
    prefix = prefix.strip("/")
    return f"{prefix}/{key}" if prefix else key


def write_atomically(path: Path, fill: Callable[[str], None]) -> None:
    """`fill(tmp)` writes a temporary file beside `path`, which then replaces `path` whole: a
    reader never sees a half-written file, and a failure leaves nothing behind (a kill leaves a
    `.part` that the next write of the same path removes)."""
    with atomic_file(Path(path), suffix=".part") as tmp:
        fill(str(tmp))
