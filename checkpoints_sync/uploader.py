"""Background uploads: training hands over a local checkpoint directory and goes on.

One background thread commits checkpoints in the order they were handed over (so a newer step
is never committed before an older one), each with its files uploaded in parallel. A failed
commit is retried with exponential backoff; one that keeps failing is left uncommitted (its
manifest never written) and reported by `wait()`. After each commit, retention keeps the newest
`keep` committed steps.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from checkpoints_sync.checkpoints import Checkpoints
from checkpoints_sync.store import StoreError

log = logging.getLogger("checkpoints_sync")


@dataclass
class UploadResult:
    step: int
    ok: bool
    seconds: float
    attempts: int
    error: str = ""


class AsyncUploader:
    def __init__(
        self,
        checkpoints: Checkpoints,
        keep: int = 2,
        retries: int = 4,
        backoff_seconds: float = 1.0,
        on_done: Callable[[UploadResult], None] | None = None,
    ) -> None:
        if keep < 2:
            raise ValueError("keep at least 2 checkpoints: the newest may be mid-upload")
        self.checkpoints = checkpoints
        self.keep, self.retries, self.backoff = keep, retries, backoff_seconds
        self.on_done = on_done
        self.results: list[UploadResult] = []
        self._queue: queue.Queue[tuple[Path, int] | None] = queue.Queue()
        self._idle = threading.Condition()
        self._pending = 0
        self._thread = threading.Thread(target=self._run, name="checkpoint-uploader", daemon=True)
        self._thread.start()

    def submit(self, directory: Path, step: int) -> None:
        """Queue a finished local checkpoint; returns at once."""
        with self._idle:
            self._pending += 1
        self._queue.put((Path(directory), step))

    def wait(self, timeout: float | None = None) -> list[UploadResult]:
        """Block until everything submitted is committed or has failed for good. Raises
        StoreError if any of those uploads failed."""
        with self._idle:
            if not self._idle.wait_for(lambda: self._pending == 0, timeout):
                raise TimeoutError(f"{self._pending} checkpoint upload(s) still running")
        failed = [r for r in self.results if not r.ok]
        if failed:
            raise StoreError("; ".join(f"step {r.step} not committed: {r.error}" for r in failed))
        return list(self.results)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _commit_with_retries(self, directory: Path, step: int) -> UploadResult:
        start = time.monotonic()
        error = ""
        for attempt in range(1, self.retries + 2):
            try:
                self.checkpoints.commit(directory, step)
                self.checkpoints.gc(self.keep)
                return UploadResult(step, True, time.monotonic() - start, attempt)
            except (StoreError, OSError) as e:
                error = str(e)
                if attempt <= self.retries:
                    delay = self.backoff * 2 ** (attempt - 1)
                    log.warning("upload of step %d failed (%s); retry in %.1fs", step, e, delay)
                    time.sleep(delay)
        return UploadResult(step, False, time.monotonic() - start, self.retries + 1, error)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            directory, step = item
            result = self._commit_with_retries(directory, step)
            self.results.append(result)
            if self.on_done:
                self.on_done(result)
            with self._idle:
                self._pending -= 1
                self._idle.notify_all()
