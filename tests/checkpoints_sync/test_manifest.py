"""checkpoints_sync.manifest in process: what is built is what is read back, and any bad field is
one InvalidManifest (one bad step), never another exception."""

import hashlib
import json

import pytest

from checkpoints_sync.manifest import (
    NAME,
    FileEntry,
    InvalidManifest,
    Manifest,
    build,
    local_files,
    sha256_file,
)

SHA = "a" * 64


def test_build_and_read_back(tmp_path):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "__0_0.distcp").write_bytes(b"x" * 1000)
    (tmp_path / ".metadata").write_bytes(b"")  # an empty file: size 0 is a count
    (tmp_path / NAME).write_text("an old manifest is never listed")
    (tmp_path / ".a").write_text("a name that sorts before the manifest's")
    assert local_files(tmp_path) == [".a", ".metadata", "shards/__0_0.distcp"]
    manifest = build(tmp_path, step=0)
    assert manifest.step == 0 and manifest.total_bytes == 1000 + 39
    assert manifest.files[2] == FileEntry(
        "shards/__0_0.distcp", 1000, hashlib.sha256(b"x" * 1000).hexdigest()
    )
    assert Manifest.from_json(manifest.to_json(), step=0) == manifest
    assert Manifest.from_json(manifest.to_json().encode()) == manifest
    assert json.loads(manifest.to_json())["format"] == 1


def test_sha256_reads_in_blocks(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(bytes(range(256)) * 40)
    want = hashlib.sha256(bytes(range(256)) * 40).hexdigest()
    assert sha256_file(path) == sha256_file(path, block=7) == want


def good(**changes) -> dict:
    raw = {"format": 1, "step": 3, "time": 1.5, "files": [{"path": "a", "size": 0, "sha256": SHA}]}
    return raw | changes


def entry(**changes) -> dict:
    return good(files=[{"path": "a/b", "size": 2, "sha256": SHA} | changes])


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        b"\xff\xfe",
        "[" * 100_000 + "]" * 100_000,
        json.dumps([1]),
        json.dumps(good(format=2)),
        json.dumps(good(format=0)),
        *(json.dumps(good(step=s)) for s in (-1, "3", 3.0, True, None)),
        *(json.dumps(good(time=t)) for t in ("1", None, [1])),
        json.dumps(good()).replace("1.5", "Infinity"),
        json.dumps(good()).replace("1.5", "NaN"),
        json.dumps(good(files={"a": 1})),
        json.dumps(good(files=["a"])),
        *(json.dumps(entry(path=p)) for p in (5, None, "/abs", "a/../b", "..", NAME)),
        *(json.dumps(entry(size=s)) for s in (-1, 2.0, "2", True, None)),
        *(json.dumps(entry(sha256=h)) for h in ("A" * 64, "a" * 63, 5, None)),
    ],
)
def test_every_bad_field_is_one_invalid_manifest(text):
    with pytest.raises(InvalidManifest):
        Manifest.from_json(text)


def test_the_step_must_be_the_directorys():
    text = json.dumps(good())
    assert Manifest.from_json(text, step=3).step == 3 and Manifest.from_json(text).time == 1.5
    for other in (4, 2):
        with pytest.raises(InvalidManifest, match=f"directory step {other}"):
            Manifest.from_json(text, step=other)
    big = json.dumps(good(step=10**6))  # parsed: an equal int, not the same object
    assert Manifest.from_json(big, step=int("1000000")).step == 10**6
    # A path that sorts before the manifest's own name is an ordinary path.
    assert Manifest.from_json(json.dumps(entry(path=".cache/x"))).files[0].path == ".cache/x"
    assert Manifest.from_json(json.dumps(good(time=2))).time == 2.0  # an int time is a time


def test_a_manifest_read_cannot_be_changed():
    import dataclasses

    manifest = Manifest.from_json(json.dumps(good()))
    with pytest.raises(dataclasses.FrozenInstanceError):
        manifest.step = 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        manifest.files[0].size = 9
