"""`python -m checkpoints_sync` as a user runs it, and killed mid-upload."""

import os
import signal
import subprocess
import sys
import time

import boto3

from checkpoints_sync import Checkpoints, open_store

from .test_checkpoints import make_checkpoint


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "checkpoints_sync", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ.copy(),
    )


def test_push_ls_pull_gc(store_url, tmp_path):
    for step in (1, 2, 3):
        result = run("push", str(make_checkpoint(tmp_path / "local", step)), store_url)
        assert result.returncode == 0, result.stderr
        assert f"committed step-{step}" in result.stdout
    assert run("ls", store_url).stdout.split() == ["step-1", "step-2", "step-3"]
    pulled = run("pull", store_url, str(tmp_path / "resume"))
    assert pulled.returncode == 0 and (tmp_path / "resume" / ".metadata").read_text() == "step 3"
    assert run("pull", store_url, str(tmp_path / "old"), "--step", "1").returncode == 0
    assert (tmp_path / "old" / ".metadata").read_text() == "step 1"
    assert run("gc", store_url, "--keep", "1").returncode == 0
    assert run("ls", store_url).stdout.split() == ["step-3"]


def test_errors_are_one_line(tmp_path):
    result = run("pull", f"file://{tmp_path / 'empty'}", str(tmp_path / "x"))
    assert result.returncode == 2 and "no committed checkpoint" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    result = run("push", str(tmp_path / "nowhere"), f"file://{tmp_path}")
    assert result.returncode == 2 and "is not a directory" in result.stderr


def test_watch_uploads_new_checkpoints(tmp_path):
    url = f"file://{tmp_path / 'bucket'}"
    local = tmp_path / "ckpts"
    make_checkpoint(local, 5)
    (local / "step-6").mkdir()  # being written: no DCP .metadata yet, just changed
    (local / "step-6" / "part").write_text("x")
    result = run("watch", str(local), url, "--once", "--settle", "60")
    assert result.returncode == 0, result.stderr
    assert Checkpoints(open_store(url)).committed() == [5]


def test_sigkill_mid_upload_leaves_previous_committed(moto_endpoint, new_bucket, tmp_path):
    """The uploader process dies (SIGKILL, no warning) while step 2 is half uploaded."""
    url = f"s3://{new_bucket('s3')}/run"
    cps = Checkpoints(open_store(url))
    cps.commit(make_checkpoint(tmp_path, 1, files=2), 1)
    big = make_checkpoint(tmp_path, 2, files=300, size=64_000)
    proc = subprocess.Popen(
        [sys.executable, "-m", "checkpoints_sync", "--workers", "1", "push", str(big), url],
        env=os.environ.copy(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    bucket, _, _ = url[5:].partition("/")
    s3 = boto3.client("s3")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        listed = s3.list_objects_v2(Bucket=bucket, Prefix="run/step-2/").get("KeyCount", 0)
        if listed >= 5:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    uploaded = s3.list_objects_v2(Bucket=bucket, Prefix="run/step-2/").get("KeyCount", 0)
    assert 5 <= uploaded < 301, "the kill must land mid-upload"
    assert cps.committed() == [1] and cps.latest() == 1
    assert cps.restore_latest(tmp_path / "resume") == 1
