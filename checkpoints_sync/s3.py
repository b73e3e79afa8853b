"""S3 and S3-compatible stores with boto3: multipart uploads with parallel parts.

The endpoint comes from `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` (boto3 reads them itself), so
MinIO, R2 or a local moto server work without code changes. Credentials: boto3's chain.
"""

from __future__ import annotations

from pathlib import Path

from checkpoints_sync.store import NotFound, ObjectInfo, StoreError, join, write_atomically

MIB = 1024 * 1024


class S3Store:
    def __init__(self, bucket: str, prefix: str = "", max_concurrency: int = 8) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        if not bucket:
            raise StoreError("s3:// URL without a bucket")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.client = boto3.client(
            "s3",
            config=Config(
                retries={"max_attempts": 5, "mode": "standard"},
                max_pool_connections=max(10, 2 * max_concurrency),
            ),
        )
        self.transfer = TransferConfig(
            multipart_threshold=64 * MIB,
            multipart_chunksize=64 * MIB,
            max_concurrency=max_concurrency,
        )

    def _errors(self) -> tuple[type[Exception], ...]:
        from botocore.exceptions import BotoCoreError, ClientError

        return (BotoCoreError, ClientError)

    def put_file(self, path: Path, key: str) -> None:
        try:
            # S3 makes an object visible only once its (multipart) upload completes.
            self.client.upload_file(
                str(path), self.bucket, join(self.prefix, key), Config=self.transfer
            )
        except self._errors() as e:
            raise StoreError(f"upload {self.url}/{key}: {e}") from e

    def get_file(self, key: str, path: Path) -> None:
        try:
            write_atomically(
                path,
                lambda tmp: self.client.download_file(
                    self.bucket, join(self.prefix, key), tmp, Config=self.transfer
                ),
            )
        except self._errors() as e:
            if _status(e) == 404:
                raise NotFound(f"{self.url}/{key}") from None
            raise StoreError(f"download {self.url}/{key}: {e}") from e

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        full = join(self.prefix, prefix) if prefix else (f"{self.prefix}/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0
        out = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    out.append(ObjectInfo(obj["Key"][strip:], obj["Size"]))
        except self._errors() as e:
            raise StoreError(f"list {self.url}/{prefix}: {e}") from e
        return out

    def delete(self, keys: list[str]) -> None:
        try:
            for i in range(0, len(keys), 1000):
                batch = [{"Key": join(self.prefix, k)} for k in keys[i : i + 1000]]
                self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                )
        except self._errors() as e:
            raise StoreError(f"delete under {self.url}: {e}") from e

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=join(self.prefix, key))
            return True
        except self._errors() as e:
            if _status(e) == 404:
                return False
            raise StoreError(f"head {self.url}/{key}: {e}") from e


def _status(error: Exception) -> int | None:
    response = getattr(error, "response", None) or {}
    code = response.get("Error", {}).get("Code")
    if code in ("404", "NoSuchKey", "NotFound"):
        return 404
    return response.get("ResponseMetadata", {}).get("HTTPStatusCode")
