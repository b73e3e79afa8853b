"""Processes on this machine (procs.py), with real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from vicuna_sky.procs import signal_name, signal_tree, started


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
