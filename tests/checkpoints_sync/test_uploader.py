import threading
from pathlib import Path

import pytest

from checkpoints_sync import AsyncUploader, Checkpoints, StoreError, open_store
from checkpoints_sync.manifest import NAME

from .test_checkpoints import make_checkpoint


class Flaky:
    """A real store whose first `failures` uploads fail, as a dropped connection would."""

    def __init__(self, store, failures: int) -> None:
        self.store, self.failures = store, failures
        self.url = store.url

    def put_file(self, path: Path, key: str) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise StoreError("connection reset by peer")
        self.store.put_file(path, key)

    def __getattr__(self, name):
        return getattr(self.store, name)


class Gated:
    """A real store whose uploads wait until the gate opens."""

    def __init__(self, store) -> None:
        self.store, self.gate = store, threading.Event()
        self.url = store.url

    def put_file(self, path: Path, key: str) -> None:
        self.gate.wait(60)
        self.store.put_file(path, key)

    def __getattr__(self, name):
        return getattr(self.store, name)


def test_submit_returns_at_once_and_wait_commits(store_url, tmp_path):
    """submit hands over and returns while no upload can make progress (the gate is shut):
    the trainer never waits for the bucket. How fast is benchmarks/checkpoint_upload.py's."""
    store = Gated(open_store(store_url))
    cps = Checkpoints(store)
    uploader = AsyncUploader(cps, keep=2)
    dirs = {step: make_checkpoint(tmp_path, step, files=4, size=200_000) for step in (1, 2, 3)}
    submitting = threading.Thread(target=lambda: [uploader.submit(d, s) for s, d in dirs.items()])
    submitting.start()
    submitting.join(30)
    assert not submitting.is_alive(), "submit waited for an upload"
    assert cps.committed() == []
    store.gate.set()
    results = uploader.wait(timeout=120)
    uploader.close()
    assert [r.step for r in results] == [1, 2, 3] and all(r.ok for r in results)
    assert cps.committed() == [2, 3]  # retention: the newest two


def test_failed_upload_is_retried(tmp_path):
    # Four files per checkpoint: attempt 1 loses all four uploads, attempt 2 one, attempt 3 none.
    store = Flaky(open_store(f"file://{tmp_path / 'b'}"), failures=5)
    uploader = AsyncUploader(Checkpoints(store, max_workers=1), backoff_seconds=0.01)
    uploader.submit(make_checkpoint(tmp_path, 1), 1)
    [result] = uploader.wait(timeout=30)
    assert result.ok and result.attempts == 3
    assert Checkpoints(store).committed() == [1]


def test_upload_that_keeps_failing_is_never_committed(tmp_path):
    store = Flaky(open_store(f"file://{tmp_path / 'b'}"), failures=10**6)
    cps = Checkpoints(store, max_workers=1)
    uploader = AsyncUploader(cps, retries=2, backoff_seconds=0.01)
    uploader.submit(make_checkpoint(tmp_path, 1), 1)
    with pytest.raises(StoreError, match="step 1 not committed"):
        uploader.wait(timeout=30)
    assert cps.committed() == []


def test_keep_must_leave_a_spare():
    with pytest.raises(ValueError):
        AsyncUploader(Checkpoints(open_store("file:///tmp/unused")), keep=1)


class FailsAfter:
    """A real store in which only some operations break, after `ok` of them succeeded: data
    files but never the manifest (`put_file`), or deletes (`delete`). The manifest's place in the
    order of operations is what these failures make visible."""

    def __init__(self, store, operation: str, ok: int) -> None:
        self.store, self.operation, self.ok = store, operation, ok
        self.url = store.url

    def _may(self, operation: str) -> None:
        if operation == self.operation:
            if self.ok <= 0:
                raise StoreError("connection reset by peer")
            self.ok -= 1

    def put_file(self, path: Path, key: str) -> None:
        if not key.endswith(NAME):
            self._may("put_file")
        self.store.put_file(path, key)

    def delete(self, keys: list[str]) -> None:
        self._may("delete")
        self.store.delete(keys)

    def __getattr__(self, name):
        return getattr(self.store, name)


def assert_every_committed_step_is_whole(store, tmp_path: Path) -> None:
    cps = Checkpoints(store)
    for step in cps.committed():
        cps.download(step, tmp_path / "verify" / f"step-{step}")  # CorruptCheckpoint otherwise


def test_a_failed_recommit_never_leaves_the_old_manifest_over_new_files(tmp_path):
    """Step 1 saved again (a resumed run redoing it) with other contents: one new data file gets
    through, the next fails. The old manifest must not still vouch for the step."""
    store = open_store(f"file://{tmp_path / 'b'}")
    Checkpoints(store).commit(make_checkpoint(tmp_path / "first", 1), 1)
    flaky = FailsAfter(store, "put_file", ok=1)
    with pytest.raises(StoreError):
        Checkpoints(flaky, max_workers=1).commit(make_checkpoint(tmp_path / "again", 1), 1)
    assert Checkpoints(store).committed() == []
    assert_every_committed_step_is_whole(store, tmp_path)


class ManifestDeleteFails:
    """A real store whose batch delete loses the manifest's key and deletes the rest, as an S3
    DeleteObjects answering with a per-key error does."""

    def __init__(self, store) -> None:
        self.store = store
        self.url = store.url

    def delete(self, keys: list[str]) -> None:
        self.store.delete([k for k in keys if not k.endswith(NAME)])
        if any(k.endswith(NAME) for k in keys):
            raise StoreError("DeleteObjects: InternalError for the manifest")

    def __getattr__(self, name):
        return getattr(self.store, name)


@pytest.mark.parametrize("broken", ["second delete fails", "manifest delete fails"])
def test_gc_failing_half_way_never_leaves_a_committed_step_with_files_missing(tmp_path, broken):
    """gc deletes a step's manifest alone and first: however the deletes break half-way, a
    step that still has its manifest still has all of its files."""
    store = open_store(f"file://{tmp_path / 'b'}")
    for step in (1, 2, 3):
        Checkpoints(store).commit(make_checkpoint(tmp_path, step), step)
    if broken == "second delete fails":
        failing, left = FailsAfter(store, "delete", ok=1), [2, 3]
    else:
        failing, left = ManifestDeleteFails(store), [1, 2, 3]
    with pytest.raises(StoreError):
        Checkpoints(failing).gc(keep=1)
    assert Checkpoints(store).committed() == left
    assert_every_committed_step_is_whole(store, tmp_path)
