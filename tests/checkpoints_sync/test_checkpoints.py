import hashlib
import logging
import os
from pathlib import Path

import pytest

from checkpoints_sync import Checkpoints, open_store
from checkpoints_sync.checkpoints import CorruptCheckpoint
from checkpoints_sync.manifest import NAME
from checkpoints_sync.store import StoreError


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


# -- pull: where a step may be downloaded to ---------------------------------------------
def committed_step(store_url, tmp_path, step=1):
    cps = Checkpoints(open_store(store_url))
    cps.commit(make_checkpoint(tmp_path / "local", step, files=1, size=1000), step)
    return cps


def test_pull_into_a_non_empty_directory_is_refused_and_touches_nothing(store_url, tmp_path):
    cps = committed_step(store_url, tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    beside = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(StoreError, match="not empty"):
        cps.download(1, mine)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    assert (mine / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == beside  # nothing staged beside it


def test_pull_into_an_empty_directory_or_a_new_path_under_new_parents(store_url, tmp_path):
    cps = committed_step(store_url, tmp_path)
    (tmp_path / "empty").mkdir()
    for destination in (tmp_path / "empty", tmp_path / "a" / "b" / "new"):
        cps.download(1, destination)
        assert (destination / ".metadata").read_text() == "step 1"


def test_pull_onto_a_file_or_a_symlink_is_refused_and_leaves_it(store_url, tmp_path):
    cps = committed_step(store_url, tmp_path)
    a_file, dangling = tmp_path / "file", tmp_path / "dangling"
    a_file.write_text("mine")
    dangling.symlink_to(tmp_path / "nowhere")
    for destination in (a_file, dangling):
        with pytest.raises(StoreError, match="exists and is not a directory"):
            cps.download(1, destination)
    assert a_file.read_text() == "mine"
    assert dangling.is_symlink() and not dangling.exists()


def test_pull_under_a_file_is_refused(store_url, tmp_path):
    cps = committed_step(store_url, tmp_path)
    (tmp_path / "file").write_text("mine")
    with pytest.raises(StoreError, match=f"{tmp_path / 'file'} is not a directory"):
        cps.download(1, tmp_path / "file" / "checkpoint")
    assert (tmp_path / "file").read_text() == "mine"


def test_replace_takes_the_place_of_a_directory_a_file_or_a_symlink(store_url, tmp_path):
    """The trainer's own half-saved step directory (or whatever it left at that path) is
    replaced by the verified download; a symlink is replaced, never what it points to."""
    cps = committed_step(store_url, tmp_path)
    stale = tmp_path / "stale"
    (stale / "shards").mkdir(parents=True)
    (stale / "shards" / "half-written").write_bytes(b"x")
    a_file = tmp_path / "file"
    a_file.write_text("old")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious").write_text("keep")
    link = tmp_path / "link"
    link.symlink_to(elsewhere)
    for destination in (stale, a_file, link, tmp_path / "new"):
        cps.download(1, destination, replace=True)
        assert not destination.is_symlink()
        assert sorted(str(p.relative_to(destination)) for p in destination.rglob("*")) == [
            ".checkpoint-manifest.json",
            ".metadata",
            "shards",
            "shards/__0_0.distcp",
        ]
    assert [p.name for p in elsewhere.iterdir()] == ["precious"]


# -- verification, retention, listing -------------------------------------------------------
def test_a_corrupt_file_is_caught_whichever_way_its_checksum_sorts(store_url, tmp_path):
    """Same size, other bytes: the checksum differs, sorting before or after the real one."""
    store = open_store(store_url)
    cps = Checkpoints(store)
    local = make_checkpoint(tmp_path / "local", 1, files=1, size=1000)
    cps.commit(local, 1)
    real = hashlib.sha256((local / "shards" / "__0_0.distcp").read_bytes()).hexdigest()
    below = above = None
    for i in range(256):
        data = bytes([i]) * 1000
        digest = hashlib.sha256(data).hexdigest()
        below = data if below is None and digest < real else below
        above = data if above is None and digest > real else above
    for n, data in enumerate((below, above)):
        evil = tmp_path / "evil"
        evil.write_bytes(data)
        store.put_file(evil, "step-1/shards/__0_0.distcp")
        with pytest.raises(CorruptCheckpoint, match="does not match its manifest"):
            cps.download(1, tmp_path / f"out-{n}")
        assert not (tmp_path / f"out-{n}").exists()


def test_gc_deletes_an_abandoned_upload_between_committed_steps(store_url, tmp_path):
    store = open_store(store_url)
    cps = Checkpoints(store)
    for step in (1, 3):
        cps.commit(make_checkpoint(tmp_path, step, files=1, size=100), step)
    abandoned = make_checkpoint(tmp_path, 2, files=1, size=100)
    store.put_file(abandoned / ".metadata", "step-2/.metadata")
    assert cps.gc(keep=2) == [2]
    assert cps.committed() == [1, 3]
    assert {o.key.split("/")[0] for o in store.list()} == {"step-1", "step-3"}


def test_an_upload_in_progress_draws_no_warning(store_url, tmp_path, caplog):
    """A step with files and no manifest yet is no checkpoint at all, not a broken one: listing
    says nothing of it, whatever its files are named (before or after the manifest's name)."""
    store = open_store(store_url)
    cps = Checkpoints(store)
    cps.commit(make_checkpoint(tmp_path, 1, files=1, size=100), 1)
    uploading = make_checkpoint(tmp_path, 2, files=1, size=100)
    store.put_file(uploading / ".metadata", "step-2/.metadata")
    store.put_file(uploading / ".metadata", "step-2/.aaa")
    store.put_file(uploading / ".metadata", "step-2/zzz")
    with caplog.at_level(logging.WARNING, logger="checkpoints_sync"):
        assert cps.committed() == [1]
    assert caplog.records == []
    junk = tmp_path / "junk"
    junk.write_text("{not json")
    store.put_file(junk, f"step-3/{NAME}")
    with caplog.at_level(logging.WARNING, logger="checkpoints_sync"):
        assert cps.committed() == [1]
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["ignoring step-3"]
