import time
from pathlib import Path

import pytest

from checkpoints_sync import AsyncUploader, Checkpoints, StoreError, open_store

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


def test_submit_returns_at_once_and_wait_commits(store_url, tmp_path):
    cps = Checkpoints(open_store(store_url))
    uploader = AsyncUploader(cps, keep=2)
    start = time.perf_counter()
    for step in (1, 2, 3):
        uploader.submit(make_checkpoint(tmp_path, step, files=4, size=200_000), step)
    handed_over = time.perf_counter() - start
    results = uploader.wait(timeout=120)
    uploader.close()
    assert handed_over < 0.05
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
