"""Processes and ports on this machine (launch/procs.py), with real processes and sockets."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from vicuna_sky.errors import VicunaSkyError
from vicuna_sky.launch.procs import free_port, signal_name, signal_tree, started, wait_for_port


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


def test_a_signal_reaches_grandchildren_in_sessions_of_their_own():
    # The grandchild leaves the group (as torchrun's workers do): killpg alone would miss it.
    code = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],"
        " start_new_session=True)\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    grandchild = int(parent.stdout.readline())
    assert started(grandchild) <= time.time()
    signal_tree(parent.pid, signal.SIGKILL)
    assert parent.wait(timeout=10) == -signal.SIGKILL
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the grandchild outlived the signal")
    signal_tree(parent.pid, signal.SIGKILL)  # a process already gone: nothing to do, no error


def test_signal_names():
    assert signal_name(9) == "SIGKILL" and signal_name(15) == "SIGTERM"
    assert signal_name(200) == "signal 200"
