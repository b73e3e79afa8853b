"""A local directory as a store (also what the local backend's buckets are)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from checkpoints_sync.store import NotFound, ObjectInfo, write_atomically


class LocalStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).absolute()
        self.url = f"file://{self.root}"

    def _path(self, key: str) -> Path:
        return self.root / key

    def put_file(self, path: Path, key: str) -> None:
        write_atomically(self._path(key), lambda tmp: shutil.copyfile(path, tmp))

    def get_file(self, key: str, path: Path) -> None:
        src = self._path(key)
        # Another process (a trainer's retention) may delete it at any moment, also between a
        # check and the copy: gone is NotFound whenever it goes, as on a cloud store.
        if not src.is_file():
            raise NotFound(f"{self.url}/{key}")
        try:
            write_atomically(Path(path), lambda tmp: shutil.copyfile(src, tmp))
        except FileNotFoundError:
            if src.is_file():
                raise  # the destination's directory, not the object
            raise NotFound(f"{self.url}/{key}") from None

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        if not self.root.is_dir():
            return []
        out = []
        for dirpath, _, files in os.walk(self.root):
            for name in files:
                if name.startswith(".") and name.endswith(".part"):
                    continue  # a copy in flight
                full = Path(dirpath) / name
                key = full.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    try:
                        out.append(ObjectInfo(key, full.stat().st_size))
                    except FileNotFoundError:
                        continue  # deleted since the directory was read
        return out

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            path = self._path(key)
            path.unlink(missing_ok=True)
            parent = path.parent
            while parent != self.root and parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()
