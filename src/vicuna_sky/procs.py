"""Processes on this machine: signalling a process with everything it started, and the GPUs a
local run may use (loopback ports: vicuna_sky.ports)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess


def signal_tree(pid: int, sig: signal.Signals) -> None:
    """Signal a process, its group and every descendant. A vanished VM takes all of its
    processes; torchrun starts its workers in sessions of their own, so signalling the process
    group alone would leave them running."""
    import psutil

    try:
        family = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    for child in family:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            child.send_signal(sig)


def signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def started(pid: int) -> float:
    """When process `pid` started (seconds since the epoch): with its pid, it names one process,
    where a pid alone may since have been given to another."""
    import psutil

    return psutil.Process(pid).create_time()


def count_local_gpus() -> int:
    if not shutil.which("nvidia-smi"):
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))
