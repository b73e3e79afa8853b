"""Loopback ports (vicuna_sky.ports): a free one, and waiting for a server on it."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from vicuna_sky.errors import VicunaSkyError
from vicuna_sky.ports import free_port, wait_for_port


def test_a_free_port_can_be_listened_on_and_is_waited_for():
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, server, timeout=30)
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
    finally:
        server.kill()
        server.wait()


def test_waiting_ends_when_the_server_exits_or_never_listens():
    dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    dead.wait()
    with pytest.raises(VicunaSkyError, match="local server exited with 3"):
        wait_for_port(free_port(), dead)
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        port = free_port()
        with pytest.raises(VicunaSkyError, match=f"nothing listens on 127.0.0.1:{port}"):
            wait_for_port(port, idle, timeout=0.3)
    finally:
        idle.kill()
        idle.wait()
