"""Bad input never loses data: `python -m checkpoints_sync` with wrong destinations, bad numbers,
broken manifests and the litter of a killed run (issue #20)."""

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from checkpoints_sync import Checkpoints, open_store
from checkpoints_sync.manifest import NAME

from .test_checkpoints import make_checkpoint
from .test_cli import run


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` (hidden ones too) by relative path -> sha256."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def one_line_error(result: subprocess.CompletedProcess, text: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert text in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.fixture
def bucket(tmp_path) -> Path:
    root = tmp_path / "bucket"
    for step in (1, 2):
        assert (
            run("push", str(make_checkpoint(tmp_path / "local", step)), str(root)).returncode == 0
        )
    return root


def test_pull_into_a_directory_with_files_deletes_nothing(bucket, tmp_path):
    before = snapshot(bucket)
    one_line_error(run("pull", str(bucket), str(bucket)), "is not empty")
    assert snapshot(bucket) == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    one_line_error(run("pull", str(bucket), str(mine), "--step", "1"), "is not empty")
    assert (mine / "notes.txt").read_text() == "precious" and len(list(mine.iterdir())) == 1
    (tmp_path / "file").write_text("x")
    one_line_error(run("pull", str(bucket), str(tmp_path / "file")), "not a directory")
    assert (tmp_path / "file").read_text() == "x"


def test_pull_into_an_empty_directory_with_final_permissions(bucket, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run("pull", str(bucket), str(empty))
    assert result.returncode == 0, result.stderr
    assert (empty / ".metadata").read_text() == "step 2"
    umask = os.umask(0o022)
    os.umask(umask)
    assert (empty / ".metadata").stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["push", "DIR", "BUCKET", "--step", "-1"], "--step: -1 is not >= 0"),
        (["gc", "BUCKET", "--keep", "0"], "--keep: 0 is not >= 1"),
        (["--workers", "-3", "ls", "BUCKET"], "--workers: -3 is not >= 1"),
        (["pull", "BUCKET", "OUT", "--step", "-1"], "--step must be a whole number"),
        (["watch", "DIR", "BUCKET", "--interval", "nan"], "--interval: nan is not > 0"),
        (["ls", "MISSING"], "no such bucket directory"),
        (["gc", "MISSING", "--keep", "1"], "no such bucket directory"),
        (["watch", "MISSING", "BUCKET", "--once"], "no such directory to watch"),
    ],
)
def test_bad_numbers_and_missing_places_are_one_line_errors(bucket, tmp_path, args, text):
    local = make_checkpoint(tmp_path / "other", 3)
    places = {
        "DIR": str(local),
        "BUCKET": str(bucket),
        "OUT": str(tmp_path / "out"),
        "MISSING": str(tmp_path / "missing"),
    }
    before = snapshot(bucket)
    one_line_error(run(*[places.get(a, a) for a in args]), text)
    assert snapshot(bucket) == before
    assert not (tmp_path / "out").exists() and not (tmp_path / "missing").exists()


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda text: b"\xff\xfe" + text.encode(),  # not UTF-8
        lambda text: text.replace('"size": 50000', '"size": 1e999', 1).encode(),
        lambda text: json.dumps([1, 2]).encode(),
        lambda text: text.replace('"step": 3', '"step": -3', 1).encode(),
    ],
    ids=["not-utf8", "size-1e999", "a-list", "negative-step"],
)
def test_one_bad_manifest_is_one_skipped_step(bucket, tmp_path, corrupt):
    assert run("push", str(make_checkpoint(tmp_path / "local", 3)), str(bucket)).returncode == 0
    manifest = bucket / "step-3" / NAME
    manifest.write_bytes(corrupt(manifest.read_text()))
    listed = run("ls", str(bucket))
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split() == ["step-1", "step-2"]
    assert "ignoring step-3" in listed.stderr and "Traceback" not in listed.stderr
    pulled = run("pull", str(bucket), str(tmp_path / "resume"))
    assert pulled.returncode == 0, pulled.stderr
    assert (tmp_path / "resume" / ".metadata").read_text() == "step 2"
    # The trainer resumes through the same listing.
    assert Checkpoints(open_store(str(bucket))).committed() == [1, 2]
    collected = run("gc", str(bucket), "--keep", "1")
    assert collected.returncode == 0, collected.stderr
    assert run("ls", str(bucket)).stdout.split() == ["step-2"]


KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from checkpoints_sync.atomic import atomic_dir, atomic_file
kind, target = sys.argv[1], Path(sys.argv[2])
if kind == "dir":
    with atomic_dir(target) as tmp:
        (tmp / "half").write_bytes(b"x" * 1000)
        os.kill(os.getpid(), signal.SIGKILL)
with atomic_file(target, suffix=".part") as tmp:
    tmp.write_bytes(b"x" * 1000)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _killed_writer(kind: str, target: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, kind, str(target)])
    assert proc.returncode == -signal.SIGKILL


def test_litter_of_a_killed_pull_is_removed_by_the_next_pull(bucket, tmp_path):
    destination = tmp_path / "pd"
    _killed_writer("dir", destination)
    litter = [p for p in tmp_path.iterdir() if p.name.startswith(".pd.")]
    assert len(litter) == 1 and (litter[0] / "half").exists()
    assert run("pull", str(bucket), str(destination)).returncode == 0
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".pd.")] == []


def test_litter_of_a_killed_push_is_removed_by_the_next_push(bucket, tmp_path):
    target = bucket / "step-3" / ".metadata"
    _killed_writer("file", target)
    assert [p.name for p in target.parent.iterdir() if p.name.endswith(".part")]
    assert run("push", str(make_checkpoint(tmp_path / "local", 3)), str(bucket)).returncode == 0
    assert [p.name for p in target.parent.iterdir() if p.name.endswith(".part")] == []
    assert run("ls", str(bucket)).stdout.split() == ["step-1", "step-2", "step-3"]


def test_a_live_writers_temporary_is_left_alone(tmp_path):
    from checkpoints_sync.atomic import atomic_file, sweep_litter

    target = tmp_path / "f"
    with atomic_file(target) as tmp:
        tmp.write_text("mine")
        assert sweep_litter(target, ".tmp") == [] and tmp.exists()
    assert target.read_text() == "mine"


def test_push_over_a_committed_step_needs_overwrite(bucket, tmp_path):
    before = snapshot(bucket)
    other = make_checkpoint(tmp_path / "other", 2)
    one_line_error(run("push", str(other), str(bucket)), "step-2 is already committed")
    assert snapshot(bucket) == before
    replaced = run("push", str(other), str(bucket), "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert snapshot(bucket)["step-2/shards/__0_0.distcp"] == snapshot(other)["shards/__0_0.distcp"]
