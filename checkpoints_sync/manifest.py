"""A checkpoint's manifest: every file with its size and sha256, the step and the time.

It is the commit marker: uploaded last, so its presence means every file it lists was uploaded
before it; readers verify sizes and checksums against it after download.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

NAME = ".checkpoint-manifest.json"
FORMAT = 1


class InvalidManifest(ValueError):
    pass


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    step: int
    time: float
    files: tuple[FileEntry, ...]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": FORMAT,
                "step": self.step,
                "time": self.time,
                "files": [asdict(f) for f in self.files],
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str, step: int | None = None) -> Manifest:
        try:
            raw = json.loads(text)
            files = tuple(
                FileEntry(str(f["path"]), int(f["size"]), str(f["sha256"])) for f in raw["files"]
            )
            manifest = cls(int(raw["step"]), float(raw["time"]), files)
        except (ValueError, KeyError, TypeError) as e:
            raise InvalidManifest(f"unreadable manifest: {e}") from None
        if raw.get("format") != FORMAT:
            raise InvalidManifest(f"manifest format {raw.get('format')!r} is not {FORMAT}")
        if step is not None and manifest.step != step:
            raise InvalidManifest(f"manifest says step {manifest.step}, directory step {step}")
        for f in files:
            if f.path.startswith("/") or ".." in f.path.split("/") or f.path == NAME:
                raise InvalidManifest(f"manifest lists an unsafe path {f.path!r}")
        return manifest


def sha256_file(path: Path, block: int = 8 * 1024 * 1024) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def local_files(directory: Path) -> list[str]:
    """Files of a local checkpoint directory, '/'-relative, sorted (the manifest excluded)."""
    directory = Path(directory)
    return sorted(
        p.relative_to(directory).as_posix()
        for p in directory.rglob("*")
        if p.is_file() and p.name != NAME
    )


def build(directory: Path, step: int) -> Manifest:
    directory = Path(directory)
    entries = tuple(
        FileEntry(rel, (directory / rel).stat().st_size, sha256_file(directory / rel))
        for rel in local_files(directory)
    )
    return Manifest(step=step, time=time.time(), files=entries)
