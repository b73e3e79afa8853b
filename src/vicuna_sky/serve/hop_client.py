"""The controller's HTTP/1.1 client for the hop to its workers: keep-alive connections per
worker, the worker's certificate pinned, a request in one write, the answer parsed by llhttp
(httptools) and read whole or line by line.

Not aiohttp: on the one hop every prompt takes, its client cost 250 us of CPU per request and
twice the latency of this one (measured side by side, serial, against the echo worker). The
hop needs little of it: POST with a JSON body, a status, a body. Redirects are never followed:
a worker answers itself, or is broken.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import time
from urllib.parse import urlsplit

import httptools

from vicuna_sky.serve.tls import parse_fingerprint

IDLE_SECONDS = 3.0
"""A kept connection idle longer is not reused: the worker closes its idle ones after 5 s
(http_server.server_config), and a request must not race that close."""
MAX_ANSWER_BYTES = 256 * 2**20
"""A worker's answer larger than this, headers included, is a broken worker (embeddings of a
large batch are the largest answers: tens of MB)."""
CONNECT_TIMEOUT = 2.0


class HopError(Exception):
    """The worker could not be reached, or broke the exchange (the message says how)."""


class _ClosedBeforeAnswer(HopError):
    """The connection closed before a byte of the answer: on a kept connection, the worker had
    closed it as idle, and the request may go again on a new one."""


class Answer:
    """A worker's answer: its status once the headers are in, then its body."""

    def __init__(self, connection: _Connection) -> None:
        self.status = 0
        self.head: asyncio.Future[None] = connection.loop.create_future()
        self._connection = connection
        self._buffer = bytearray()
        self._size = 0
        self._complete = False
        self._error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None

    async def read(self) -> bytes:
        """The whole body (not to be mixed with `readline`)."""
        while not self._complete:
            await self._more()
        return bytes(self._buffer)

    async def readline(self) -> bytes:
        """The next line with its newline; the rest without one at the end, then b""."""
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[: end + 1])
                del self._buffer[: end + 1]
                return line
            if self._complete:
                rest = bytes(self._buffer)
                self._buffer.clear()
                return rest
            await self._more()

    def release(self) -> None:
        """Done with the answer: its connection is kept for the next request when the answer
        was read to its end, closed otherwise (a worker stops a generation whose reader
        hangs up)."""
        self._connection.finished(self._complete and self._error is None)

    async def __aenter__(self) -> Answer:
        return self

    async def __aexit__(self, *_: object) -> None:
        self.release()

    # -- from the connection ------------------------------------------------------------------
    async def _more(self) -> None:
        if self._error is not None:
            raise self._error
        self._waiter = self._connection.loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _headers(self, status: int) -> None:
        self.status = status
        if not self.head.done():
            self.head.set_result(None)

    def _body(self, data: bytes) -> None:
        if self._error is not None:
            return
        self._size += len(data)
        if self._size > MAX_ANSWER_BYTES:
            self._broken(HopError(f"the answer is over {MAX_ANSWER_BYTES} bytes"))
            self._connection.close()
            return
        self._buffer += data
        self._wake()

    def _end(self) -> None:
        if self._error is None:
            self._complete = True
            self._wake()

    def _broken(self, error: Exception) -> None:
        if self._complete or self._error is not None:
            return
        self._error = error
        if not self.head.done():
            self.head.set_exception(error)
            self.head.exception()  # retrieved: no "never retrieved" warning if nobody waits
        self._wake()


class _Connection(asyncio.Protocol):
    """One keep-alive connection to a worker, one request at a time."""

    def __init__(self, pool: list[_Connection], loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.loop = loop
        """Its event loop, kept: on Python 3.11 each look-up is a getpid() system call."""
        self.transport: asyncio.Transport | None = None
        self.answer: Answer | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.received = False
        self.framed = False
        """The answer says where its body ends (a length, or chunks); else the close ends it."""
        self.keep_alive = True
        self.idle_since = 0.0

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.answer is None:  # nothing was asked: not a worker speaking HTTP
            self.close()
            return
        self.received = True
        answer = self.answer
        in_head = not answer.head.done()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            if self.answer is not None:
                self.answer._broken(HopError(f"a malformed HTTP answer: {e}"))
            self.close()
            return
        if in_head and not answer.head.done():
            # All of it was headers, which have no length of their own and which llhttp holds
            # until they end: they count against the answer's limit as its body does.
            answer._size += len(data)
            if answer._size > MAX_ANSWER_BYTES:
                answer._broken(HopError(f"the answer is over {MAX_ANSWER_BYTES} bytes"))
                self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.keep_alive = False
        if self in self.pool:
            self.pool.remove(self)
        answer = self.answer
        if answer is None:
            return
        if not self.received:
            answer._broken(_ClosedBeforeAnswer("the worker closed the connection"))
        elif answer.head.done() and not self.framed:
            answer._end()  # HTTP/1.0 style: the body is what came before the close
        else:
            answer._broken(HopError("the worker closed the connection mid-answer"))

    # httptools callbacks
    def on_header(self, name: bytes, _value: bytes) -> None:
        if name.lower() in (b"content-length", b"transfer-encoding"):
            self.framed = True

    def on_headers_complete(self) -> None:
        if self.answer is not None:
            self.answer._headers(self.parser.get_status_code())

    def on_body(self, body: bytes) -> None:
        if self.answer is not None:
            self.answer._body(body)

    def on_message_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()
        if self.answer is not None:
            self.answer._end()

    # the pool's
    def send(self, request: bytes) -> Answer:
        assert self.transport is not None
        self.answer, self.received, self.framed = Answer(self), False, False
        self.transport.write(request)
        return self.answer

    def finished(self, reusable: bool) -> None:
        self.answer = None
        if reusable and self.keep_alive and not self.closed:
            self.idle_since = time.monotonic()
            self.pool.append(self)
        else:
            self.close()

    @property
    def closed(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def close(self) -> None:
        self.keep_alive = False
        if self.transport is not None:
            self.transport.close()


class HopClient:
    """POSTs to workers, `Authorization: Bearer <secret>` on each."""

    def __init__(self, secret: str, connect_timeout: float = CONNECT_TIMEOUT) -> None:
        self.secret, self.connect_timeout = secret, connect_timeout
        self._idle: dict[tuple[str, str], list[_Connection]] = {}
        self._heads: dict[tuple[str, str], bytes] = {}
        self._tls: dict[str, ssl.SSLContext] = {}

    async def post(
        self, address: str, path: str, body: bytes, fingerprint: str = "", whole: bool = False
    ) -> Answer:
        """POST `body` (JSON) to `address` + `path`; returns once the answer's headers are in,
        or its whole body with `whole`. `fingerprint`: the SHA-256 the worker's certificate
        must have (https)."""
        head = self._heads.get((address, path))
        if head is None:
            head = self._heads[(address, path)] = self._head(address, path)
        request = head + str(len(body)).encode() + b"\r\n\r\n" + body
        # Kept connections are the certificate's as well as the address's: a worker registered
        # again at an address with another certificate is reached on new ones.
        pool = self._idle.setdefault((address, fingerprint), [])
        while True:
            connection = self._kept(pool)
            reused = connection is not None
            if connection is None:
                connection = await self._connect(address, fingerprint, pool)
            answer = connection.send(request)
            try:
                await (answer.read() if whole else answer.head)
            except _ClosedBeforeAnswer:
                if reused:  # closed as idle by the worker as the request went: once more
                    continue
                raise
            except BaseException:
                connection.close()
                raise
            return answer

    def forget(self, address: str) -> None:
        """A worker gone for good: its kept connections are closed, and nothing of it stays."""
        for key in [k for k in self._idle if k[0] == address]:
            for connection in self._idle.pop(key):
                connection.close()
        for key in [k for k in self._heads if k[0] == address]:
            del self._heads[key]

    def close(self) -> None:
        for pool in self._idle.values():
            for connection in list(pool):
                connection.close()
        self._idle.clear()

    def _kept(self, pool: list[_Connection]) -> _Connection | None:
        now = time.monotonic()
        while pool:
            connection = pool.pop()
            if not connection.closed and now - connection.idle_since < IDLE_SECONDS:
                return connection
            connection.close()
        return None

    async def _connect(self, address: str, fingerprint: str, pool: list) -> _Connection:
        url = urlsplit(address)
        tls = self._context(fingerprint) if url.scheme == "https" else None
        loop = asyncio.get_running_loop()
        try:
            transport, connection = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Connection(pool, loop), url.hostname, url.port, ssl=tls
                ),
                self.connect_timeout,
            )
        except (OSError, asyncio.TimeoutError) as e:
            raise HopError(f"cannot reach the worker at {address}: {e or 'timed out'}") from None
        if tls is not None and fingerprint:
            der = transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
            if hashlib.sha256(der or b"").digest() != parse_fingerprint(fingerprint):
                transport.close()
                raise HopError(
                    f"the worker at {address} shows a certificate other than it registered"
                )
        return connection

    def _context(self, fingerprint: str) -> ssl.SSLContext:
        """Pinned (the fingerprint, checked above, instead of a CA): no chain, no host name. A
        worker without a registered fingerprint is checked against the system's CAs."""
        key = "pinned" if fingerprint else "ca"
        context = self._tls.get(key)
        if context is None:
            context = ssl.create_default_context()
            if fingerprint:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            self._tls[key] = context
        return context

    def _head(self, address: str, path: str) -> bytes:
        url = urlsplit(address)
        lines = [f"POST {path} HTTP/1.1", f"Host: {url.netloc}", "Content-Type: application/json"]
        if self.secret:
            lines.append(f"Authorization: Bearer {self.secret}")
        return ("\r\n".join(lines) + "\r\nContent-Length: ").encode()
