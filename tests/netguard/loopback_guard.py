"""Fail any connection or name lookup that would leave 127.0.0.1, in the test process and in
every Python process it starts (through `sitecustomize.py` beside this file on PYTHONPATH).

An audit hook sees `socket.connect` and the resolver calls before the C library makes them. A
non-loopback one is refused with an OSError (so a library takes it as "no network", and nothing
is sent) and written to the file named by VICUNA_SKY_NET_GUARD_LOG; tests/conftest.py fails the
test during which the file grew. Only Python's calls are seen: Chromium and C++ code (gloo,
TCPStore) are kept on loopback by their own flags.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
import traceback

LOG_ENV = "VICUNA_SKY_NET_GUARD_LOG"
LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", ""}
OWN_NETWORK = ipaddress.ip_network("198.18.0.0/15")
"""RFC 2544's benchmark range: tests put it on bridges of their own between network namespaces
they made (tests/serve/test_across_machines.py), with no route off them."""
_installed = False


def is_loopback(host: object) -> bool:
    if host is None:
        return True  # getaddrinfo(None, port): the wildcard/loopback address, no lookup
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    if not isinstance(host, str):
        return False
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        address = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified or address in OWN_NETWORK


def _record(what: str) -> None:
    path = os.environ.get(LOG_ENV)
    stack = "".join(traceback.format_stack(limit=12)[:-2])
    line = f"pid {os.getpid()} {' '.join(sys.argv[:3])}: {what}\n{stack}\n"
    if path:
        # The audit hook must not recurse into itself through open(): os.open is not audited
        # as "open" in a way that reaches this branch again (it is a path, not a socket).
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode(errors="replace"))
        finally:
            os.close(fd)


def _hook(event: str, args: tuple) -> None:
    if event == "socket.connect" or event == "socket.sendto":
        sock, address = args[0], args[1]
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not is_loopback(address[0]):
            _record(f"{event} to {address!r}")
            raise ConnectionRefusedError(f"tests stay on loopback: connect to {address!r}")
    elif event in ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr"):
        host = args[0]
        if not is_loopback(host):
            # This machine's own name (torchrun's socket.getfqdn()) is refused too, so the
            # resolver is never asked for its PTR record, but it is no test's fault.
            if host != socket.gethostname():
                _record(f"{event}({host!r})")
            raise socket.gaierror(socket.EAI_NONAME, f"tests stay on loopback: {host!r}")


def install() -> None:
    global _installed
    if not _installed:
        sys.addaudithook(_hook)
        _installed = True
