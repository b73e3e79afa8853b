"""The controller's worker registry, persisted in SQLite so a restarted controller routes at once.

A worker is in rotation while it heartbeats and says it is healthy; it leaves rotation at once
when it misses `expiry_seconds` of heartbeats, fails a request, reports its engine stuck or says
it is draining, and comes back with its next good heartbeat (after a failed request, the first
one after its back-off: BACKOFF_SECONDS). One silent for `forget_seconds` is removed. An
address belongs to the worker process that registered it (its `worker_id`): another cannot
take it over, heartbeat for it or drain it while the owner is alive, nor with another
certificate until the owner drained or was forgotten (or an admin forgets it).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from vicuna_sky.serve.protocol import Registration

BACKOFF_SECONDS = (1.0, 30.0)
"""A worker that fails a request comes back with its next heartbeat; one that fails again before
it answers anything stays out of rotation for 1 s, then twice as long for each failure in a row,
up to 30 s, however well it heartbeats. One that fails every request (a wrong address, a broken
engine) takes one every 30 s, not one a second; a single failure (a slow moment) costs nothing.
An answer starts it over."""


@dataclass
class WorkerState:
    address: str
    worker_id: str
    models: list[str]
    max_concurrency: int
    context_length: int
    last_seen: float = field(default_factory=time.monotonic)
    in_flight: int = 0
    """Requests this controller has sent and not finished (the least-load key)."""
    failed: bool = False
    failures: int = 0
    """Requests failed in a row (the back-off's exponent)."""
    failed_until: float = 0.0
    """Monotonic time before which heartbeats do not bring a failed worker back."""
    healthy: bool = True
    """What the worker said in its last heartbeat (False: its engine is stuck)."""
    draining: bool = False
    tls_fingerprint: str = ""
    """Of the certificate the worker serves (https); the controller pins it."""

    def alive(self, expiry: float) -> bool:
        """Heartbeating and healthy: requests in flight to it may go on."""
        return self.healthy and time.monotonic() - self.last_seen <= expiry

    def available(self, expiry: float) -> bool:
        """In rotation: it may take new requests."""
        return self.alive(expiry) and not self.failed and not self.draining


class Registry:
    def __init__(
        self,
        db: Path | None,
        expiry_seconds: float = 3.0,
        forget_seconds: float = 60.0,
        max_workers: int = 1024,
    ) -> None:
        self.expiry, self.max_workers = expiry_seconds, max_workers
        self.forget = max(forget_seconds, expiry_seconds)
        self.workers: dict[str, WorkerState] = {}
        self._names: frozenset[str] = frozenset()
        """Every model a registered worker serves (`serves`)."""
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(db), check_same_thread=False) if db else None
        if self._db:
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS workers (address TEXT PRIMARY KEY, "
                "registration TEXT NOT NULL)"
            )
            for address, raw in self._db.execute("SELECT address, registration FROM workers"):
                try:
                    reg = Registration.model_validate(json.loads(raw))
                except ValueError:
                    continue  # a row from an older version: its worker registers again
                # Known from before a restart: trusted until it misses heartbeats as usual.
                self.workers[address] = _state(reg)
            self._names_changed()

    def register(self, reg: Registration) -> Literal["ok", "taken", "full"]:
        with self._lock:
            old = self.workers.get(reg.address)
            if old is not None and old.worker_id != reg.worker_id and not self._yields(old, reg):
                return "taken"
            if old is None and len(self.workers) >= self.max_workers:
                return "full"
            self.workers[reg.address] = _state(reg)
            self._names_changed()
            if self._db:
                self._db.execute(
                    "INSERT OR REPLACE INTO workers VALUES (?, ?)",
                    (reg.address, reg.model_dump_json()),
                )
                self._db.commit()
            return "ok"

    def _yields(self, old: WorkerState, reg: Registration) -> bool:
        """Whether another process may register `old`'s address: once the owner is silent, or
        drained; with another certificate, only once the owner drained or was forgotten (a
        heartbeat saying unhealthy must not hand its address to whoever holds the secret)."""
        if old.draining:
            return True
        if old.tls_fingerprint != reg.tls_fingerprint:
            return time.monotonic() - old.last_seen > self.forget
        return not old.alive(self.expiry)

    def forget_worker(self, address: str) -> bool:
        """An admin's word: `address` belongs to nobody now (its next registration wins)."""
        with self._lock:
            if self.workers.pop(address, None) is None:
                return False
            self._names_changed()
            if self._db:
                self._db.execute("DELETE FROM workers WHERE address = ?", (address,))
                self._db.commit()
            return True

    def heartbeat(self, address: str, worker_id: str, healthy: bool = True) -> bool:
        """False when the controller does not know this worker (it registers again)."""
        with self._lock:
            worker = self.workers.get(address)
            if worker is None or worker.worker_id != worker_id:
                return False
            worker.last_seen, worker.healthy = time.monotonic(), healthy
            if worker.failed and worker.last_seen >= worker.failed_until:
                worker.failed = False
            return True

    def mark(
        self,
        address: str,
        failed: bool = False,
        draining: bool = False,
        worker_id: str | None = None,
    ) -> bool:
        """Take a worker out of rotation; `worker_id`, when given, must be the owner's."""
        with self._lock:
            worker = self.workers.get(address)
            if worker is None or (worker_id is not None and worker.worker_id != worker_id):
                return False
            if failed:
                worker.failures += 1
                first, most = BACKOFF_SECONDS
                again = worker.failures - 2  # 0: the second failure in a row
                backoff = 0.0 if again < 0 else min(most, first * 2 ** min(again, 16))
                worker.failed, worker.failed_until = True, time.monotonic() + backoff
            worker.draining |= draining
            return True

    def alive(self, address: str) -> bool:
        with self._lock:
            worker = self.workers.get(address)
            return worker is not None and worker.alive(self.expiry)

    def forget_expired(self) -> list[str]:
        """Remove the workers silent for `forget_seconds` (drained ones included)."""
        now = time.monotonic()
        with self._lock:
            gone = [a for a, w in self.workers.items() if now - w.last_seen > self.forget]
            for address in gone:
                del self.workers[address]
            if gone:
                self._names_changed()
            if self._db and gone:
                self._db.executemany("DELETE FROM workers WHERE address = ?", [(a,) for a in gone])
                self._db.commit()
        return gone

    def serves(self, model: str) -> bool:
        """Whether a registered worker (in rotation or not) serves `model`: metrics are labelled
        with such names only, never with whatever a client sends."""
        return model in self._names

    def _names_changed(self) -> None:
        self._names = frozenset(m for w in self.workers.values() for m in w.models)

    def snapshot(self) -> list[dict]:
        with self._lock:
            return [
                asdict(w) | {"available": w.available(self.expiry)} for w in self.workers.values()
            ]

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

    def release(self, worker: WorkerState, answered: bool = False) -> None:
        """`worker` has one request less; `answered`: it gave a whole answer (its back-off
        starts over)."""
        with self._lock:
            worker.in_flight = max(0, worker.in_flight - 1)
            if answered:
                worker.failures = 0


def _state(reg: Registration) -> WorkerState:
    return WorkerState(
        reg.address,
        reg.worker_id,
        reg.models,
        reg.max_concurrency,
        reg.context_length,
        tls_fingerprint=reg.tls_fingerprint,
    )
