"""Who may hold a listener's sockets: each connection counted from the moment it is accepted
(before its TLS handshake, before its headers), at most `per_address` from one address, and a
budget that strangers cannot exhaust.

uvicorn counts a connection only once it reaches its HTTP protocol, which on a TLS port is
after the handshake (asyncio gives a handshake 60 s): a socket that never sends a ClientHello
holds a descriptor uncounted. And past `limit_concurrency` it answers every request 503, so
whoever opens enough sockets first keeps everyone else out, the workers' heartbeats included.
Here, instead:

- a connection is admitted at accept, and refused at once past `per_address` from its address;
- TLS is terminated by `TlsAccept` with a handshake deadline, the socket counted meanwhile;
- when the budget is full, a new connection is let in by closing the oldest connection that
  has not yet shown a credential (`vouch`): strangers push out strangers, never a connection
  that carried an API key or the fleet secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import ssl
from collections import Counter
from collections.abc import Callable
from typing import Protocol

SCOPE_KEY = "vicuna_sky.connection"
"""Where a request's ASGI scope holds its connection (for `vouch`)."""


class Closable(Protocol):
    def close_now(self) -> None: ...


class ConnectionBudget:
    """The open connections of one listener, oldest first."""

    def __init__(self, limit: int, per_address: int = 0) -> None:
        self.limit, self.per_address = limit, per_address
        self._open: dict[Closable, tuple[str, bool]] = {}
        """Connection -> (address, vouched for), in the order they were accepted."""
        self._by_address: Counter[str] = Counter()
        self.refused = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._open)

    def admit(self, connection: Closable, address: str) -> bool:
        """Count `connection` from `address` in, making room if needed; False: close it."""
        if self.per_address and self._by_address[address] >= self.per_address:
            self.refused += 1
            return False
        if len(self._open) >= self.limit:
            stranger = next((c for c, (_, vouched) in self._open.items() if not vouched), None)
            if stranger is None:  # every connection carried a credential
                self.refused += 1
                return False
            self.evicted += 1
            self.release(stranger)
            stranger.close_now()
        self._open[connection] = (address, False)
        self._by_address[address] += 1
        return True

    def vouch(self, connection: Closable) -> None:
        """`connection` carried a credential: it is never closed to make room."""
        entry = self._open.get(connection)
        if entry is not None and not entry[1]:
            self._open[connection] = (entry[0], True)

    def replace(self, old: Closable, new: Closable) -> None:
        """`new` carries on `old`'s connection (a TLS handshake done: HTTP from now on)."""
        entry = self._open.pop(old, None)
        if entry is not None:
            self._open[new] = entry

    def release(self, connection: Closable) -> None:
        entry = self._open.pop(connection, None)
        if entry is not None:
            self._by_address[entry[0]] -= 1
            if not self._by_address[entry[0]]:
                del self._by_address[entry[0]]


def peer_host(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else "?"


def vouch(scope: dict) -> None:
    """The request in `scope` showed a valid credential: its connection is kept (see above)."""
    connection = scope.get(SCOPE_KEY)
    if connection is not None:
        connection.vouched()


class TlsAccept(asyncio.Protocol):
    """A TCP connection of a TLS port until its handshake is done, counted meanwhile; then the
    HTTP protocol `make_http()` takes the decrypted connection over; `timeout`: seconds the
    client has to complete its handshake."""

    def __init__(
        self,
        make_http: Callable[[], asyncio.Protocol],
        context: ssl.SSLContext,
        budget: ConnectionBudget,
        loop: asyncio.AbstractEventLoop,
        timeout: float,
    ) -> None:
        self.make_http, self.context, self.budget = make_http, context, budget
        self.loop, self.timeout = loop, timeout
        self.transport: asyncio.Transport | None = None
        self.http: asyncio.Protocol | None = None
        self.handshake: asyncio.Task | None = None
        self.early: list[bytes] = []
        """Decrypted bytes that came before the HTTP protocol took over."""
        self.raw: list[bytes] = []
        """TLS bytes read before start_tls took the connection over (`_hand_over_raw`)."""
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if not self.budget.admit(self, peer_host(transport)):
            transport.abort()  # type: ignore[attr-defined]
            self.closed = True
            return
        transport.pause_reading()  # type: ignore[attr-defined]
        self.handshake = self.loop.create_task(self._handshake())

    async def _handshake(self) -> None:
        assert self.transport is not None
        starting = asyncio.ensure_future(
            self.loop.start_tls(
                self.transport,
                self,
                self.context,
                server_side=True,
                ssl_handshake_timeout=self.timeout,
            )
        )
        # uvloop reads once even when reading is paused in connection_made: a ClientHello may
        # have come here, raw, before start_tls put its TLS engine in place. It is handed to
        # that engine once start_tls has (its first step, next turn) and before anything more
        # is read (start_tls resumes reading in the turn after, and reads come after the
        # turn's callbacks).
        self.loop.call_soon(self.loop.call_soon, self._hand_over_raw)
        try:
            tls = await starting
        except (OSError, ssl.SSLError, ConnectionError, asyncio.TimeoutError, RuntimeError):
            # A failed or late handshake, or a client gone: the socket goes, quietly (a
            # stranger's mistake is not the operator's news).
            self.close_now()
            return
        if self.closed or tls is None:
            return
        http = self.make_http()
        self.http = http
        self.budget.replace(self, http)  # type: ignore[arg-type]
        tls.set_protocol(http)
        http.connection_made(tls)
        for data in self.early:
            http.data_received(data)
        self.early.clear()

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if self.transport.get_protocol() is self:  # raw: start_tls is not in place yet
            self.raw.append(data)
            return
        # Decrypted, between the handshake's end and the HTTP protocol's start.
        self.early.append(data)

    def _hand_over_raw(self) -> None:
        if self.closed or self.transport is None or not self.raw:
            return
        engine = self.transport.get_protocol()
        if engine is self:  # start_tls not in place yet: next turn
            self.loop.call_soon(self._hand_over_raw)
            return
        for data in self.raw:
            view = memoryview(data)
            while view:  # the engine is a BufferedProtocol: it lends the buffer
                buffer = engine.get_buffer(len(view))  # type: ignore[attr-defined]
                n = min(len(buffer), len(view))
                buffer[:n] = view[:n]
                engine.buffer_updated(n)  # type: ignore[attr-defined]
                view = view[n:]
        self.raw.clear()

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.budget.release(self)
        if self.handshake is not None and not self.handshake.done():
            self.handshake.cancel()

    def close_now(self) -> None:
        self.closed = True
        self.budget.release(self)
        if self.handshake is not None and not self.handshake.done():
            self.handshake.cancel()
        if self.transport is not None:
            with contextlib.suppress(Exception):
                self.transport.abort()


def raise_open_files(wanted: int) -> tuple[int, int]:
    """The soft limit on open descriptors raised towards `wanted` (at most the hard limit):
    (before, after). The common default, 1024, is less than one listener's budget."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return soft, resource.getrlimit(resource.RLIMIT_NOFILE)[0]
