"""Where training metrics go, and how they are read back.

The metrics file (one JSON line per optimizer step, rank 0) is the source of truth. The same
records also go to TensorBoard event files (tensorboardX: no TensorFlow, no server) and, when
`WANDB_API_KEY` is set, to Weights & Biases. Both are best effort: a writer that fails is
switched off with one warning, and training goes on.

In the bucket, beside the run's checkpoints (the checkpoint URL), each attempt (each machine a
recovery lands on) keeps its own files, so attempts never overwrite each other's history:

    metrics/<attempt>.jsonl      this attempt's records, re-uploaded whole every few seconds
    tensorboard/<attempt>/...    its event files (`tensorboard --logdir` the folder)
    loss_curve.png               train and eval loss against tokens, drawn at the end

`<attempt>` starts with the UTC time it began, so the names sort in the order they ran.
`history` reads them back for `vicuna-sky status` and the loss curve; it imports no torch.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("vicuna_sky.train")
METRICS_PREFIX = "metrics/"
TENSORBOARD_PREFIX = "tensorboard/"
LOSS_CURVE = "loss_curve.png"
SCALARS = {
    "loss": "train/loss",
    "eval_loss": "eval/loss",
    "lr": "train/lr",
    "tokens_per_second": "train/tokens_per_second",
    "mfu": "train/mfu",
    "tokens_seen": "train/tokens_seen",
    "checkpoint_stall_seconds": "train/checkpoint_stall_seconds",
}
"""Record fields written as TensorBoard scalars (and W&B keys, with the same names)."""


def attempt_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


class MetricsLog:
    """Rank 0's writer: the local metrics file, TensorBoard, W&B, and the bucket copies.
    Every other rank gets one with `enabled=False`, which does nothing."""

    def __init__(
        self,
        path: str,
        url: str = "",
        tensorboard_dir: str = "",
        run_name: str = "",
        upload_seconds: float = 30.0,
        enabled: bool = True,
        config: dict | None = None,
    ) -> None:
        self.enabled = enabled
        self.path = Path(path) if path and enabled else None
        self.url, self.upload_seconds = (url if enabled else ""), upload_seconds
        self.attempt = attempt_id()
        # This attempt's part of the file: a restart in the same directory appends to it, and
        # only its own lines are this attempt's history in the bucket.
        self.offset = self.path.stat().st_size if self.path and self.path.exists() else 0
        self._store: Any = None
        self._uploaded_at = time.monotonic()
        self._upload: threading.Thread | None = None
        self._warned: set[str] = set()
        self.tensorboard = None
        self.tensorboard_dir = None
        if enabled and tensorboard_dir:
            self.tensorboard_dir = Path(tensorboard_dir) / self.attempt
            self.tensorboard = self._guard("tensorboard", self._open_tensorboard)
        self.wandb = None
        if enabled and os.environ.get("WANDB_API_KEY"):
            self.wandb = self._guard("wandb", lambda: self._open_wandb(run_name, url, config))

    # ------------------------------------------------------------------ writers

    def _open_tensorboard(self) -> Any:
        from tensorboardX import SummaryWriter

        return SummaryWriter(logdir=str(self.tensorboard_dir), flush_secs=30)

    @staticmethod
    def _open_wandb(run_name: str, url: str, config: dict | None) -> Any:
        import hashlib

        import wandb

        # One W&B run per training run: every recovery continues it (same id, resume allowed).
        run_id = hashlib.sha256((url or run_name or "run").encode()).hexdigest()[:16]
        return wandb.init(
            project=os.environ.get("WANDB_PROJECT", "vicuna-sky"),
            name=run_name or None,
            id=run_id,
            resume="allow",
            config=config or {},
        )

    def _guard(self, what: str, fn: Any) -> Any:
        """Run a writer's call; on any failure switch that writer off with one warning."""
        try:
            return fn()
        except Exception as e:  # a metrics writer never stops training
            if what not in self._warned:
                self._warned.add(what)
                log.warning("%s switched off: %s: %s", what, type(e).__name__, e)
            if what == "tensorboard":
                self.tensorboard = None
            elif what == "wandb":
                self.wandb = None
            return None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        if self.path:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        step = int(record["step"])
        scalars = {SCALARS[k]: v for k, v in record.items() if k in SCALARS and v is not None}
        if self.tensorboard is not None:
            writer = self.tensorboard

            def add() -> None:
                for tag, value in scalars.items():
                    writer.add_scalar(tag, value, step)

            self._guard("tensorboard", add)
        if self.wandb is not None:
            run = self.wandb
            self._guard("wandb", lambda: run.log(scalars, step=step))
        if self.url and time.monotonic() - self._uploaded_at >= self.upload_seconds:
            self._upload_in_background()

    # ------------------------------------------------------------------ bucket

    def _upload_in_background(self) -> None:
        if self._upload is not None and self._upload.is_alive():
            return  # one upload at a time; the next record starts the next one
        self._uploaded_at = time.monotonic()
        self._upload = threading.Thread(target=self.upload, daemon=True, name="metrics-upload")
        self._upload.start()

    def upload(self) -> None:
        """This attempt's records and event files to the bucket (each object replaced whole)."""
        if not self.url:
            return

        def put() -> None:
            from checkpoints_sync.factory import open_store

            self._store = self._store or open_store(self.url)
            if self.path and self.path.exists():
                with self.path.open("rb") as f:
                    f.seek(self.offset)
                    mine = f.read()
                with tempfile.NamedTemporaryFile(suffix=".jsonl") as tmp:
                    Path(tmp.name).write_bytes(mine)
                    self._store.put_file(Path(tmp.name), f"{METRICS_PREFIX}{self.attempt}.jsonl")
            if self.tensorboard is not None:
                self.tensorboard.flush()
            if self.tensorboard_dir and self.tensorboard_dir.is_dir():
                for event in sorted(self.tensorboard_dir.iterdir()):
                    key = f"{TENSORBOARD_PREFIX}{self.attempt}/{event.name}"
                    self._store.put_file(event, key)

        try:
            put()
        except Exception as e:  # the bucket unreachable now: the next upload tries again
            if "upload" not in self._warned:
                self._warned.add("upload")
                log.warning("metrics upload to %s failed (will retry): %s", self.url, e)

    def put(self, path: Path, key: str) -> None:
        """Upload one more file of the run's output (the loss curve), best effort."""
        if not self.url:
            return
        try:
            from checkpoints_sync.factory import open_store

            self._store = self._store or open_store(self.url)
            self._store.put_file(path, key)
        except Exception as e:
            log.warning("cannot upload %s to %s: %s", path.name, self.url, e)

    def close(self) -> None:
        """Flush and upload everything, then close the writers (also after a preemption)."""
        if not self.enabled:
            return
        if self._upload is not None:
            self._upload.join(timeout=60)
        self.upload()
        if self.tensorboard is not None:
            self._guard("tensorboard", self.tensorboard.close)
        if self.wandb is not None:
            self._guard("wandb", self.wandb.finish)
        self.tensorboard = self.wandb = None


# ---------------------------------------------------------------------- reading


@dataclass
class History:
    """A run's records, attempt by attempt, oldest first."""

    attempts: list[list[dict]] = field(default_factory=list)

    @property
    def records(self) -> list[dict]:
        return [r for attempt in self.attempts for r in attempt]

    def kept(self) -> tuple[list[dict], list[dict], list[float]]:
        """(training records, eval records, resume points in tokens): the work no later attempt
        redid, as the final model saw it. An attempt that resumed from step N redid the steps
        after N, so the attempt before it counts up to N only."""
        train: list[dict] = []
        evals: list[dict] = []
        resumes: list[float] = []
        attempts = [a for a in self.attempts if a]
        for i, records in enumerate(attempts):
            later = attempts[i + 1] if i + 1 < len(attempts) else None
            resumed = _resumed_from(later) if later else None
            for r in records:
                if resumed is not None and r["step"] > resumed:
                    continue
                if "loss" in r:
                    train.append(r)
                if r.get("eval_loss") is not None:
                    evals.append(r)
            if later:
                first = later[0]
                resumes.append(float(first.get("tokens_seen", 0)) - float(first.get("tokens", 0)))
        return train, evals, resumes

    @property
    def preemptions(self) -> int:
        """Attempts that resumed a run some earlier attempt had begun."""
        return max(0, len([a for a in self.attempts if a]) - 1)


def _resumed_from(records: list[dict]) -> int:
    first = records[0]
    return int(first["step"]) - (1 if "loss" in first else 0)


def parse_lines(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break  # the line being written when the machine died
    return out


def history(url: str) -> History:
    """Every attempt's records under a run's checkpoint URL (bucket or local directory)."""
    from checkpoints_sync.factory import open_store

    store = open_store(url)
    keys = sorted(o.key for o in store.list(METRICS_PREFIX) if o.key.endswith(".jsonl"))
    attempts = []
    with tempfile.TemporaryDirectory() as tmp:
        for key in keys:
            local = Path(tmp) / "m.jsonl"
            store.get_file(key, local)
            attempts.append(parse_lines(local.read_text()))
    return History(attempts)
