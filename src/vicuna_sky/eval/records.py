"""Append-only JSONL logs: every finished record is on disk before the next starts, so a killed
run loses at most the record in flight and a rerun picks up where it stopped."""

from __future__ import annotations

import json
import os
from pathlib import Path

from vicuna_sky.errors import VicunaSkyError


class JsonlLog:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._repair: tuple[int, bytes] | None = None  # (cut at, then write) before appending

    def records(self) -> list[dict]:
        """What is already there, read without touching the file: the caller checks that these
        are its records before the first `append` repairs a last line cut short by a kill."""
        if not self.path.exists():
            return []
        try:
            data = self.path.read_bytes()
        except OSError as e:
            raise VicunaSkyError(f"{self.path}: {e.strerror}") from None
        cut = len(data) if data.endswith(b"\n") else data.rfind(b"\n") + 1
        records = [
            _record(self.path, n, line)
            for n, line in enumerate(data[:cut].split(b"\n"), 1)
            if line.strip()
        ]
        tail = data[cut:]
        if tail.strip():
            # Only the line being written when the process died can lack its newline: kept (and
            # ended) if it is whole, dropped if it was cut short; anything else is not ours.
            number = data[:cut].count(b"\n") + 1
            try:
                records.append(_record(self.path, number, tail))
                self._repair = (len(data), b"\n")
            except VicunaSkyError:
                if not tail.lstrip().startswith(b'{"'):
                    raise
                self._repair = (cut, b"")
        return records

    def append(self, record: dict) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a+b") as f:
                if self._repair is not None:
                    cut, end = self._repair
                    f.truncate(cut)
                    f.write(end)
                    self._repair = None
                f.write((json.dumps(record, ensure_ascii=False) + "\n").encode())
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise VicunaSkyError(f"{self.path}: {e.strerror}") from None


def _record(path: Path, number: int, line: bytes) -> dict:
    try:
        record = json.loads(line.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise VicunaSkyError(f"{path}:{number}: not UTF-8 text") from None
    except ValueError as e:
        raise VicunaSkyError(f"{path}:{number}: not JSON ({e})") from None
    if not isinstance(record, dict):
        raise VicunaSkyError(f"{path}:{number}: expected a JSON object per line")
    return record


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")
