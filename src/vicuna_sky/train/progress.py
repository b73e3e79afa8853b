"""Rank 0's view of training: a progress bar and one log line per step with loss, lr,
tokens/s and, on GPUs with a known peak, MFU; each step's record goes to the metrics log."""

from __future__ import annotations

import logging
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

from vicuna_sky.train.metrics import MetricsLog

log = logging.getLogger("vicuna_sky.train")


class Progress:
    def __init__(
        self, total: int, done: int, enabled: bool, peak_flops: float, metrics: MetricsLog
    ) -> None:
        self.enabled, self.peak = enabled, peak_flops
        self.metrics = metrics
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
        tokens_seen: int,
        **extra: float,
    ) -> None:
        """`extra`: more fields for this step's metrics line (checkpoint_stall_seconds,
        eval_loss, ...). `tokens_seen`: tokens trained on up to and including this step."""
        if not self.enabled:
            return
        rate = tokens / seconds if seconds > 0 else 0.0
        mfu = rate * flops_per_token / self.peak if self.peak else None
        line = f"loss {loss:.4f} lr {lr:.2e} tok/s {rate:,.0f}"
        line += f" mfu {100 * mfu:.1f}%" if mfu is not None else ""
        if "checkpoint_stall_seconds" in extra:
            line += f" checkpoint stall {extra['checkpoint_stall_seconds']:.2f}s"
        if extra.get("eval_loss") is not None:
            line += f" eval loss {extra['eval_loss']:.4f}"
        self.metrics.write(
            {
                "step": step,
                "time": time.time(),
                "loss": loss,
                "lr": lr,
                "tokens_per_second": rate,
                "seconds": seconds,
                "mfu": mfu,
                "peak_memory_mb": peak_mb,
                "tokens": tokens,
                "tokens_seen": tokens_seen,
                "total_steps": self.total,
                **extra,
            }
        )
        log.info("step %d/%d %s", step, self.total, line)
        if self.bar:
            self.bar.update(self.task, completed=step, info=line)

    def evaluated(self, step: int, loss: float, tokens: int, tokens_seen: int) -> None:
        """An eval with no training step of its own to ride on: the base model's before the
        first step, or the final one of a run resumed at its last step."""
        if not self.enabled:
            return
        log.info("step %d/%d eval loss %.4f (%d tokens)", step, self.total, loss, tokens)
        self.metrics.write(
            {
                "step": step,
                "time": time.time(),
                "eval_loss": loss,
                "eval_tokens": tokens,
                "tokens_seen": tokens_seen,
                "total_steps": self.total,
            }
        )

    def close(self) -> None:
        if self.bar:
            self.bar.stop()
