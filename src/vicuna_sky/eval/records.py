"""Append-only JSONL logs: every finished record is on disk before the next starts, so a killed
run loses at most the record in flight and a rerun picks up where it stopped."""

from __future__ import annotations

import json
import os
from pathlib import Path

from vicuna_sky.errors import VicunaSkyError
from vicuna_sky.eval.questions import read_jsonl


class JsonlLog:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def records(self) -> list[dict]:
        """What is already there. A last line cut short by a kill is removed, not fatal."""
        if not self.path.exists():
            return []
        try:
            self._drop_torn_tail()
        except OSError as e:
            raise VicunaSkyError(f"{self.path}: {e.strerror}") from None
        return read_jsonl(self.path)

    def append(self, record: dict) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise VicunaSkyError(f"{self.path}: {e.strerror}") from None

    def _drop_torn_tail(self) -> None:
        data = self.path.read_bytes()
        if not data or data.endswith(b"\n"):
            return
        # Only the line being written when the process died can lack its newline: dropped if it
        # was cut short, kept (and ended) if it is whole.
        cut = data.rfind(b"\n") + 1
        try:
            json.loads(data[cut:])
        except ValueError:
            with self.path.open("r+b") as f:
                f.truncate(cut)
        else:
            with self.path.open("ab") as f:
                f.write(b"\n")
