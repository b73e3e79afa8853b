"""Real storage servers on loopback for the checkpoints_sync suite: moto (S3) and a GCS emulator.

Credentials are dummies and both SDKs are told never to look for a cloud metadata server.
"""

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

os.environ.update(
    {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "NO_GCE_CHECK": "true",
        "GCE_METADATA_HOST": "127.0.0.1:9",
        "GCE_METADATA_IP": "127.0.0.1:9",
    }
)
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


@pytest.fixture(scope="session")
def moto_endpoint():
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, proc)
        url = f"http://127.0.0.1:{port}"
        os.environ["AWS_ENDPOINT_URL_S3"] = url
        yield url
    finally:
        os.environ.pop("AWS_ENDPOINT_URL_S3", None)
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="session")
def gcs_endpoint():
    port = free_port()
    proc = subprocess.Popen(
        [
            str(BIN / "gcp-storage-emulator"),
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--in-memory",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, proc)
        host = f"http://127.0.0.1:{port}"
        os.environ["STORAGE_EMULATOR_HOST"] = host
        yield host
    finally:
        os.environ.pop("STORAGE_EMULATOR_HOST", None)
        proc.terminate()
        proc.wait(10)


def make_bucket(scheme: str) -> str:
    name = f"ckpt-{uuid.uuid4().hex[:12]}"
    if scheme == "s3":
        import boto3

        boto3.client("s3").create_bucket(Bucket=name)
    else:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        storage.Client(project="emulator", credentials=AnonymousCredentials()).create_bucket(name)
    return name


@pytest.fixture(params=["file", "s3", "gs"])
def store_url(request, tmp_path):
    """The same suite runs on a local directory, S3 (moto) and GCS (emulator)."""
    if request.param == "file":
        return f"file://{tmp_path / 'bucket'}/runs/r1"
    request.getfixturevalue("moto_endpoint" if request.param == "s3" else "gcs_endpoint")
    return f"{request.param}://{make_bucket(request.param)}/runs/r1"
