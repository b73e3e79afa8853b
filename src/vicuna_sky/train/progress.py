"""Rank 0's view of training: a progress bar and one log line per step with loss, lr,
tokens/s and, on GPUs with a known peak, MFU."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

log = logging.getLogger("vicuna_sky.train")


class Progress:
    def __init__(
        self, total: int, done: int, enabled: bool, peak_flops: float, metrics_path: str
    ) -> None:
        self.enabled, self.peak = enabled, peak_flops
        self.metrics = Path(metrics_path) if metrics_path else None
        self.bar = None
        if enabled and sys.stderr.isatty():
            self.bar = RichProgress(
                TextColumn("step"),
                MofNCompleteColumn(),
                BarColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self.task = self.bar.add_task("train", total=total, completed=done, info="")
            self.bar.start()
        self.total = total

    def update(
        self,
        step: int,
        loss: float,
        tokens: int,
        seconds: float,
        flops_per_token: float,
        lr: float,
        peak_mb: float,
        **extra: float,
    ) -> None:
        """`extra`: more fields for this step's metrics line (checkpoint_stall_seconds, ...)."""
        if not self.enabled:
            return
        rate = tokens / seconds if seconds > 0 else 0.0
        mfu = rate * flops_per_token / self.peak if self.peak else None
        line = f"loss {loss:.4f} lr {lr:.2e} tok/s {rate:,.0f}"
        line += f" mfu {100 * mfu:.1f}%" if mfu is not None else ""
        if "checkpoint_stall_seconds" in extra:
            line += f" checkpoint stall {extra['checkpoint_stall_seconds']:.2f}s"
        if self.metrics:
            record = {
                "step": step,
                "time": time.time(),
                "loss": loss,
                "lr": lr,
                "tokens_per_second": rate,
                "seconds": seconds,
                "mfu": mfu,
                "peak_memory_mb": peak_mb,
                **extra,
            }
            with self.metrics.open("a") as f:
                f.write(json.dumps(record) + "\n")
        log.info("step %d/%d %s", step, self.total, line)
        if self.bar:
            self.bar.update(self.task, completed=step, info=line)

    def close(self) -> None:
        if self.bar:
            self.bar.stop()
