"""The session's network guard (tests/netguard) is on, here and in every process a test starts."""

import os
import socket
import subprocess
import sys

import pytest

PROBE = """
import socket
for what, call in [
    ("resolve", lambda: socket.getaddrinfo("sts.us-east-1.amazonaws.com", 443)),
    ("connect", lambda: socket.socket().connect(("192.0.2.1", 443))),
    ("loopback", lambda: socket.getaddrinfo("localhost", 80)),
]:
    try:
        call()
        print(what, "allowed")
    except OSError as e:
        print(what, "refused:", e)
"""


def test_a_child_process_cannot_leave_loopback(tmp_path):
    log = tmp_path / "guard.log"  # its own log: this test's attempts are meant, not a failure
    env = {**os.environ, "VICUNA_SKY_NET_GUARD_LOG": str(log)}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=60
    ).stdout
    assert "resolve refused: [Errno -2] tests stay on loopback" in out
    assert "connect refused: tests stay on loopback" in out
    assert "loopback allowed" in out
    recorded = log.read_text()
    assert "sts.us-east-1.amazonaws.com" in recorded and "192.0.2.1" in recorded


def test_this_process_cannot_leave_loopback(tmp_path, monkeypatch):
    monkeypatch.setenv("VICUNA_SKY_NET_GUARD_LOG", str(tmp_path / "guard.log"))
    with pytest.raises(socket.gaierror, match="tests stay on loopback"):
        socket.gethostbyname("metadata.google.internal")
    refused = pytest.raises(ConnectionRefusedError, match="tests stay on loopback")
    with refused, socket.socket() as s:
        s.connect(("169.254.169.254", 80))
    assert "169.254.169.254" in (tmp_path / "guard.log").read_text()


def test_only_the_benchmark_range_joins_loopback():
    """198.18.0.0/15 is allowed for bridges the tests make between their own namespaces; its
    neighbours are not."""
    from loopback_guard import is_loopback

    assert is_loopback("198.18.0.10") and is_loopback("198.19.255.1")
    assert not any(is_loopback(a) for a in ("198.17.255.255", "198.20.0.1", "192.0.2.1"))
