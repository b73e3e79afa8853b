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
