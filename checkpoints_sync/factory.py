"""The store a URL names: the one place that knows every kind of store (store.py defines
what a store is and knows none of them)."""

from __future__ import annotations

from pathlib import Path

from checkpoints_sync.store import Store, StoreError


def open_store(url: str, max_concurrency: int = 8) -> Store:
    """The store a URL names."""
    if url.startswith("s3://"):
        from checkpoints_sync.s3 import S3Store

        bucket, _, prefix = url[5:].partition("/")
        return S3Store(bucket, prefix, max_concurrency=max_concurrency)
    if url.startswith("gs://"):
        from checkpoints_sync.gcs import GCSStore

        bucket, _, prefix = url[5:].partition("/")
        return GCSStore(bucket, prefix)
    from checkpoints_sync.local import LocalStore

    if url.startswith("file://"):
        return LocalStore(Path(url[7:]))
    if "://" in url:
        raise StoreError(f"unsupported URL {url!r}: use file://, s3:// or gs://")
    return LocalStore(Path(url))
