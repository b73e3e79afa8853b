"""The second attack round, one test per hole: clients that give up, slow sockets, addresses that
are not workers, redirects, text that is not Unicode, and the small ones. Real processes on
loopback; a fake "worker" is a plain HTTP server, registered as a worker would register."""

import http.server
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from vicuna_sky.serve.auth import API_KEYS_ENV, BODY_TIMEOUT_ENV, FLEET_SECRET_ENV
from vicuna_sky.serve.http_server import HEADER_TIMEOUT_ENV

from .conftest import QUESTION, SECRET, closed_within, in_flight

FLEET = {"Authorization": f"Bearer {SECRET}"}


def wait_until(check, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


def test_a_client_that_gives_up_frees_the_model(fleet, tiny_chat_model):
    """Hole 1: non-streamed, n > 1, and the openai client's retries on its timeout."""
    fleet.start_controller()
    worker = fleet.start_worker("hf", str(tiny_chat_model), "tiny", "--max-concurrency", "4")
    fleet.wait_workers({worker})
    # ignore_eos: each answer runs its whole budget, seconds of work on this model.
    long = {"max_tokens": 900, "extra_body": {"ignore_eos": True}}
    impatient = fleet.client(timeout=0.5)
    with pytest.raises(openai.APITimeoutError):
        impatient.chat.completions.create(model="tiny", messages=QUESTION, n=8, **long)
    assert wait_until(lambda: in_flight(worker) == 0, 5), "the generations ran on"
    retrying = openai.OpenAI(base_url=f"{fleet.url}/v1", api_key="none", timeout=0.5, max_retries=2)
    with pytest.raises(openai.APITimeoutError):
        retrying.completions.create(model="tiny", prompt="once upon a time", **long)
    assert wait_until(lambda: in_flight(worker) == 0, 5)
    states = fleet.worker_states()
    assert states[0]["in_flight"] == 0 and states[0]["available"]


def test_slow_sockets_are_closed_and_connections_capped(fleet):
    """Hole 2: half-sent headers or a stalled body hold no socket; past the connection cap the
    oldest connection that showed no credential makes room, so slow sockets never keep a
    newcomer out (nor hold more descriptors than the cap)."""
    timeouts = {HEADER_TIMEOUT_ENV: "1", BODY_TIMEOUT_ENV: "1"}
    fleet.start_controller("--max-connections", "6", env=timeouts)
    worker = fleet.start_worker("echo", "echo", "echo", env=timeouts)
    fleet.wait_workers({worker})
    time.sleep(1.5)  # the registration's and the probes' connections are gone
    for url in (fleet.url, worker):
        port = int(url.rsplit(":", 1)[1])
        slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]
        for s in slow:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        if url == fleet.url:
            # Capped: the oldest slow sockets went to let this one in.
            assert httpx.get(f"{url}/health").status_code == 200
            assert closed_within(slow[0], 5) and closed_within(slow[1], 5)
        for s in slow:
            assert closed_within(s, 5)  # closed by the server
            s.close()
        assert httpx.get(f"{url}/health").status_code == 200
    stalled = socket.create_connection(("127.0.0.1", fleet.port))
    stalled.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n{"
    )
    stalled.settimeout(5)
    assert stalled.recv(100).startswith(b"HTTP/1.1 408")
    stalled.close()


def test_a_slow_loris_on_a_kept_connection_is_closed_by_the_header_deadline(fleet):
    """After an answered request the connection is kept; the next request's headers, sent a
    line at a time and never finished, fall under the header deadline again (1 s here), as a
    new connection's do: the server hangs up though bytes keep coming."""
    fleet.start_controller(env={HEADER_TIMEOUT_ENV: "1"})
    s = socket.create_connection(("127.0.0.1", fleet.port))
    s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    s.settimeout(5)
    assert s.recv(4096).startswith(b"HTTP/1.1 200")
    s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    started = time.monotonic()
    closed = False
    while not closed and time.monotonic() - started < 8:
        try:
            s.sendall(b"X-Slow: 1\r\n")
        except OSError:  # the server hung up: reset as we wrote
            closed = True
            break
        closed = closed_within(s, 0.3)
    assert closed and time.monotonic() - started < 4, time.monotonic() - started
    s.close()
    assert httpx.get(f"{fleet.url}/health").status_code == 200


class FakeWorker(http.server.ThreadingHTTPServer):
    """An address that answers every request with `status` (and `headers`), counting them."""

    def __init__(self, status: int, headers: dict | None = None) -> None:
        self.hits = 0
        self.stopped = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                outer.hits += 1
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                body = b'{"text": "from the wrong place", "finish_reason": "stop"}'
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def register(self, fleet, model: str) -> None:
        """Registered, and heartbeating as the misconfigured worker behind it would."""
        reg = {
            "address": self.url,
            "worker_id": secrets.token_hex(8),
            "models": [model],
            "max_concurrency": 4,
        }
        r = httpx.post(f"{fleet.url}/workers/register", json=reg, headers=FLEET)
        assert r.status_code == 200, r.text
        beat = {"address": self.url, "worker_id": reg["worker_id"]}

        def heartbeat() -> None:
            while not self.stopped.wait(1.0):
                httpx.post(f"{fleet.url}/workers/heartbeat", json=beat, headers=FLEET)

        threading.Thread(target=heartbeat, daemon=True).start()

    def stop(self) -> None:
        self.stopped.set()
        self.shutdown()


@pytest.mark.parametrize("status", [404, 405, 307])
def test_an_address_that_is_no_worker_is_failed_over(fleet, status):
    """Holes 3 and 4: a registered address answering 404/405 (a wrong WORKER_ADDRESS, the
    controller itself) or redirecting elsewhere is taken out of rotation, and every request is
    served by a real worker; a redirect is never followed."""
    fleet.start_controller()
    elsewhere = FakeWorker(200)
    fake = FakeWorker(status, {"Location": f"{elsewhere.url}/generate"})
    try:
        fake.register(fleet, "echo")  # first: it wins the ties of least-loaded routing
        echo = fleet.start_worker("echo", "echo", "echo")
        fleet.wait_workers({echo, fake.url})
        client = fleet.client()
        for _ in range(6):
            answer = client.chat.completions.create(model="echo", messages=QUESTION)
            assert answer.choices[0].message.content == "echo: hello there"
        # Tried, failed, and out of rotation until its next heartbeat (which may bring it back
        # for one more failed try: never an answer from it).
        assert 1 <= fake.hits <= 3 and elsewhere.hits == 0
    finally:
        fake.stop()
        elsewhere.stop()


def test_text_that_is_not_unicode_is_400_and_leaks_no_load(fleet):
    """Hole 5: a lone surrogate, in chat, completions and embeddings."""
    fleet.start_controller()
    echo = fleet.start_worker("echo", "echo", "echo")
    fleet.wait_workers({echo})
    bodies = [
        b'{"model": "echo", "messages": [{"role": "user", "content": "hi \\ud800"}]}',
        b'{"model": "echo", "prompt": "hi \\udfff"}',
        b'{"model": "echo", "input": ["\\ud800"]}',
    ]
    paths = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
    for _ in range(3):
        for path, body in zip(paths, bodies, strict=True):
            r = httpx.post(
                f"{fleet.url}{path}", content=body, headers={"Content-Type": "application/json"}
            )
            assert r.status_code == 400 and "Unicode" in r.json()["error"]["message"]
    assert fleet.worker_states()[0]["in_flight"] == 0


def test_empty_input_is_400_and_the_answer_defaults_to_the_context_left(fleet, tiny_chat_model):
    """Hole 7."""
    fleet.start_controller()
    worker = fleet.start_worker("hf", str(tiny_chat_model), "tiny")
    fleet.wait_workers({worker})
    client = fleet.client()
    with pytest.raises(openai.BadRequestError, match="empty"):
        client.completions.create(model="tiny", prompt="")
    with pytest.raises(openai.BadRequestError, match="empty"):
        client.embeddings.create(model="tiny", input="")
    # 1000 of the 1024 tokens: no max_tokens means the 24 left, not a refusal over 256.
    answer = client.completions.create(model="tiny", prompt=[3 + i % 500 for i in range(1000)])
    assert answer.usage.prompt_tokens == 1000 and 1 <= answer.usage.completion_tokens <= 24


def test_a_controller_off_loopback_needs_api_keys(tmp_path):
    """Hole 8: the fleet secret is not enough to open the API to other machines."""
    env = {**os.environ, FLEET_SECRET_ENV: "s" * 16}
    env.pop(API_KEYS_ENV, None)
    result = subprocess.run(
        [sys.executable, "-m", "vicuna_sky.serve.controller", "--host", "0.0.0.0", "--port", "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 2 and API_KEYS_ENV in result.stderr and "--public" in result.stderr


def test_the_echo_backend_yields_and_stops_on_sigterm(fleet):
    """Hole 10: a huge streamed answer whose client goes away, then SIGTERM: the worker answers
    its health probe meanwhile, drains and exits, and logs no flood of socket errors."""
    fleet.start_controller()
    echo = fleet.start_worker("echo", "echo", "echo", "--drain-seconds", "5")
    fleet.wait_workers({echo})
    body = {"model": "echo", "prompt": "w " * 50, "max_tokens": 10_000_000, "stream": True}
    body["ignore_eos"] = True
    with httpx.stream("POST", f"{fleet.url}/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        for _ in range(100):
            next(lines)
        started = time.monotonic()
        assert httpx.get(f"{echo}/health", timeout=5).status_code == 200
        assert time.monotonic() - started < 2
    proc = fleet.workers[echo]
    proc.signal(signal.SIGTERM)
    proc.proc.wait(15)
    assert proc.log.stat().st_size < 100_000


def test_the_small_ones(fleet):
    """Hole 11: credentials before the body, a lower-case scheme, a boolean count, and the
    worker's state for the fleet only."""
    fleet.start_controller(env={API_KEYS_ENV: "key"})
    echo = fleet.start_worker("echo", "echo", "echo")
    fleet.wait_workers({echo})
    garbage = {"content": b"{not json", "headers": {"Content-Type": "application/json"}}
    assert httpx.post(f"{fleet.url}/v1/chat/completions", **garbage).status_code == 401
    assert httpx.post(f"{echo}/generate", **garbage).status_code == 403
    body = {"model": "echo", "messages": QUESTION}
    lower = {"Authorization": "bearer key"}
    r = httpx.post(f"{fleet.url}/v1/chat/completions", json=body, headers=lower)
    assert r.status_code == 200
    r = httpx.post(
        f"{fleet.url}/v1/chat/completions", json=body | {"max_tokens": True}, headers=lower
    )
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]
    assert httpx.get(f"{echo}/health").json() == {"status": "ok"}
    assert "in_flight" in httpx.get(f"{echo}/health", headers=FLEET).json()
    assert httpx.get(f"{fleet.url}/nowhere").json()["error"]["code"] == "not_found"
    assert httpx.put(f"{fleet.url}/health").json()["error"]["code"] == "method_not_allowed"
