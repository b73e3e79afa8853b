"""Who may call the fleet's servers: keys compared whole, on every route that takes one; secrets
read from files or the environment; bodies bounded. In process first, the real fleet last."""

import json
import os

import httpx
import pytest
from fastapi import FastAPI, Request
from starlette.testclient import TestClient

from vicuna_sky.serve.auth import (
    API_KEYS_ENV,
    BODY_TIMEOUT_ENV,
    FLEET_SECRET_ENV,
    MAX_BODY_BYTES,
    BodyLimit,
    BodyRefused,
    ConfigError,
    bearer,
    body_timeout,
    is_loopback,
    matches,
    read_body,
    read_secret,
    read_secrets,
    require_secret_off_loopback,
)

from .conftest import SECRET

API_KEY = "client-key-0123456789"
ADMIN_KEY = "admin-key-9876543210"


def strict_prefixes(secret: str) -> list[str]:
    # Not the empty one over HTTP: "Bearer " is no valid header value (it is in process).
    return [secret[:i] for i in (1, len(secret) // 2, len(secret) - 1)]


def test_matches_wants_the_whole_secret():
    """Issue #30 row 2 (in process): no prefix, extension or other key passes."""
    assert matches(API_KEY, [API_KEY]) and matches(API_KEY, [ADMIN_KEY, API_KEY])
    for given in ["", *strict_prefixes(API_KEY), API_KEY + "x", API_KEY.upper(), None]:
        assert not matches(given, [API_KEY]), given
        assert not matches(given, [ADMIN_KEY, API_KEY]), given
    assert not matches(API_KEY, [])


def test_bearer_takes_only_a_bearer_token():
    def request(*headers: tuple[bytes, bytes]) -> Request:
        return Request({"type": "http", "headers": list(headers)})

    assert bearer(request((b"authorization", b"Bearer abc def"))) == "abc def"
    assert bearer(request((b"authorization", b"Basic abc"))) is None
    assert bearer(request((b"authorization", b"Token abc"))) is None  # sorts after "bearer"
    # The scheme is case-insensitive (RFC 9110); the token is not.
    assert bearer(request((b"authorization", b"bearer abc"))) == "abc"
    assert bearer(request()) is None


def test_secrets_come_from_a_file_first_then_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SOME_SECRET", "  from-env  ")
    monkeypatch.setenv("SOME_KEYS", " a, b ,,c ")
    path = tmp_path / "secret"
    path.write_text("  first  \nsecond\n")
    assert read_secret(path, "SOME_SECRET") == "first"
    assert read_secret(None, "SOME_SECRET") == "from-env"
    assert read_secret(None, "NO_SUCH_SECRET_ENV") == ""
    path.write_text("")
    assert read_secret(path, "SOME_SECRET") == ""  # an empty file is no secret, not the env's
    path.write_text("\n")
    with pytest.raises(ConfigError, match="cannot read the secret file"):
        read_secret(path, "SOME_SECRET")
    with pytest.raises(ConfigError, match="cannot read the secret file"):
        read_secret(tmp_path / "missing", "SOME_SECRET")
    path.write_text(" k1 \n\n  \nk2\n")
    assert read_secrets(path, "SOME_KEYS") == ["k1", "k2"]
    assert read_secrets(None, "SOME_KEYS") == ["a", "b", "c"]
    assert read_secrets(None, "NO_SUCH_KEYS_ENV") == []
    with pytest.raises(ConfigError, match="cannot read the key file"):
        read_secrets(tmp_path / "missing", "SOME_KEYS")


def test_only_loopback_may_go_without_the_fleet_secret():
    # A host from the command line is a new string, not the interned literal.
    for host in ("".join(["local", "host"]), "127.0.0.1", "127.8.9.10", "::1"):
        assert is_loopback(host), host
        require_secret_off_loopback(host, "", "the controller")
    for host in ("0.0.0.0", "10.0.0.7", "::", "example.com", "localhost.example.com"):
        assert not is_loopback(host), host
        with pytest.raises(ConfigError, match=f"the worker on {host} is reachable") as e:
            require_secret_off_loopback(host, "", "the worker")
        assert FLEET_SECRET_ENV in str(e.value)
        require_secret_off_loopback(host, "a-secret", "the worker")


def test_the_default_body_limit_is_8_mib():
    assert MAX_BODY_BYTES == 8 * 1024 * 1024
    assert BodyLimit(None).limit == MAX_BODY_BYTES


def test_a_body_may_stall_30_s_unless_the_environment_says_otherwise(monkeypatch):
    monkeypatch.delenv(BODY_TIMEOUT_ENV, raising=False)
    assert body_timeout() == 30.0 and BodyLimit(None).timeout == 30.0
    monkeypatch.setenv(BODY_TIMEOUT_ENV, "2.5")
    assert body_timeout() == 2.5 and BodyLimit(None).timeout == 2.5


def test_a_stalled_body_is_408_and_a_cancelled_read_stays_cancelled():
    """A piece of the body that does not come within the timeout: 408, in one line. A read
    cancelled by anything else (the server shutting down) is not turned into a 408."""
    import asyncio

    async def stalling() -> dict:
        await asyncio.sleep(60)
        raise AssertionError("not reached")

    first = {"type": "http.request", "body": b"ab", "more_body": True}
    scope = {"type": "http", "method": "POST", "headers": []}

    async def stalled() -> None:
        pieces = iter([first])

        async def receive() -> dict:
            piece = next(pieces, None)
            return piece if piece is not None else await stalling()

        with pytest.raises(BodyRefused) as refused:
            await read_body(scope, receive, 10, 0.05)
        assert (refused.value.status, refused.value.code) == (408, "request_timeout")
        assert str(refused.value) == "the request body stalled for 0.05 s"
        assert not asyncio.current_task().cancelling()  # the timer's cancel was taken back

    async def cancelled() -> None:
        reading = asyncio.ensure_future(read_body(scope, stalling, 10, 60))
        await asyncio.sleep(0.01)
        reading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reading

    asyncio.run(stalled())
    asyncio.run(cancelled())


def body_limited_app(limit: int) -> TestClient:
    app = FastAPI()

    @app.post("/body")
    async def body(request: Request) -> dict:
        data = await request.body()
        return {"size": len(data), "head": data[:4].decode()}

    @app.get("/get")
    async def get() -> dict:
        return {"ok": True}

    app.add_middleware(BodyLimit, limit=limit)
    return TestClient(app)


def test_a_body_over_the_limit_is_413_whether_declared_or_streamed():
    client = body_limited_app(100)
    r = client.post("/body", content=b"abcd" + b"x" * 96)
    assert r.status_code == 200 and r.json() == {"size": 100, "head": "abcd"}
    for too_big in (b"x" * 101, iter([b"x" * 60, b"y" * 41])):  # declared / chunked
        r = client.post("/body", content=too_big)
        assert r.status_code == 413 and r.headers["content-type"] == "application/json"
        assert r.json() == {
            "error": {
                "message": "the request body is over 100 bytes",
                "type": "invalid_request_error",
                "code": "request_too_large",
                "param": None,
            }
        }
    r = client.post("/body", content=iter([b"a", b"x" * 100]))  # the second chunk is too much
    assert r.status_code == 413
    r = client.post("/body", content=iter([b"abcd", b"x" * 50, b"y" * 46]))  # chunked, whole
    assert r.status_code == 200 and r.json() == {"size": 100, "head": "abcd"}
    assert client.get("/get").json() == {"ok": True}
    assert json.loads(client.post("/body", content=b"").text) == {"size": 0, "head": ""}


def test_the_body_limit_hands_on_the_body_once_then_what_follows_it():
    """The ASGI messages themselves: a client gone mid-body reaches no app; after the replayed
    body, the app's next receive() is the server's next message (the disconnect)."""
    import asyncio

    def run(messages: list[dict]) -> tuple[list[dict] | None, list[dict]]:
        seen: list[dict] | None = None
        sent: list[dict] = []

        async def app(scope, receive, send):
            nonlocal seen
            seen = [await receive(), await receive()]

        async def receive():
            return messages.pop(0)

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "headers": []}
        asyncio.run(BodyLimit(app, limit=10)(scope, receive, send))
        return seen, sent

    gone = {"type": "http.disconnect"}
    seen, sent = run([{"type": "http.request", "body": b"ab", "more_body": True}, gone])
    assert seen is None and sent == []
    part = {"type": "http.request", "body": b"ab", "more_body": True}
    seen, _ = run([part, {"type": "http.request", "body": b"cd"}, gone])
    assert seen == [{"type": "http.request", "body": b"abcd", "more_body": False}, gone]

    # Each chunk counts: a small first one does not let a big second one through.
    small = {"type": "http.request", "body": b"a", "more_body": True}
    seen, sent = run([small, {"type": "http.request", "body": b"x" * 20}, gone])
    assert seen is None and sent[0]["status"] == 413
    # Not a request (the server's lifespan events): handed on untouched, nothing buffered.
    startup = {"type": "lifespan.startup"}
    seen: list[dict] = []

    async def lifespan_app(scope, receive, send):
        seen.append(await receive())

    async def events():
        return startup

    asyncio.run(BodyLimit(lifespan_app, limit=10)({"type": "lifespan"}, events, None))
    assert seen == [startup]

    # A declared length over the limit is refused before a byte of the body is read.
    async def unread():
        raise AssertionError("the body was read")

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "headers": [(b"content-length", b"11")]}
    asyncio.run(BodyLimit(unread, limit=10)(scope, unread, send))
    assert sent[0]["status"] == 413


def test_a_strict_prefix_of_any_key_is_refused_on_every_route(fleet):
    """Issue #30 row 2: a client key, the fleet secret and an admin key, each cut short, on
    every route that takes it (the controller's and a worker's), is refused as a wrong key is."""
    fleet.start_controller(env={"VICUNA_SKY_API_KEYS": API_KEY, "VICUNA_SKY_ADMIN_KEYS": ADMIN_KEY})
    worker = fleet.start_worker("echo", "echo", "echo")
    fleet.wait_workers({worker})
    chat = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
    registration = {"address": "http://127.0.0.1:9", "worker_id": "prefix-001", "models": ["m"],
                    "max_concurrency": 1}  # fmt: skip
    heartbeat = {"address": worker, "worker_id": "prefix-001"}
    c = fleet.url
    routes = {
        API_KEY: [
            ("GET", f"{c}/v1/models", None, 401),
            ("POST", f"{c}/v1/chat/completions", chat, 401),
            ("POST", f"{c}/v1/completions", {"model": "echo", "prompt": "hi"}, 401),
            ("POST", f"{c}/v1/embeddings", {"model": "echo", "input": "hi"}, 401),
        ],
        SECRET: [
            ("GET", f"{c}/workers", None, 401),
            ("GET", f"{c}/openapi.json", None, 401),
            ("POST", f"{c}/workers/register", registration, 403),
            ("POST", f"{c}/workers/heartbeat", heartbeat, 403),
            ("POST", f"{c}/workers/drain", heartbeat, 403),
            ("POST", f"{worker}/generate", {"model": "echo", "prompt": "hi"}, 403),
            ("POST", f"{worker}/embed", {"input": ["hi"]}, 403),
        ],
        ADMIN_KEY: [
            ("GET", f"{c}/workers", None, 401),
            ("GET", f"{c}/openapi.json", None, 401),
        ],
    }
    with httpx.Client(timeout=30) as http:

        def status(method: str, url: str, body: dict | None, key: str) -> int:
            headers = {"Authorization": f"Bearer {key}"}
            return http.request(method, url, json=body, headers=headers).status_code

        for key, calls in routes.items():
            for method, url, body, refused in calls:
                for given in strict_prefixes(key):
                    assert status(method, url, body, given) == refused, (url, given)
            # The whole key passes where it is the one the route takes.
            method, url, body, _ = calls[0]
            assert status(method, url, body, key) == 200, (url, key)
    assert worker in fleet.available()  # nothing above reached the registry


def test_the_public_switch_opens_a_keyless_controller_off_loopback_and_nothing_else(tmp_path):
    """SkyServe's replica runs its controller on 0.0.0.0 behind the load balancer: without keys
    it starts only with VICUNA_SKY_PUBLIC=1 (what `serve --public` puts in the spec), and then
    clients need no key; "0", or anything else, is a one-line refusal."""
    import subprocess
    import sys

    from vicuna_sky.ports import free_port
    from vicuna_sky.serve.auth import PUBLIC_ENV
    from vicuna_sky.serve.local_fleet import FleetError, LocalFleet, Proc
    from vicuna_sky.serve.tls import FLEET_TLS_ENV

    port = free_port()
    args = ["--host", "0.0.0.0", "--port", str(port), "--behind-tls-proxy"]
    base = {**os.environ, FLEET_SECRET_ENV: SECRET, FLEET_TLS_ENV: "", API_KEYS_ENV: ""}
    for value in ("0", "yes", ""):
        refused = subprocess.run(
            [sys.executable, "-m", "vicuna_sky.serve.controller", *args],
            env={**base, PUBLIC_ENV: value},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert refused.returncode == 2, (value, refused.stderr)
        assert len(refused.stderr.strip().splitlines()) == 1 and "--public" in refused.stderr
    env = {FLEET_SECRET_ENV: SECRET, FLEET_TLS_ENV: "", API_KEYS_ENV: "", PUBLIC_ENV: "1"}
    for attempt in range(3):
        # 0.0.0.0: a port free on loopback when it was picked may be taken since by a server
        # of the other test worker; another port then, as an operator would pick.
        log = tmp_path / f"controller-{attempt}.log"
        proc = Proc(["vicuna_sky.serve.controller", *args], log, env)
        try:
            LocalFleet.wait_http(f"http://127.0.0.1:{port}/health", proc=proc)
        except FleetError:
            proc.stop()
            if "address already in use" not in log.read_text() or attempt == 2:
                raise
            port = free_port()
            args = ["--host", "0.0.0.0", "--port", str(port), "--behind-tls-proxy"]
            continue
        break
    try:
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models")  # no key: open, on purpose
        assert models.status_code == 200 and models.json()["data"] == []
    finally:
        proc.stop()
