"""Loopback ports: a free one, and waiting for a server to listen on one. Shared by the
serving harness (serve/local_fleet.py) and the local cloud (launch/), below both."""

from __future__ import annotations

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
