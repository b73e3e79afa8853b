"""The servers' write coalescing (http_server.Coalesced): what uvicorn writes in one turn of the
event loop reaches the socket in one write, in order, and nothing is lost on close."""

from __future__ import annotations

import asyncio

from vicuna_sky.serve.http_server import Coalesced


class Recorded(asyncio.Transport):
    """The socket side: each write as it was made."""

    def __init__(self) -> None:
        super().__init__({"peername": ("127.0.0.1", 1234)})
        self.writes: list[bytes] = []
        self.closing = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        assert not self.closing, "a write after close"
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = self.aborted = True


def test_the_writes_of_one_turn_leave_as_one():
    async def test() -> None:
        socket = Recorded()
        transport = Coalesced(socket, asyncio.get_running_loop())
        transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        transport.write(b"{}")
        assert socket.writes == []  # not before the turn ends
        await asyncio.sleep(0)
        assert socket.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]
        transport.writelines([b"a", b"b"])  # a stream's next piece: a write of its own
        await asyncio.sleep(0)
        transport.write(b"c")
        await asyncio.sleep(0)
        assert socket.writes[1:] == [b"ab", b"c"]
        assert transport.get_extra_info("peername") == ("127.0.0.1", 1234)

    asyncio.run(test())


def test_close_sends_what_is_pending_first_and_abort_drops_it():
    async def test() -> None:
        socket = Recorded()
        transport = Coalesced(socket, asyncio.get_running_loop())
        transport.write(b"last words")
        transport.close()
        assert socket.writes == [b"last words"] and socket.closing
        await asyncio.sleep(0)  # the scheduled flush finds nothing left
        assert socket.writes == [b"last words"]

        socket = Recorded()
        transport = Coalesced(socket, asyncio.get_running_loop())
        transport.write(b"never sent")
        transport.abort()
        await asyncio.sleep(0)
        assert socket.writes == [] and socket.aborted

        socket = Recorded()
        transport = Coalesced(socket, asyncio.get_running_loop())
        transport.write(b"to a closed peer")
        socket.closing = True  # the connection was lost in the meantime
        await asyncio.sleep(0)
        assert socket.writes == []

    asyncio.run(test())


def test_an_answer_leaves_as_its_last_piece_is_sent():
    """Not a loop turn later, behind uvicorn's keep-alive and our header timers: the caller
    waiting for it is the latency the controller adds."""
    from uvicorn.server import ServerState

    from vicuna_sky.serve.http_server import GuardedHttpTools, server_config

    seen: list[list[bytes]] = []

    async def app(scope, receive, send) -> None:
        await receive()
        headers = [(b"content-length", b"5")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"hello"})
        seen.append(list(socket.writes))  # what the socket has as send returns

    async def test() -> None:
        protocol = GuardedHttpTools(
            server_config(app, "127.0.0.1", 0), ServerState(), {}, asyncio.get_running_loop()
        )
        protocol.connection_made(socket)
        protocol.data_received(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        for _ in range(5):
            await asyncio.sleep(0)
        protocol.connection_lost(None)

    socket = Recorded()
    asyncio.run(test())
    assert len(seen) == 1 and len(seen[0]) == 1, seen  # headers and body: one write
    assert seen[0][0].startswith(b"HTTP/1.1 200 OK\r\n") and seen[0][0].endswith(b"\r\n\r\nhello")
