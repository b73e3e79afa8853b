"""Job records shared by the runners: SkyPilot's status vocabulary, attempts, run directories."""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from vicuna_sky.errors import VicunaSkyError
from vicuna_sky.output import write_text
from vicuna_sky.procs import started

RESUMED = re.compile(r"resumed at step (\d+)")


class JobStatus(str, Enum):
    """SkyPilot's managed-job vocabulary, shared by the local and the cloud runner."""

    PENDING = "PENDING"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    RECOVERING = "RECOVERING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    FAILED_SETUP = "FAILED_SETUP"
    CANCELLED = "CANCELLED"

    @property
    def done(self) -> bool:
        return self in (self.SUCCEEDED, self.FAILED, self.FAILED_SETUP, self.CANCELLED)


@dataclass
class Attempt:
    number: int
    workdir: str
    zone: str
    status: str = JobStatus.STARTING.value
    exit_codes: list[int] = field(default_factory=list)
    reason: str = ""
    started_at: float = 0.0
    """Wall clock (epoch seconds) when the attempt's "cluster" came up."""
    ended_at: float = 0.0
    addresses: list[str] = field(default_factory=list)
    """Each node's address when the local cloud ran them as hosts (localcloud/network.py)."""


@dataclass
class LocalJob:
    name: str
    task_id: str
    run_dir: str
    status: str = JobStatus.PENDING.value
    attempts: list[Attempt] = field(default_factory=list)
    recoveries: int = 0
    restarts_on_errors: int = 0
    prices: dict = field(default_factory=dict)
    """Catalog prices the run is costed at (cost.Prices fields); empty when unknown."""
    metrics_url: str = ""
    """A training run's checkpoint URL as this machine reaches it: the trainer keeps its
    metrics there (`vicuna-sky status NAME` reads them)."""
    pid: int = 0
    """The process running the job (the launcher), and when it started: together they tell a
    job in progress from one whose launcher died without writing a final status."""
    pid_started: float = 0.0

    def save(self) -> None:
        # Atomic: readers never see half a status file, and a killed writer's temporary is
        # removed by the next save.
        write_text(Path(self.run_dir) / "job.json", json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, run_dir: Path) -> LocalJob:
        raw = json.loads((run_dir / "job.json").read_text())
        raw["attempts"] = [Attempt(**a) for a in raw.get("attempts", [])]
        return cls(**raw)


def list_jobs(runs_dir: Path) -> list[LocalJob]:
    jobs = []
    for status in sorted(Path(runs_dir).glob("*/job.json")):
        # Not a status this code wrote (a directory, another format): not a job, not a crash.
        with contextlib.suppress(ValueError, TypeError, KeyError, OSError):
            jobs.append(LocalJob.load(status.parent))
    return jobs


def find_job(runs_dir: Path, name: str, run_id: str | None = None) -> LocalJob:
    """The newest local job whose run directory or task name matches `name`; with `run_id`,
    the run of that job whose directory is named `run_id`."""
    jobs = [j for j in list_jobs(runs_dir) if name in (j.name, Path(j.run_dir).name)]
    if not jobs:
        raise VicunaSkyError(f"no local job named '{name}' under {runs_dir}")
    if run_id is None:
        return jobs[-1]
    chosen = [j for j in jobs if Path(j.run_dir).name == run_id]
    if not chosen:
        runs = ", ".join(Path(j.run_dir).name for j in jobs)
        raise VicunaSkyError(f"{name} has no run {run_id!r}; its runs: {runs}")
    return chosen[0]


def in_progress(job: LocalJob) -> bool:
    """Whether the job is still being run: not finished, and its launcher process alive."""
    import psutil

    if JobStatus(job.status).done or not job.pid:
        return False
    try:
        return abs(started(job.pid) - job.pid_started) < 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def running(runs_dir: Path, name: str) -> list[LocalJob]:
    """The local jobs named `name` in progress."""
    return [j for j in list_jobs(runs_dir) if j.name == name and in_progress(j)]


def latest_logs(job: LocalJob) -> list[Path]:
    if not job.attempts:
        return []
    node_dir = Path(job.attempts[-1].workdir).parent
    return sorted(node_dir.glob("*.log"))


def describe(job: LocalJob) -> dict[str, Any]:
    last = job.attempts[-1] if job.attempts else None
    return {
        "name": job.name,
        "status": job.status,
        "attempts": len(job.attempts),
        "recoveries": job.recoveries,
        "zone": last.zone if last else "-",
        # What `logs NAME --local --run RUN` takes; the directory is under the runs dir.
        "run": Path(job.run_dir).name,
    }


def attempt_metrics(attempt: Attempt) -> list[dict]:
    """The trainer's per-step records (metrics.jsonl) in an attempt's working directory; the
    base model's eval before the first step is no step and is left out."""
    path = Path(attempt.workdir) / "metrics.jsonl"
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break  # the line being written when the machine died
            if "loss" in record or "eval_loss" not in record:  # an eval alone is no step
                out.append(record)
    return out


def attempt_log(attempt: Attempt) -> str:
    """Node rank 0's run log of an attempt."""
    path = Path(attempt.workdir).parent / "run-rank0.log"
    return path.read_text(errors="replace") if path.exists() else ""


def resumed_from(attempt: Attempt) -> int | None:
    """The checkpoint step the attempt's trainer resumed from, per its log."""
    match = RESUMED.search(attempt_log(attempt))
    return int(match.group(1)) if match else None
