"""A checkpoint's manifest: every file with its size and sha256, the step and the time.

It is the commit marker: uploaded last, so its presence means every file it lists was uploaded
before it; readers verify sizes and checksums against it after download.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

NAME = ".checkpoint-manifest.json"
FORMAT = 1
SHA256 = re.compile(r"^[0-9a-f]{64}$")


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
    def from_json(cls, text: str | bytes, step: int | None = None) -> Manifest:
        """Parse and check every field: one bad manifest must be one bad step (InvalidManifest),
        never an arbitrary exception that takes down listing the whole bucket."""
        try:
            raw = json.loads(text)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            raise InvalidManifest(f"unreadable manifest: {e}") from None
        if not isinstance(raw, dict):
            raise InvalidManifest(f"manifest is a JSON {type(raw).__name__}, not an object")
        if raw.get("format") != FORMAT:
            raise InvalidManifest(f"manifest format {raw.get('format')!r} is not {FORMAT}")
        if not _count(raw.get("step")):
            raise InvalidManifest(f"manifest step {raw.get('step')!r} is not a whole number >= 0")
        stamp = raw.get("time")
        if type(stamp) not in (int, float) or not math.isfinite(stamp):
            raise InvalidManifest(f"manifest time {stamp!r} is not a finite number")
        if not isinstance(raw.get("files"), list):
            raise InvalidManifest("manifest files is not a list")
        files = []
        for f in raw["files"]:
            ok = isinstance(f, dict) and isinstance(f.get("path"), str) and _count(f.get("size"))
            if not ok or not isinstance(f.get("sha256"), str) or not SHA256.match(f["sha256"]):
                raise InvalidManifest(f"manifest lists a bad file entry {str(f)[:200]}")
            files.append(FileEntry(f["path"], f["size"], f["sha256"]))
        manifest = cls(raw["step"], float(stamp), tuple(files))
        if step is not None and manifest.step != step:
            raise InvalidManifest(f"manifest says step {manifest.step}, directory step {step}")
        for f in files:
            if f.path.startswith("/") or ".." in f.path.split("/") or f.path == NAME:
                raise InvalidManifest(f"manifest lists an unsafe path {f.path!r}")
        return manifest


def _count(value: object) -> bool:
    """A JSON whole number >= 0 (1e999 parses to inf, 3.0 and true are not counts)."""
    return type(value) is int and value >= 0


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
