"""Processes and ports on this machine: free loopback ports, waiting for a server to listen,
signalling a process with everything it started, and the GPUs a local run may use."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time

from vicuna_sky.errors import VicunaSkyError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise VicunaSkyError(f"local server exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise VicunaSkyError(f"nothing listens on 127.0.0.1:{port}")


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
