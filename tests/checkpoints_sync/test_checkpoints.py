import os
from pathlib import Path

import pytest

from checkpoints_sync import Checkpoints, open_store
from checkpoints_sync.manifest import NAME


def make_checkpoint(root: Path, step: int, files: int = 3, size: int = 50_000) -> Path:
    directory = root / f"step-{step}"
    (directory / "shards").mkdir(parents=True)
    for i in range(files):
        (directory / "shards" / f"__{i}_0.distcp").write_bytes(os.urandom(size))
    (directory / ".metadata").write_text(f"step {step}")
    return directory


def test_commit_latest_download(store_url, tmp_path):
    cps = Checkpoints(open_store(store_url))
    assert cps.latest() is None and cps.restore_latest(tmp_path / "none") is None
    for step in (10, 2, 5):
        cps.commit(make_checkpoint(tmp_path / "local", step), step)
    assert cps.committed() == [2, 5, 10] and cps.latest() == 10
    manifest = cps.download(10, tmp_path / "resume")
    src = tmp_path / "local" / "step-10"
    for entry in manifest.files:
        assert (tmp_path / "resume" / entry.path).read_bytes() == (src / entry.path).read_bytes()
    assert {e.path for e in manifest.files} == {
        ".metadata",
        *(f"shards/__{i}_0.distcp" for i in range(3)),
    }


def test_partial_upload_is_invisible(store_url, tmp_path):
    store = open_store(store_url)
    cps = Checkpoints(store)
    cps.commit(make_checkpoint(tmp_path, 1), 1)
    # A machine vanished mid-upload of step 2: some files, no manifest.
    partial = make_checkpoint(tmp_path, 2)
    store.put_file(partial / ".metadata", "step-2/.metadata")
    assert cps.committed() == [1]
    assert cps.restore_latest(tmp_path / "resume") == 1


def test_corrupt_file_falls_back_to_previous(store_url, tmp_path):
    store = open_store(store_url)
    cps = Checkpoints(store)
    cps.commit(make_checkpoint(tmp_path, 1), 1)
    cps.commit(make_checkpoint(tmp_path, 2), 2)
    evil = tmp_path / "evil"
    evil.write_bytes(os.urandom(50_000))  # same size, other bytes
    store.put_file(evil, "step-2/shards/__1_0.distcp")
    assert cps.restore_latest(tmp_path / "resume") == 1
    assert (tmp_path / "resume" / ".metadata").read_text() == "step 1"
    # A missing file is caught the same way.
    store.delete(["step-1/shards/__0_0.distcp"])
    assert cps.restore_latest(tmp_path / "resume2") is None


def test_bad_manifest_is_not_committed(store_url, tmp_path):
    store = open_store(store_url)
    cps = Checkpoints(store)
    cps.commit(make_checkpoint(tmp_path, 1), 1)
    junk = tmp_path / "junk"
    junk.write_text("{not json")
    store.put_file(junk, f"step-3/{NAME}")
    assert cps.committed() == [1]


def test_gc_keeps_newest_and_never_the_only_one(store_url, tmp_path):
    store = open_store(store_url)
    cps = Checkpoints(store)
    cps.commit(make_checkpoint(tmp_path, 1), 1)
    assert cps.gc(keep=1) == [] and cps.committed() == [1]
    for step in (2, 3, 4):
        cps.commit(make_checkpoint(tmp_path, step), step)
    leftover = make_checkpoint(tmp_path / "p", 2)  # an abandoned re-upload below the newest
    store.put_file(leftover / ".metadata", "step-0/.metadata")
    assert cps.gc(keep=2) == [0, 1, 2]
    assert cps.committed() == [3, 4]
    assert {o.key.split("/")[0] for o in store.list()} == {"step-3", "step-4"}
    with pytest.raises(ValueError):
        cps.gc(keep=0)


def test_gc_keeps_a_newer_upload_in_progress(store_url, tmp_path):
    """Issue #30 row 6: step 2 is being uploaded (files, no manifest yet) when retention runs
    for step 1: it is the next checkpoint, not an abandoned one, and none of it is deleted."""
    store = open_store(store_url)
    cps = Checkpoints(store)
    cps.commit(make_checkpoint(tmp_path, 1), 1)
    uploading = make_checkpoint(tmp_path, 2)
    store.put_file(uploading / ".metadata", "step-2/.metadata")
    store.put_file(uploading / "shards" / "__0_0.distcp", "step-2/shards/__0_0.distcp")
    assert cps.gc(keep=1) == []
    assert {o.key for o in store.list() if o.key.startswith("step-2/")} == {
        "step-2/.metadata",
        "step-2/shards/__0_0.distcp",
    }
    cps.commit(uploading, 2)  # the upload ends: step 2 is whole, and gc may now take step 1
    assert cps.gc(keep=1) == [1] and cps.restore_latest(tmp_path / "resume") == 2


def test_other_objects_under_the_prefix_hide_no_step(store_url, tmp_path):
    """A key that is no step (listed before the steps: "notes.txt" < "step-1") is skipped,
    not the end of the listing."""
    store = open_store(store_url)
    cps = Checkpoints(store)
    cps.commit(make_checkpoint(tmp_path, 1), 1)
    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    store.put_file(notes, "notes.txt")
    store.put_file(notes, "a-dir/notes.txt")
    assert cps.committed() == [1] and cps.latest() == 1


def test_a_step_is_a_whole_number_from_zero(store_url, tmp_path):
    cps = Checkpoints(open_store(store_url))
    directory = make_checkpoint(tmp_path, 0, files=1, size=10)
    for step in (-1, 1.0, "1", True):
        with pytest.raises(ValueError, match="whole number"):
            cps.commit(directory, step)
    cps.commit(directory, 0)
    assert cps.committed() == [0]


def test_recommit_replaces(store_url, tmp_path):
    cps = Checkpoints(open_store(store_url))
    first = make_checkpoint(tmp_path / "a", 7)
    cps.commit(first, 7)
    second = make_checkpoint(tmp_path / "b", 7, files=1)
    cps.commit(second, 7)
    cps.download(7, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out" / "shards").iterdir()) == ["__0_0.distcp"]
    got = (tmp_path / "out" / "shards" / "__0_0.distcp").read_bytes()
    assert got == (second / "shards" / "__0_0.distcp").read_bytes()


def test_reading_while_another_process_collects_garbage(tmp_path):
    """A trainer commits and deletes old steps (retention) while a watcher lists what is
    committed: a step deleted under the reader is simply not committed any more, never an
    error. The local store used to raise FileNotFoundError between its check and its copy
    (every run of this test hit it); the cloud stores answer a deleted object with a 404."""
    import threading

    url = f"file://{tmp_path / 'bucket'}"
    writer, reader = Checkpoints(open_store(url)), Checkpoints(open_store(url))
    local = make_checkpoint(tmp_path, 1, files=1, size=1000)
    done, seen, errors = threading.Event(), set(), []

    def read() -> None:
        while not done.is_set():
            try:
                seen.update(reader.committed())
            except Exception as e:  # any error is the failure under test
                errors.append(e)
                return

    watcher = threading.Thread(target=read)
    watcher.start()
    try:
        for step in range(1, 61):
            writer.commit(local, step)
            writer.gc(keep=1)
    finally:
        done.set()
        watcher.join(30)
    assert errors == [] and writer.committed() == [60]
    assert len(seen) > 1  # the reader ran alongside, through many commits
