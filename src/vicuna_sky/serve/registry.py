"""The controller's worker registry, persisted in SQLite so a restarted controller routes at once.

A worker is in rotation while it heartbeats; it leaves rotation at once when it misses
`expiry_seconds` of heartbeats, fails a request, or says it is draining, and comes back with its
next good heartbeat or registration.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from vicuna_sky.serve.protocol import Registration


@dataclass
class WorkerState:
    address: str
    models: list[str]
    max_concurrency: int
    context_length: int
    last_seen: float = field(default_factory=time.monotonic)
    in_flight: int = 0
    """Requests this controller has sent and not finished (the least-load key)."""
    failed: bool = False
    draining: bool = False

    def available(self, expiry: float) -> bool:
        return not self.failed and not self.draining and time.monotonic() - self.last_seen <= expiry


class Registry:
    def __init__(self, db: Path | None, expiry_seconds: float = 3.0) -> None:
        self.expiry = expiry_seconds
        self.workers: dict[str, WorkerState] = {}
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(db), check_same_thread=False) if db else None
        if self._db:
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS workers (address TEXT PRIMARY KEY, "
                "registration TEXT NOT NULL)"
            )
            for address, raw in self._db.execute("SELECT address, registration FROM workers"):
                reg = json.loads(raw)
                # Known from before a restart: trusted until it misses heartbeats as usual.
                self.workers[address] = WorkerState(
                    address, reg["models"], reg["max_concurrency"], reg["context_length"]
                )

    def register(self, reg: Registration) -> None:
        with self._lock:
            self.workers[reg.address] = WorkerState(
                reg.address, reg.models, reg.max_concurrency, reg.context_length
            )
            if self._db:
                data = reg.model_dump(exclude={"secret"})
                self._db.execute(
                    "INSERT OR REPLACE INTO workers VALUES (?, ?)", (reg.address, json.dumps(data))
                )
                self._db.commit()

    def heartbeat(self, address: str) -> bool:
        with self._lock:
            worker = self.workers.get(address)
            if worker is None:
                return False
            worker.last_seen, worker.failed = time.monotonic(), False
            return True

    def remove(self, address: str) -> None:
        with self._lock:
            self.workers.pop(address, None)
            if self._db:
                self._db.execute("DELETE FROM workers WHERE address = ?", (address,))
                self._db.commit()

    def mark(self, address: str, failed: bool = False, draining: bool = False) -> None:
        with self._lock:
            worker = self.workers.get(address)
            if worker:
                worker.failed |= failed
                worker.draining |= draining

    def models(self) -> dict[str, int]:
        """Served model names -> context length, over the workers in rotation."""
        with self._lock:
            out: dict[str, int] = {}
            for w in self.workers.values():
                if w.available(self.expiry):
                    for m in w.models:
                        out[m] = max(out.get(m, 0), w.context_length)
            return out

    def pick(self, model: str, exclude: set[str]) -> WorkerState | None:
        """The least-loaded worker in rotation serving `model`, counted as busy at once."""
        with self._lock:
            ready = [
                w
                for w in self.workers.values()
                if model in w.models and w.address not in exclude and w.available(self.expiry)
            ]
            if not ready:
                return None
            best = min(ready, key=lambda w: (w.in_flight / w.max_concurrency, w.in_flight))
            best.in_flight += 1
            return best

    def release(self, worker: WorkerState) -> None:
        with self._lock:
            worker.in_flight = max(0, worker.in_flight - 1)
