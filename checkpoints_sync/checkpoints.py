"""Checkpoints in a store: commit, list committed, download with verification, retention.

Layout under the store's prefix: `step-<N>/<files...>` and `step-<N>/.checkpoint-manifest.json`.
A step is committed exactly when its manifest exists and parses; everything else (a half upload
from a machine that vanished) is invisible to readers and cleaned up by retention.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from checkpoints_sync import manifest as mf
from checkpoints_sync.atomic import atomic_dir
from checkpoints_sync.store import NotFound, Store, StoreError

log = logging.getLogger("checkpoints_sync")
STEP_DIR = re.compile(r"^step-(\d+)$")


class CorruptCheckpoint(StoreError):
    """A committed checkpoint whose files do not match its manifest."""


def step_dir(step: int) -> str:
    return f"step-{step}"


def parse_step(name: str) -> int | None:
    match = STEP_DIR.match(name)
    return int(match.group(1)) if match else None


class Checkpoints:
    def __init__(self, store: Store, max_workers: int = 8) -> None:
        self.store = store
        self.max_workers = max_workers

    # -- writing ---------------------------------------------------------------------------
    def commit(
        self, directory: Path, step: int, manifest: mf.Manifest | None = None
    ) -> mf.Manifest:
        """Upload a local checkpoint directory as `step-N`, files in parallel, manifest last."""
        if type(step) is not int or step < 0:
            raise ValueError(f"step must be a whole number >= 0, not {step!r}")
        manifest = manifest or mf.build(Path(directory), step)
        self.uncommit(step)
        self.upload_files(directory, step, manifest.files)
        self.write_manifest(manifest)
        return manifest

    def uncommit(self, step: int) -> None:
        """Re-committing a step (a resumed run saving it again) first makes it uncommitted."""
        self.store.delete([f"{step_dir(step)}/{mf.NAME}"])

    def upload_files(self, directory: Path, step: int, files: tuple[mf.FileEntry, ...]) -> None:
        """Upload files without committing: for checkpoints spread over several machines, each
        uploads its own files and one of them writes the manifest of all of them."""
        base = step_dir(step)
        with ThreadPoolExecutor(self.max_workers) as pool:
            futures = [
                pool.submit(self.store.put_file, Path(directory) / f.path, f"{base}/{f.path}")
                for f in files
            ]
            for future in futures:
                future.result()

    def write_manifest(self, manifest: mf.Manifest) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            marker = Path(tmp) / mf.NAME
            marker.write_text(manifest.to_json())
            self.store.put_file(marker, f"{step_dir(manifest.step)}/{mf.NAME}")
        log.info(
            "committed %s/%s (%d files, %d bytes)",
            self.store.url,
            step_dir(manifest.step),
            len(manifest.files),
            manifest.total_bytes,
        )

    # -- reading ---------------------------------------------------------------------------
    def _steps(self) -> tuple[set[int], set[int]]:
        """(steps with a manifest object, every step with any object)."""
        marked, seen = set(), set()
        for obj in self.store.list():
            head, _, rest = obj.key.partition("/")
            step = parse_step(head)
            if step is None:
                continue
            seen.add(step)
            if rest == mf.NAME:
                marked.add(step)
        return marked, seen

    def read_manifest(self, step: int) -> mf.Manifest:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / mf.NAME
            self.store.get_file(f"{step_dir(step)}/{mf.NAME}", path)
            return mf.Manifest.from_json(path.read_bytes(), step=step)

    def committed(self) -> list[int]:
        """Committed steps, oldest first (a manifest that does not parse does not count)."""
        out = []
        for step in sorted(self._steps()[0]):
            try:
                self.read_manifest(step)
                out.append(step)
            except (mf.InvalidManifest, NotFound) as e:
                log.warning("ignoring %s: %s", step_dir(step), e)
        return out

    def latest(self) -> int | None:
        steps = self.committed()
        return steps[-1] if steps else None

    def download(self, step: int, destination: Path, replace: bool = False) -> mf.Manifest:
        """Download a committed step into `destination`, verifying every file; CorruptCheckpoint
        if a file is missing or differs from the manifest. `destination` must be new or an empty
        directory: what is there is never deleted, unless `replace` (for a caller that owns it,
        the trainer's own half-saved step directory)."""
        destination = Path(destination)
        if not replace:
            _check_destination(destination)
        manifest = self.read_manifest(step)
        with atomic_dir(destination) as staging:

            def fetch(entry: mf.FileEntry) -> None:
                target = staging / entry.path
                try:
                    self.store.get_file(f"{step_dir(step)}/{entry.path}", target)
                except NotFound:
                    raise CorruptCheckpoint(f"{step_dir(step)}: {entry.path} is missing") from None
                size = target.stat().st_size
                if size != entry.size or mf.sha256_file(target) != entry.sha256:
                    raise CorruptCheckpoint(
                        f"{step_dir(step)}: {entry.path} does not match its manifest"
                    )

            with ThreadPoolExecutor(self.max_workers) as pool:
                for future in [pool.submit(fetch, e) for e in manifest.files]:
                    future.result()
            (staging / mf.NAME).write_text(manifest.to_json())
            if replace and destination.is_dir() and not destination.is_symlink():
                shutil.rmtree(destination)
            elif replace and destination.exists():
                destination.unlink()
        return manifest

    def restore_latest(self, destination: Path) -> int | None:
        """Download the newest committed step that verifies; older ones are tried when a newer
        one is corrupt. None when there is nothing to resume from."""
        for step in reversed(self.committed()):
            try:
                self.download(step, destination)
                return step
            except (CorruptCheckpoint, mf.InvalidManifest) as e:
                log.warning("skipping corrupt checkpoint: %s", e)
        return None

    # -- retention -------------------------------------------------------------------------
    def gc(self, keep: int) -> list[int]:
        """Keep the newest `keep` committed steps (at least one); delete older committed steps
        and abandoned partial uploads older than the newest committed one. Returns the deleted
        steps. A manifest goes first, so a step is never committed with files missing."""
        if keep < 1:
            raise ValueError("keep must be at least 1")
        committed = self.committed()
        if not committed:
            return []
        newest = committed[-1]
        doomed = set(committed[:-keep]) if len(committed) > keep else set()
        doomed |= {s for s in self._steps()[1] if s < newest and s not in committed}
        objects = self.store.list()
        for step in sorted(doomed):
            base = step_dir(step)
            self.store.delete([f"{base}/{mf.NAME}"])
            self.store.delete([o.key for o in objects if o.key.startswith(f"{base}/")])
        return sorted(doomed)


def _check_destination(destination: Path) -> None:
    if destination.is_dir():
        if any(destination.iterdir()):
            raise StoreError(
                f"{destination} is not empty: pull into a new or empty directory "
                "(nothing in it was touched)"
            )
    elif destination.exists() or destination.is_symlink():
        raise StoreError(f"{destination} exists and is not a directory")
    elif destination.parent.exists() and not destination.parent.is_dir():
        raise StoreError(f"{destination.parent} is not a directory")
