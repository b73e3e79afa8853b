"""The servers' HTTP layer (http_server.py): write coalescing, and the checks every request
passes whichever route answers it (paths, JSON bodies, Host and Origin, header size, pipelining)."""

from __future__ import annotations

import asyncio
import time

import pytest

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


# -- the checks every request passes, on real servers ------------------------------------------
def raw_exchange(port: int, request: bytes, until: bytes = b"", timeout: float = 10.0) -> bytes:
    """What a server at 127.0.0.1:`port` writes back to `request` (raw bytes), until it closes,
    `until` is seen, or `timeout` passes."""
    import socket
    import time

    got = b""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(request)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not (until and until in got):
            s.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                piece = s.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not piece:
                break
            got += piece
    return got


def post(path: str, body: bytes, *headers: bytes) -> bytes:
    lines = [b"POST " + path.encode() + b" HTTP/1.1", b"Host: 127.0.0.1", *headers]
    lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


CHAT = b'{"model": "echo", "messages": [{"role": "user", "content": "hi"}]}'
JSON = b"Content-Type: application/json"


def test_a_path_with_a_control_character_is_no_route(fleet):
    """`/v1/chat/completions%0A` missed the fast path and matched FastAPI's route pattern (its
    `$` matches before a final newline): a 500 with a traceback, and without a key a 500 for a
    valid body and a 401 for an invalid one. Now every such path is a 404, key or none."""
    from vicuna_sky.serve.auth import API_KEYS_ENV

    fleet.start_controller(env={API_KEYS_ENV: "key"})
    echo = fleet.start_worker("echo", "echo", "echo")
    fleet.wait_workers({echo})
    worker_port = int(echo.rsplit(":", 1)[1])
    for port, path, body in [
        (fleet.port, "/v1/chat/completions%0A", CHAT),
        (fleet.port, "/v1/chat/completions%0A", b"{"),
        (fleet.port, "/v1/completions%0a", b'{"model": "echo", "prompt": "x"}'),
        (fleet.port, "/v1/embeddings%00", b'{"model": "echo", "input": "x"}'),
        (worker_port, "/generate%0A", b'{"model": "echo", "prompt": "x"}'),
    ]:
        answer = raw_exchange(port, post(path, body, JSON), until=b"}}")
        assert answer.startswith(b"HTTP/1.1 404"), (path, answer[:200])
        assert b'"not_found"' in answer
    assert "Traceback" not in fleet.controller.log.read_text()
    answer = raw_exchange(fleet.port, post("/v1/chat/completions", CHAT, JSON), until=b"}}")
    assert answer.startswith(b"HTTP/1.1 401")  # the route itself, for comparison


def test_a_prompt_route_takes_json_only(fleet):
    """A browser's "simple" POST (text/plain: no preflight) must not run a generation: the
    prompt routes answer only a body declared as JSON, as FastAPI's own routes do."""
    from .conftest import SECRET

    fleet.start_controller()
    echo = fleet.start_worker("echo", "echo", "echo")
    fleet.wait_workers({echo})
    worker_port = int(echo.rsplit(":", 1)[1])
    fleet_key = b"Authorization: Bearer " + SECRET.encode()
    generate = b'{"model": "echo", "prompt": "x"}'
    for kind in (b"text/plain", b"application/x-www-form-urlencoded", b"multipart/form-data"):
        header = b"Content-Type: " + kind
        answer = raw_exchange(fleet.port, post("/v1/chat/completions", CHAT, header), b"}}")
        assert answer.startswith(b"HTTP/1.1 415"), answer[:200]
        answer = raw_exchange(worker_port, post("/generate", generate, header, fleet_key), b"}}")
        assert answer.startswith(b"HTTP/1.1 415"), answer[:200]
    answer = raw_exchange(fleet.port, post("/v1/chat/completions", CHAT), b"}}")  # none given
    assert answer.startswith(b"HTTP/1.1 415")
    # No body at all needs no type: the route answers it (a 400 naming what is missing).
    answer = raw_exchange(fleet.port, post("/v1/chat/completions", b""), b"}}")
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    charset = b"Content-Type: Application/JSON; charset=utf-8"
    answer = raw_exchange(fleet.port, post("/v1/chat/completions", CHAT, charset), b"}}}")
    assert answer.startswith(b"HTTP/1.1 200") and b"echo: hi" in answer


def test_a_server_without_keys_answers_pages_of_this_machine_only(fleet):
    """A loopback controller without API keys: a web page elsewhere cannot drive it, whether it
    posts from its own origin or rebinds its own domain's DNS to 127.0.0.1 (Host)."""
    import httpx

    from vicuna_sky.serve.auth import API_KEYS_ENV

    fleet.start_controller()
    fleet.wait_workers({fleet.start_worker("echo", "echo", "echo")})
    chat = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
    url = f"{fleet.url}/v1/chat/completions"
    for headers in (
        {"Host": "attacker.example"},
        {"Host": f"attacker.example:{fleet.port}"},
        {"Host": "127.0.0.1.attacker.example"},
        {"Origin": "https://attacker.example"},
        {"Origin": "null"},
        {"Origin": "http://attacker.example://127.0.0.1"},  # only the first :// is the scheme
    ):
        r = httpx.post(url, json=chat, headers=headers)
        assert r.status_code == 403, headers
        assert r.json()["error"]["code"] in ("host_not_allowed", "origin_not_allowed")
        assert httpx.get(f"{fleet.url}/v1/models", headers=headers).status_code == 403
    for headers in (
        {"Host": f"localhost:{fleet.port}"},
        {"Host": f"[::1]:{fleet.port}"},
        {"Host": "::1"},  # bare, without a port: still this machine
        {"Origin": "http://localhost:7860"},
        {"Origin": "http://127.0.0.1:7860"},
    ):
        assert httpx.post(url, json=chat, headers=headers).status_code == 200, headers
    fleet.close()
    # With keys, the key decides, wherever the request names.
    fleet.procs.clear()
    fleet.start_controller(env={API_KEYS_ENV: "key"})
    fleet.wait_workers({fleet.start_worker("echo", "echo", "echo")})
    keyed = {"Host": "api.example.com", "Authorization": "Bearer key"}
    r = httpx.post(f"{fleet.url}/v1/chat/completions", json=chat, headers=keyed)
    assert r.status_code == 200


def assert_hung_up_on_an_endless_header(s) -> None:
    """Send a request whose header never ends, up to 20 MiB: the server hangs up first, as a
    reset or a broken pipe, not a full buffer that times out (how much goes out before is the
    kernel's buffers': up to several MiB on loopback)."""
    s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: ")
    sent = 0
    with pytest.raises((ConnectionResetError, BrokenPipeError)):
        while sent < 20 * 2**20:
            s.sendall(b"a" * 65536)
            sent += 65536


def test_request_headers_past_the_limit_are_431(fleet):
    """48 connections with 20 MiB of headers each took a controller from 69 MB to 738 MB: the
    head of a request is refused past MAX_HEADER_BYTES, as soon as that much has come."""
    from vicuna_sky.serve.http_server import MAX_HEADER_BYTES

    fleet.start_controller()
    pad = b"X-Pad: " + b"a" * (MAX_HEADER_BYTES + 1)
    answer = raw_exchange(fleet.port, post("/v1/models", b"", pad), until=b"}}")
    assert answer.startswith(b"HTTP/1.1 431"), answer[:100]
    assert b"request_header_fields_too_large" in answer
    # Sent without end: refused (and closed) long before the 20 MiB are in.
    import socket

    with socket.create_connection(("127.0.0.1", fleet.port), timeout=30) as s:
        assert_hung_up_on_an_endless_header(s)
    # The limit is 32 KiB, as documented: a head of 33,000 bytes is over it.
    answer = raw_exchange(fleet.port, post("/v1/models", b"", b"X-Pad: " + b"a" * 33_000), b"}}")
    assert answer.startswith(b"HTTP/1.1 431"), answer[:100]
    # The same on a kept connection, after a first request was answered: the next head is
    # counted from its first byte too.
    with socket.create_connection(("127.0.0.1", fleet.port), timeout=30) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        assert_hung_up_on_an_endless_header(s)
    # A head that comes in two pieces, under the limit together, is answered.
    with socket.create_connection(("127.0.0.1", fleet.port), timeout=30) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 1000)
        time.sleep(0.3)  # a read of its own
        s.sendall(b"a" * 1000 + b"\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
    small = b"X-Pad: " + b"a" * (MAX_HEADER_BYTES // 2)
    request = b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n" + small + b"\r\n\r\n"
    assert raw_exchange(fleet.port, request, until=b"]}").startswith(b"HTTP/1.1 200")
    # A large body arrives with its headers, and pipelined requests each after the last: none
    # of that is head.
    big = b'{"model": "nobody", "messages": [{"role": "user", "content": "%s"}]}' % (b"x" * 300_000)
    two = post("/v1/chat/completions", big, JSON) * 2
    answer = raw_exchange(fleet.port, two, until=b"}}HTTP/1.1 404", timeout=20)
    answer += raw_exchange(fleet.port, post("/v1/chat/completions", big, JSON), until=b"}}")
    assert answer.count(b"HTTP/1.1 404") == 3 and b"431" not in answer, answer[:300]


def test_a_pipelined_request_keeps_its_answer_past_the_header_deadline(fleet):
    """The header deadline re-armed after the first answer belonged to the second request,
    whose headers were already in: a long stream pipelined behind a short request was cut at
    the deadline without [DONE]."""
    from vicuna_sky.serve.http_server import HEADER_TIMEOUT_ENV

    timeouts = {HEADER_TIMEOUT_ENV: "1"}
    fleet.start_controller(env=timeouts)
    echo = fleet.start_worker("echo", "echo", "echo", "--echo-delay", "0.25", env=timeouts)
    fleet.wait_workers({echo})
    stream = (
        b'{"model": "echo", "stream": true, "messages": [{"role": "user", '
        b'"content": "one two three four five six seven"}]}'
    )  # nine words at 0.25 s: over two seconds
    short = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    answer = raw_exchange(
        fleet.port, short + post("/v1/chat/completions", stream, JSON), b"[DONE]", 20
    )
    assert answer.startswith(b"HTTP/1.1 200") and answer.count(b"HTTP/1.1 200") == 2
    assert b"data: [DONE]" in answer


def test_a_prompt_route_answers_post_only(fleet):
    """The fast path takes POSTs alone: any other method on a prompt route is FastAPI's 405,
    with no generation run and no body read."""
    fleet.start_controller()
    fleet.wait_workers({fleet.start_worker("echo", "echo", "echo")})
    for method in (b"GET", b"PUT", b"DELETE"):
        request = post("/v1/chat/completions", CHAT, JSON).replace(b"POST", method, 1)
        answer = raw_exchange(fleet.port, request, until=b"}")
        assert answer.startswith(b"HTTP/1.1 405"), (method, answer[:200])
        assert b"echo: hi" not in answer


def test_pipelined_requests_over_the_head_limit_in_one_read_are_each_answered(fleet):
    """Only a head counts toward MAX_HEADER_BYTES: hundreds of small requests pipelined in one
    write (each read holding whole requests, far over the limit together) are all answered."""
    from vicuna_sky.serve.http_server import MAX_HEADER_BYTES

    fleet.start_controller()
    one = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 100 + b"\r\n\r\n"
    count = 4 * MAX_HEADER_BYTES // len(one)
    last = one.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")  # then it hangs up
    answer = raw_exchange(fleet.port, one * (count - 1) + last, timeout=30)
    assert answer.count(b"HTTP/1.1 200") == count and b"431" not in answer, answer[-300:]


def test_a_connection_torn_down_is_one_line_in_the_log_and_other_errors_keep_their_report(caplog):
    """Under load thousands of connections end mid-TLS or mid-write: each is one info line, not
    the event loop's error report; anything else still reaches the loop's default handler."""
    import logging
    import ssl

    from vicuna_sky.serve.http_server import _quiet_connection_errors

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.call_exception_handler({"message": "peer went", "exception": ConnectionResetError()})
        loop.call_exception_handler({"message": "handshake", "exception": ssl.SSLError()})
        loop.call_exception_handler({"message": "SSL error in data received"})
        loop.call_exception_handler({"message": "a bug", "exception": ValueError("mine")})

    with caplog.at_level(logging.INFO):
        asyncio.run(_quiet_connection_errors(main()))
    quiet = [r for r in caplog.records if r.name == "vicuna_sky.serve"]
    assert [r.levelno for r in quiet] == [logging.INFO] * 3
    assert "peer went" in quiet[0].getMessage() and "handshake" in quiet[1].getMessage()
    loud = [r for r in caplog.records if r.name == "asyncio"]
    assert len(loud) == 1 and "a bug" in loud[0].getMessage(), [r.getMessage() for r in loud]
    assert not any("exception handler" in r.getMessage() for r in caplog.records)
