"""Google Cloud Storage with google-cloud-storage: resumable uploads in chunks.

With `STORAGE_EMULATOR_HOST` set (a local emulator), the client uses anonymous credentials and
never looks for Google credentials or the metadata server. Otherwise: the SDK's usual chain.
"""

from __future__ import annotations

import os
from pathlib import Path

from checkpoints_sync.store import NotFound, ObjectInfo, StoreError, join, write_atomically

CHUNK = 32 * 1024 * 1024  # a multiple of 256 KiB, as resumable uploads require


class GCSStore:
    def __init__(self, bucket: str, prefix: str = "") -> None:
        from google.cloud import storage

        if not bucket:
            raise StoreError("gs:// URL without a bucket")
        self.prefix = prefix.strip("/")
        self.url = f"gs://{bucket}/{self.prefix}".rstrip("/")
        if os.environ.get("STORAGE_EMULATOR_HOST"):
            from google.auth.credentials import AnonymousCredentials

            client = storage.Client(project="emulator", credentials=AnonymousCredentials())
        else:
            client = storage.Client()
        self.bucket = client.bucket(bucket)

    def _errors(self) -> tuple[type[Exception], ...]:
        from google.api_core.exceptions import GoogleAPIError
        from google.auth.exceptions import GoogleAuthError

        return (GoogleAPIError, GoogleAuthError, ConnectionError)

    def put_file(self, path: Path, key: str) -> None:
        blob = self.bucket.blob(join(self.prefix, key), chunk_size=CHUNK)
        try:
            # Resumable in CHUNK pieces; the object appears only when the last piece lands.
            blob.upload_from_filename(str(path))
        except self._errors() as e:
            raise StoreError(f"upload {self.url}/{key}: {e}") from e

    def get_file(self, key: str, path: Path) -> None:
        from google.api_core.exceptions import NotFound as GoogleNotFound

        blob = self.bucket.blob(join(self.prefix, key))
        try:
            write_atomically(path, blob.download_to_filename)
        except GoogleNotFound:
            raise NotFound(f"{self.url}/{key}") from None
        except self._errors() as e:
            raise StoreError(f"download {self.url}/{key}: {e}") from e

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        full = join(self.prefix, prefix) if prefix else (f"{self.prefix}/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0
        try:
            return [
                ObjectInfo(b.name[strip:], b.size or 0) for b in self.bucket.list_blobs(prefix=full)
            ]
        except self._errors() as e:
            raise StoreError(f"list {self.url}/{prefix}: {e}") from e

    def delete(self, keys: list[str]) -> None:
        from google.api_core.exceptions import NotFound as GoogleNotFound

        for key in keys:
            try:
                self.bucket.blob(join(self.prefix, key)).delete()
            except GoogleNotFound:
                continue
            except self._errors() as e:
                raise StoreError(f"delete {self.url}/{key}: {e}") from e

    def exists(self, key: str) -> bool:
        try:
            return self.bucket.blob(join(self.prefix, key)).exists()
        except self._errors() as e:
            raise StoreError(f"exists {self.url}/{key}: {e}") from e
