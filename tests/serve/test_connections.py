"""Who may hold a listener's sockets (serve/connections.py): the budget on its own, then a real
controller's TLS fleet port under the floods that emptied it: handshakes past its cap, sockets
that never say a word, many from one address. Attackers connect from other loopback addresses
(127.0.0.2 and up: all of 127/8 is this machine), as they would from other machines."""

from __future__ import annotations

import gc
import os
import socket
import ssl
import threading
import time

import httpx
import pytest

from vicuna_sky.serve.connections import ConnectionBudget
from vicuna_sky.serve.http_server import HEADER_TIMEOUT_ENV
from vicuna_sky.serve.local_fleet import LocalFleet

from .conftest import QUESTION, SECRET, closed_within


class Conn:
    def __init__(self, name: str) -> None:
        self.name, self.closed = name, False

    def close_now(self) -> None:
        self.closed = True

    def __repr__(self) -> str:
        return self.name


def test_past_its_limit_the_oldest_stranger_makes_room():
    budget = ConnectionBudget(3)
    a, b, c, d, e = (Conn(x) for x in "abcde")
    for conn in (a, b, c):
        assert budget.admit(conn, "10.0.0.1")
    budget.vouch(a)  # a showed a key: it stays
    assert budget.admit(d, "10.0.0.2")  # b, the oldest stranger, goes
    assert (a.closed, b.closed, c.closed) == (False, True, False) and len(budget) == 3
    budget.vouch(c)
    budget.vouch(d)
    assert not budget.admit(e, "10.0.0.3")  # no stranger left to push out
    assert not any(x.closed for x in (a, c, d)) and budget.refused == 1 and budget.evicted == 1
    budget.release(a)
    assert budget.admit(e, "10.0.0.3") and len(budget) == 3


def test_one_address_holds_at_most_its_share():
    budget = ConnectionBudget(10, per_address=2)
    conns = [Conn(str(i)) for i in range(4)]
    assert budget.admit(conns[0], "a") and budget.admit(conns[1], "a")
    assert not budget.admit(conns[2], "a")  # refused, not counted
    assert budget.admit(conns[3], "b") and len(budget) == 3
    budget.release(conns[0])
    budget.release(conns[0])  # twice: counted once
    assert budget.admit(conns[2], "a") and not budget.admit(Conn("x"), "a")


def test_a_handshake_done_carries_its_place_and_its_address():
    budget = ConnectionBudget(2, per_address=1)
    handshake, http = Conn("tls"), Conn("http")
    assert budget.admit(handshake, "a")
    budget.replace(handshake, http)
    budget.release(handshake)  # the old name counts for nothing now
    assert len(budget) == 1 and not budget.admit(Conn("y"), "a")
    budget.release(http)
    assert len(budget) == 0 and budget.admit(Conn("y"), "a")


def from_address(n: int, port: int) -> socket.socket:
    s = socket.socket()
    s.bind((f"127.0.0.{n}", 0))
    s.settimeout(5)
    s.connect(("127.0.0.1", port))
    return s


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_a_flood_of_the_fleet_port_never_evicts_a_worker(tmp_path):
    """More TLS handshakes than the fleet port's cap, held and opened again and again, with
    sockets that never send a ClientHello among them: the worker's heartbeats still arrive (its
    connection showed the secret, strangers only push out strangers), the worker stays in
    rotation, and the controller holds no more descriptors than its budget."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with LocalFleet(tmp_path, SECRET, tls=True) as fleet:
        timeouts = {HEADER_TIMEOUT_ENV: "3"}
        controller = fleet.start_controller(
            "--max-connections", "24", "--expiry-seconds", "2", env=timeouts
        )
        worker = fleet.start_worker("echo", "echo", "echo", env=timeouts)
        fleet.wait_workers({worker})
        baseline = open_fds(controller.proc.pid)
        stop = threading.Event()
        held: list[socket.socket] = []
        opened = [0]
        lock = threading.Lock()

        def attack(n: int) -> None:
            while not stop.is_set():
                try:
                    raw = from_address(n, fleet.fleet_port)
                    if n % 2:  # a handshake, then silence
                        raw = context.wrap_socket(raw)
                except OSError:
                    time.sleep(0.05)  # refused: this address holds its share
                    continue
                with lock:
                    held.append(raw)
                    opened[0] += 1
                    if len(held) > 300:  # this process's own descriptors are limited too
                        held.pop(0).close()

        attackers = [threading.Thread(target=attack, args=(n,)) for n in range(2, 10)]
        for t in attackers:
            t.start()
        try:
            seen: list[bool] = []
            peak = 0
            deadline = time.monotonic() + 8  # four expiries, two header deadlines
            while time.monotonic() < deadline:
                seen.append(worker in fleet.available())
                peak = max(peak, open_fds(controller.proc.pid))
                time.sleep(0.25)
            assert all(seen), seen
            answer = fleet.client().chat.completions.create(
                model="echo", messages=QUESTION, max_tokens=8
            )
            assert answer.choices[0].message.content == "echo: hello there"
            assert opened[0] > 100  # the attack did open many
            # Every socket is counted from accept: the fleet port's 24, on top of what the
            # controller held before (its client port, the worker's hop, the registry).
            assert peak <= baseline + 24 + 4, (peak, baseline)
        finally:
            stop.set()
            for t in attackers:
                t.join()
            for s in held:
                s.close()


def test_a_silent_socket_is_closed_at_the_handshake_deadline_and_one_address_is_capped(tmp_path):
    with LocalFleet(tmp_path, SECRET, tls=True) as fleet:
        fleet.start_controller(env={HEADER_TIMEOUT_ENV: "2"})
        silent = from_address(2, fleet.fleet_port)
        started = time.monotonic()
        assert closed_within(silent, 5)  # closed, no ClientHello ever sent
        assert time.monotonic() - started < 5
        silent.close()
        mine = [from_address(3, fleet.fleet_port) for _ in range(32)]  # the documented share
        extra = from_address(3, fleet.fleet_port)
        # The one past the share from one address: closed at once, well inside the 2 s the
        # handshake deadline would have given it.
        assert closed_within(extra, 1)
        for s in [*mine, extra]:
            s.close()
        log = fleet.controller.log.read_text()
        assert "open files:" in log  # the descriptor limit, raised and reported at start
        r = httpx.get(f"{fleet.url}/health")
        assert r.status_code == 200


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_every_handshake_completes_whatever_the_event_loop_read_first(loop):
    """uvloop reads a new connection once even when its protocol paused reading: the client's
    first TLS bytes reached TlsAccept before start_tls had its engine in place, and that
    handshake hung until its deadline. Each of twenty handshakes in a row completes at once."""
    import asyncio

    import uvloop

    from vicuna_sky.serve.connections import TlsAccept
    from vicuna_sky.serve.tls import make_certificate, server_files, trusting

    pem = make_certificate()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*server_files(pem))

    class Ok(asyncio.Protocol):
        def connection_made(self, transport) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    async def main() -> list[float]:
        running = asyncio.get_running_loop()
        budget = ConnectionBudget(100)
        server = await running.create_server(
            lambda: TlsAccept(Ok, context, budget, running, 10), "127.0.0.1", 0
        )
        url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}/"

        def clients() -> list[float]:
            took = []
            for _ in range(20):
                started = time.monotonic()
                assert httpx.get(url, verify=trusting(pem), timeout=5).text == "ok"
                took.append(time.monotonic() - started)
            return took

        took = await asyncio.to_thread(clients)
        server.close()
        return took

    took = uvloop.run(main()) if loop == "uvloop" else asyncio.run(main())
    assert max(took) < 2, took


def test_a_released_connection_is_forgotten_with_its_address():
    """A million passing strangers leave no trace: an address whose last connection went is not
    kept at zero, and a credential shown after the connection was closed changes nothing."""
    budget = ConnectionBudget(1)
    for n in range(50):
        conn = Conn(str(n))
        assert budget.admit(conn, f"10.0.0.{n}")
        budget.release(conn)
        budget.vouch(conn)  # its request finished after the socket went
    assert len(budget) == 0 and not budget._by_address
    stranger, member = Conn("stranger"), Conn("member")
    assert budget.admit(stranger, "a")
    assert budget.admit(member, "b") and stranger.closed  # the late vouch kept nothing


def test_limits_past_the_small_integers_hold():
    """The production budget (hundreds of connections) is past CPython's cached integers: a
    count compared by identity would never reach it."""
    budget = ConnectionBudget(300, per_address=300)
    conns = [Conn(str(i)) for i in range(301)]
    assert all(budget.admit(c, "a") for c in conns[:300])
    assert not budget.admit(conns[300], "a")  # the address's share
    assert budget.admit(conns[300], "b") and conns[0].closed and len(budget) == 300


def test_a_vouched_connection_gives_its_address_back_when_it_goes():
    budget = ConnectionBudget(10, per_address=1)
    for n in range(3):
        conn = Conn(str(n))
        assert budget.admit(conn, "a")
        budget.vouch(conn)
        budget.release(conn)
    assert not budget._by_address


def test_a_request_vouches_for_its_connection_if_it_has_one():
    from vicuna_sky.serve.connections import SCOPE_KEY, vouch

    class Held:
        vouched_for = 0

        def vouched(self) -> None:
            self.vouched_for += 1

    held = Held()
    vouch({SCOPE_KEY: held})
    vouch({})  # a listener without a budget: nothing to keep
    assert held.vouched_for == 1


def test_one_address_refused_past_its_share_is_counted():
    budget = ConnectionBudget(10, per_address=1)
    assert budget.admit(Conn("1"), "a") and not budget.admit(Conn("2"), "a")
    assert (budget.refused, budget.evicted) == (1, 0)


def test_the_open_file_limit_is_raised_to_what_is_wanted_and_never_lowered():
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"the hard limit here is {hard}")
    from vicuna_sky.serve.connections import raise_open_files

    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
        assert raise_open_files(1500) == (1024, 1500)
        assert raise_open_files(1200) == (1500, 1500)  # never lowered
        top = hard if hard != resource.RLIM_INFINITY else 1 << 20
        assert raise_open_files(top + 1000)[1] == (
            top if hard != resource.RLIM_INFINITY else top + 1000
        )
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class TlsPort:
    """TlsAccept on a loopback port of an asyncio loop in a thread, its budget and the loop's
    exception reports at hand."""

    def __init__(self, loop: str, limit: int, per_address: int = 0, timeout: float = 10) -> None:
        import asyncio

        import uvloop

        from vicuna_sky.serve.connections import TlsAccept
        from vicuna_sky.serve.tls import make_certificate, server_files

        self.pem = make_certificate()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*server_files(self.pem))
        self.budget = ConnectionBudget(limit, per_address)
        self.reports: list[dict] = []
        self.loop = uvloop.new_event_loop() if loop == "uvloop" else asyncio.new_event_loop()
        self.loop.set_exception_handler(lambda _, report: self.reports.append(report))

        class Ok(asyncio.Protocol):
            def connection_made(self, transport) -> None:
                self.transport = transport

            def data_received(self, data: bytes) -> None:
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

        def make() -> TlsAccept:
            return TlsAccept(Ok, context, self.budget, self.loop, timeout)

        self.server = self.loop.run_until_complete(self.loop.create_server(make, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def __enter__(self) -> TlsPort:
        return self

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.server.close()
        self.loop.close()

    def held(self) -> int:
        """The budget's count, read on the loop's own thread."""
        import asyncio

        async def count() -> int:
            return len(self.budget)

        return asyncio.run_coroutine_threadsafe(count(), self.loop).result(5)

    def get(self) -> str:
        from vicuna_sky.serve.tls import trusting

        return httpx.get(f"https://127.0.0.1:{self.port}/", verify=trusting(self.pem)).text


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_stranger_pushed_out_loses_its_socket(loop):
    """Counted out is closed: the oldest silent socket is closed when a new one needs its place,
    not merely forgotten (it would hold a descriptor no budget counts)."""
    with TlsPort(loop, limit=2) as port:
        first, second = from_address(2, port.port), from_address(3, port.port)
        time.sleep(0.3)
        third = from_address(4, port.port)
        assert closed_within(first, 3)
        assert not closed_within(second, 0.3)
        assert port.get() == "ok"  # and it pushed out the second
        assert closed_within(second, 3)
        for s in (first, second, third):
            s.close()
        assert not port.reports, port.reports


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_client_hello_waiting_at_accept_is_handed_to_the_tls_engine(loop):
    """A ClientHello already in the socket when the listener accepts it: uvloop reads it at once
    (before start_tls has its engine), and it must still reach the handshake, not wait out its
    deadline. The loop is held busy while the client connects and sends it."""
    with TlsPort(loop, limit=10) as port:
        for _ in range(3):
            port.loop.call_soon_threadsafe(time.sleep, 0.5)
            started = time.monotonic()
            assert port.get() == "ok"
            assert time.monotonic() - started < 3
        assert not port.reports, port.reports


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_the_share_is_per_address_and_refusals_are_quiet(loop):
    """Two addresses each hold their share; the one past its share is closed at once, and
    neither the refusal nor garbage in place of a ClientHello reaches the loop's error log."""
    with TlsPort(loop, limit=10, per_address=1, timeout=30) as port:
        mine = from_address(2, port.port)
        other = from_address(3, port.port)
        assert not closed_within(other, 0.3)  # another address: its own share
        extra = from_address(2, port.port)
        assert closed_within(extra, 2)  # at once, long before the handshake deadline
        garbage = from_address(4, port.port)
        garbage.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # no TLS at all
        assert closed_within(garbage, 2)
        for s in (mine, other, extra, garbage):
            s.close()
        deadline = time.monotonic() + 3
        while port.held() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert port.held() == 0
        gc.collect()  # a handshake's task that failed unhandled reports when it is collected
        time.sleep(0.1)
        assert not port.reports, port.reports


def test_a_tls_connection_takes_one_place_in_the_budget(tmp_path):
    """A TLS connection is counted at accept; the HTTP side it becomes after the handshake is
    the same connection, not a second one: as many kept TLS connections as the cap all stay
    open and answered (counted twice, the third would push out the first)."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with LocalFleet(tmp_path, SECRET, tls=True) as fleet:
        fleet.start_controller("--max-connections", "4")
        kept = [context.wrap_socket(from_address(2 + n, fleet.fleet_port)) for n in range(4)]
        for _ in range(2):  # each asks twice: the first answers did not close any of them
            for tls in kept:
                tls.sendall(request)
                assert tls.recv(4096).startswith(b"HTTP/1.1 200"), kept.index(tls)
        for tls in kept:
            tls.close()


def test_a_connection_that_showed_the_secret_keeps_its_place_past_the_cap(tmp_path):
    """Strangers past the cap push out strangers: a kept connection that showed the fleet
    secret (a worker's) is never the one closed to make room."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    secret = f"Authorization: Bearer {SECRET}\r\n".encode()
    asking = b"GET /workers HTTP/1.1\r\nHost: 127.0.0.1\r\n" + secret + b"\r\n"
    with LocalFleet(tmp_path, SECRET, tls=True) as fleet:
        fleet.start_controller("--max-connections", "4")
        worker = context.wrap_socket(from_address(2, fleet.fleet_port))
        worker.sendall(asking)
        assert worker.recv(4096).startswith(b"HTTP/1.1 200")
        strangers = [context.wrap_socket(from_address(3, fleet.fleet_port)) for _ in range(8)]
        assert closed_within(strangers[0], 3)  # the oldest stranger made room
        worker.sendall(asking)
        assert worker.recv(4096).startswith(b"HTTP/1.1 200")  # the worker's is still open
        for s in [worker, *strangers]:
            s.close()
