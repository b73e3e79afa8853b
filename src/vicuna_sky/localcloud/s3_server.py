"""A local S3 server (moto) on 127.0.0.1, for the chaos harness and the tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from vicuna_sky.errors import VicunaSkyError
from vicuna_sky.ports import free_port, wait_for_port

# Dummy credentials for the local server; boto3 must never look for an instance role.
LOCAL_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "local",
    "AWS_SECRET_ACCESS_KEY": "local",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


class LocalS3:
    """`with LocalS3() as s3:` runs moto_server; `s3.url` is its endpoint."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> LocalS3:
        binary = Path(sys.executable).parent / "moto_server"
        if not binary.exists():
            raise VicunaSkyError("moto_server is not installed: pip install 'moto[server]'")
        self._proc = subprocess.Popen(
            [str(binary), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, self._proc)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc:
            self._proc.terminate()
            self._proc.wait(10)

    def create_bucket(self, name: str) -> None:
        import boto3

        env = {**LOCAL_AWS_ENV, **{k: v for k, v in os.environ.items() if k in LOCAL_AWS_ENV}}
        client = boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=env["AWS_DEFAULT_REGION"],
        )
        client.create_bucket(Bucket=name)
