"""The hop's HTTP client (serve/hop_client.py) against real servers on loopback that answer as a
worker, a broken worker or no worker would: what it reads, which connections it keeps, and
what it refuses."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ssl
from collections.abc import Callable

import pytest

from vicuna_sky.serve import hop_client
from vicuna_sky.serve.hop_client import HopClient, HopError
from vicuna_sky.serve.tls import fingerprint, make_certificate, server_files

Reply = Callable[[bytes], bytes]
"""The bytes a test server writes for one request (given its body)."""


def ok(body: bytes, *, close: bool = False) -> bytes:
    connection = b"Connection: close\r\n" if close else b""
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        + connection
        + b"Content-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


class Server:
    """An HTTP/1.1 server on loopback: each request is answered by `reply`, and the server
    counts its connections and what it was sent."""

    def __init__(self, reply: Reply, *, tls: ssl.SSLContext | None = None) -> None:
        self.reply, self.tls = reply, tls
        self.connections = 0
        self.requests: list[bytes] = []
        self.closed = asyncio.Event()

    async def __aenter__(self) -> Server:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0, ssl=self.tls)
        port = self.server.sockets[0].getsockname()[1]
        self.address = f"{'https' if self.tls else 'http'}://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *_: object) -> None:
        self.server.close()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                body = await reader.readexactly(length)
                self.requests.append(head + body)
                reply = self.reply(body)
                if not reply:  # hang up without a word
                    break
                writer.write(reply)
                await writer.drain()
                if b"Connection: close" in reply or not reply.startswith(b"HTTP/1.1"):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.closed.set()
            writer.close()


async def three_echoed(server: Server) -> None:
    """Three requests, each answered with its own body."""
    client = HopClient("")
    for n in range(3):
        async with await client.post(server.address, "/x", b"%d" % n, whole=True) as answer:
            assert await answer.read() == b"%d" % n


def worker_tls() -> tuple[str, ssl.SSLContext]:
    """A worker's certificate (PEM, with its key) and the server context that shows it."""
    pem = make_certificate("worker")
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(*server_files(pem))
    return pem, tls


def run(test: Callable) -> None:
    asyncio.run(test())


def test_an_answer_is_read_whole_and_its_connection_kept():
    async def test() -> None:
        async with Server(lambda body: ok(b'{"echo": ' + body + b"}")) as server:
            client = HopClient("s3cret")
            for n in range(3):
                answer = await client.post(server.address, "/generate", b'{"n": %d}' % n)
                async with answer:
                    assert answer.status == 200
                    assert await answer.read() == b'{"echo": {"n": %d}}' % n
            assert server.connections == 1
            first = server.requests[0]
            assert first.startswith(b"POST /generate HTTP/1.1\r\n")
            assert b"\r\nAuthorization: Bearer s3cret\r\n" in first
            assert b"\r\nContent-Type: application/json\r\n" in first
            client.close()

    run(test)


def test_a_stream_is_read_line_by_line():
    def chunked(_body: bytes) -> bytes:
        chunks = [b'{"text": "a"}\n{"te', b'xt": "b"}\n', b'{"finish_reason": "stop"}']
        framed = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks)
        return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + framed + b"0\r\n\r\n"

    async def test() -> None:
        async with Server(chunked) as server:
            client = HopClient("")
            async with await client.post(server.address, "/generate", b"{}") as answer:
                lines = [await answer.readline() for _ in range(4)]
            assert lines == [
                b'{"text": "a"}\n',
                b'{"text": "b"}\n',
                b'{"finish_reason": "stop"}',
                b"",
            ]
            assert b"Authorization" not in server.requests[0]  # no secret, no header
            async with await client.post(server.address, "/generate", b"{}") as answer:
                await answer.read()
            assert server.connections == 1  # read to its end: kept

    run(test)


def test_a_body_ended_by_the_close_is_whole():
    """An HTTP/1.0 answer without a length: its body is what came before the close."""

    async def test() -> None:
        async with Server(lambda _: b"HTTP/1.0 200 OK\r\n\r\n" + b'{"text": "old"}') as server:
            client = HopClient("")
            async with await client.post(server.address, "/x", b"{}", whole=True) as answer:
                assert await answer.read() == b'{"text": "old"}'
            async with await client.post(server.address, "/x", b"{}", whole=True) as answer:
                assert answer.status == 200
            assert server.connections == 2  # not kept: it was closed

    run(test)


def test_a_forgotten_worker_keeps_nothing():
    async def test() -> None:
        async with Server(ok) as a, Server(ok) as b, Server(ok) as c:
            client = HopClient("")
            low, middle, high = sorted((a, b, c), key=lambda server: server.address)
            for server in (low, middle, high):
                async with await client.post(server.address, "/x", b"{}", whole=True):
                    pass
            # The address as the registry spells it: equal, not the same string.
            client.forget(middle.address[:7] + middle.address[7:])
            await asyncio.wait_for(middle.closed.wait(), 5)  # its kept connection is closed
            kept = sorted(key[0] for key in client._idle)
            assert kept == [low.address, high.address]  # the others' are kept
            assert not low.closed.is_set() and not high.closed.is_set()
            client.forget(low.address)
            client.forget(high.address)
            assert client._idle == {} and client._heads == {}

    run(test)


def test_a_connection_the_worker_closes_is_not_reused():
    async def test() -> None:
        async with Server(lambda body: ok(body, close=True)) as server:
            await three_echoed(server)
            assert server.connections == 3

    run(test)


def test_a_kept_connection_closed_by_the_worker_as_the_request_goes_is_retried_once():
    """The worker closes idle connections (uvicorn's keep-alive timeout): a request sent on one
    it has just closed goes again on a new connection, and the caller sees nothing of it."""
    answered = 0

    def first_then_hang_up(body: bytes) -> bytes:
        nonlocal answered
        answered += 1
        # Every second request on a connection: the server hangs up without answering, as
        # one closing an idle connection does while the request is on its way.
        return ok(body) if answered % 2 else b""

    async def test() -> None:
        async with Server(first_then_hang_up) as server:
            await three_echoed(server)
            assert server.connections == 3

    run(test)


def test_a_new_connection_closed_before_an_answer_is_a_failure():
    async def test() -> None:
        async with Server(lambda _: b"") as server:
            client = HopClient("")
            with pytest.raises(HopError, match="closed the connection"):
                await client.post(server.address, "/x", b"{}")
            assert server.connections == 1  # not retried: nothing was kept

    run(test)


def test_an_idle_connection_past_its_time_is_not_reused(monkeypatch):
    monkeypatch.setattr(hop_client, "IDLE_SECONDS", 0.05)

    async def test() -> None:
        async with Server(ok) as server:
            client = HopClient("")
            for _ in range(2):
                async with await client.post(server.address, "/x", b"{}", whole=True):
                    pass
                await asyncio.sleep(0.1)
            assert server.connections == 2

    run(test)


def test_an_answer_left_unread_closes_its_connection():
    """A caller that stops reading (its client went away) hangs up: the worker sees the
    disconnect and stops the generation."""

    def endless(_body: bytes) -> bytes:
        return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"

    async def hang_up() -> None:
        async with Server(endless) as server:
            client = HopClient("")
            answer = await client.post(server.address, "/x", b"{}")
            reading = asyncio.ensure_future(answer.readline())
            await asyncio.sleep(0.05)
            assert not reading.done()  # no newline yet
            reading.cancel()
            answer.release()
            await asyncio.wait_for(server.closed.wait(), 5)

    run(hang_up)


def test_an_answer_over_the_limit_is_refused(monkeypatch):
    monkeypatch.setattr(hop_client, "MAX_ANSWER_BYTES", 100)

    async def test() -> None:
        async with Server(lambda _: ok(b"x" * 101)) as server:
            client = HopClient("")
            with pytest.raises(HopError, match="over 100 bytes"):
                await client.post(server.address, "/x", b"{}", whole=True)
        async with Server(lambda _: ok(b"x" * 100)) as server:
            answer = await client.post(server.address, "/x", b"{}", whole=True)
            assert len(await answer.read()) == 100

    run(test)


def test_what_is_not_http_is_a_failure():
    async def test() -> None:
        async with Server(lambda _: b"SSH-2.0-OpenSSH_9.2\r\n\r\n") as server:
            with pytest.raises(HopError, match="malformed"):
                await HopClient("").post(server.address, "/x", b"{}")

    run(test)


def test_a_redirect_is_an_answer_not_followed():
    async def test() -> None:
        moved = b"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://127.0.0.1:1/x\r\n"
        async with Server(lambda _: moved + b"Content-Length: 0\r\n\r\n") as server:
            async with await HopClient("").post(server.address, "/x", b"{}", whole=True) as a:
                assert a.status == 307
            assert len(server.requests) == 1

    run(test)


def test_nothing_listening_is_a_failure():
    async def test() -> None:
        async with Server(ok) as server:
            address = server.address
        with pytest.raises(HopError, match="cannot reach the worker"):
            await HopClient("").post(address, "/x", b"{}")

    run(test)


def test_the_workers_certificate_is_pinned(tmp_path):
    """Over https the certificate's SHA-256 decides, not a CA: the registered one is accepted,
    another is refused before the request (and the fleet secret in it) is sent."""
    pem, tls = worker_tls()

    async def test() -> None:
        async with Server(ok, tls=tls) as server:
            client = HopClient("s3cret")
            async with await client.post(
                server.address, "/x", b"{}", fingerprint(pem), whole=True
            ) as answer:
                assert await answer.read() == b"{}"
            other = hashlib.sha256(b"another certificate").hexdigest()
            with pytest.raises(HopError, match="certificate other than it registered"):
                await HopClient("s3cret").post(server.address, "/x", b"{}", other)
            assert len(server.requests) == 1
            with pytest.raises(HopError, match="cannot reach"):  # no pin: the CAs refuse it
                await HopClient("s3cret").post(server.address, "/x", b"{}")
            assert len(server.requests) == 1

    run(test)


def test_the_limit_counts_the_headers_too(monkeypatch):
    """A header line has no length of its own: a worker sending one without end is cut at the
    answer's limit, not read to its end (llhttp would hold all of it)."""
    monkeypatch.setattr(hop_client, "MAX_ANSWER_BYTES", 4096)
    # Larger than one read: the headers arrive in pieces, and are refused before their end.
    huge = b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * 2**21 + b"\r\nContent-Length: 2\r\n\r\n{}"

    async def test() -> None:
        async with Server(lambda _: huge) as server:
            with pytest.raises(HopError, match="over 4096 bytes"):
                await HopClient("").post(server.address, "/x", b"{}", whole=True)

        # A header without end: refused while it comes, not once it has ended (it never does).
        async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nX-Pad: ")
            with contextlib.suppress(ConnectionError):
                while True:
                    writer.write(b"a" * 65536)
                    await writer.drain()

        server = await asyncio.start_server(endless, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(HopError, match="over 4096 bytes"):
            ask = HopClient("").post(f"http://127.0.0.1:{port}", "/x", b"{}", whole=True)
            await asyncio.wait_for(ask, 10)
        server.close()
        small = b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * 2048 + b"\r\nContent-Length: 2\r\n\r\n{}"
        async with Server(lambda _: small) as server:
            answer = await HopClient("").post(server.address, "/x", b"{}", whole=True)
            assert await answer.read() == b"{}"

        # Headers and the start of a body in one read, the rest later: the body is counted
        # once, as a body (4,000 bytes, under the limit with its headers read apart). And
        # headers under the limit that come in two reads are no answer over it.
        head = b"HTTP/1.1 200 OK\r\nContent-Length: 4000\r\n\r\n"
        padded = b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * 3000 + b"\r\nContent-Length: 2\r\n\r\n"
        for pieces, body in (
            ([head + b"x" * 2000, b"x" * 2000], b"x" * 4000),
            ([padded[:1500], padded[1500:] + b"{}"], b"{}"),
        ):

            async def in_pieces(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                await reader.readuntil(b"\r\n\r\n")
                for piece in pieces:  # noqa: B023 (used before the loop moves on)
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(0.2)
                await reader.read()

            server = await asyncio.start_server(in_pieces, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            ask = HopClient("").post(f"http://127.0.0.1:{port}", "/x", b"{}", whole=True)
            async with await ask as answer:
                assert await answer.read() == body
            server.close()

    run(test)


def test_kept_connections_belong_to_the_certificate_as_well_as_the_address(tmp_path):
    """A worker registered again at the same address with another certificate is reached on a
    new connection, checked against the new pin: never on one made under the old one."""
    pem, tls = worker_tls()

    async def test() -> None:
        async with Server(ok, tls=tls) as server:
            client = HopClient("s3cret")
            async with await client.post(
                server.address, "/x", b"{}", fingerprint(pem), whole=True
            ) as answer:
                await answer.read()
            assert server.connections == 1
            other = hashlib.sha256(b"the new owner's certificate").hexdigest()
            with pytest.raises(HopError, match="certificate other than it registered"):
                await client.post(server.address, "/x", b"{}", other, whole=True)
            assert server.connections == 2 and len(server.requests) == 1
            async with await client.post(  # the old pin still has its kept connection
                server.address, "/x", b"{}", fingerprint(pem), whole=True
            ) as answer:
                await answer.read()
            assert server.connections == 2 and len(server.requests) == 2

    run(test)


def test_a_worker_that_answers_in_part_then_dies_is_not_sent_the_request_again():
    """Once a worker has begun its status line it has the request: a kept connection that
    closes after those first bytes is a failure, never a second send on a new connection (the
    generation would run twice, billed twice)."""
    replies = iter([ok(b"1"), b"HTTP/1."])  # the second: a status line cut short, then EOF

    async def test() -> None:
        async with Server(lambda body: next(replies, ok(body))) as server:
            client = HopClient("")
            async with await client.post(server.address, "/x", b"1", whole=True) as answer:
                assert await answer.read() == b"1"
            with pytest.raises(HopError):
                async with await client.post(server.address, "/x", b"2", whole=True) as a:
                    await a.read()
            assert [r[-1:] for r in server.requests] == [b"1", b"2"]  # sent once
            assert server.connections == 1

    run(test)


def test_a_large_answer_is_a_whole_answer_not_a_broken_worker():
    """The answer cap is 256 MiB (embeddings of a large batch run to tens of MB): answers of
    300 KiB and 3 MiB pass whole with the default limit."""

    async def test() -> None:
        for size in (300 * 1024, 3 * 2**20):
            async with Server(lambda _, n=size: ok(b"e" * n)) as server:
                answer = await HopClient("").post(server.address, "/x", b"{}", whole=True)
                assert len(await answer.read()) == size

    run(test)


def test_a_pinned_worker_and_a_worker_without_a_pin_never_share_certificate_checks():
    """One controller talks to pinned workers and to https workers without a registered
    fingerprint. After a pinned one, an unpinned self-signed worker is still checked against
    the CAs (refused: a man in the middle would get the fleet secret); after an unpinned one,
    a pinned worker is still reached."""
    pem, tls = worker_tls()

    async def test() -> None:
        async with Server(ok, tls=tls) as server:
            client = HopClient("s3cret")
            async with await client.post(
                server.address, "/x", b"{}", fingerprint(pem), whole=True
            ) as answer:
                assert await answer.read() == b"{}"
            with pytest.raises(HopError, match="cannot reach"):
                await client.post(server.address, "/y", b"{}")
            assert len(server.requests) == 1  # the unpinned request never left
            other = HopClient("s3cret")
            with pytest.raises(HopError, match="cannot reach"):
                await other.post(server.address, "/y", b"{}")
            async with await other.post(
                server.address, "/x", b"{}", fingerprint(pem), whole=True
            ) as answer:
                assert await answer.read() == b"{}"

    run(test)
