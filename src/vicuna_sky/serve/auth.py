"""What the fleet's servers share about who may call them and how much they accept.

Secrets come from a file (`--secret-file`, `--api-key-file`) or the environment (SkyPilot
passes its secrets as environment variables), never from the command line, where every user of
the machine can read them in `ps`.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import os
from pathlib import Path

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vicuna_sky.serve.cancel import took_back

FLEET_SECRET_ENV = "VICUNA_SKY_FLEET_SECRET"
"""Between the controller and its workers (registration, heartbeats, generation)."""
API_KEYS_ENV = "VICUNA_SKY_API_KEYS"
"""The controller's client keys, comma-separated."""
PUBLIC_ENV = "VICUNA_SKY_PUBLIC"
"""'1': serve clients without API keys off loopback, on purpose (`vicuna-sky serve --public`
sets it in the spec: the controller reads it as it reads the keys)."""
ADMIN_KEYS_ENV = "VICUNA_SKY_ADMIN_KEYS"
"""Keys for the controller's worker list and schema, comma-separated."""
MAX_BODY_BYTES = 8 * 2**20
BODY_TIMEOUT_ENV = "VICUNA_SKY_BODY_TIMEOUT"
BODY_TIMEOUT = 30.0
"""Seconds the next piece of a request body may take to arrive (VICUNA_SKY_BODY_TIMEOUT)."""


class ConfigError(Exception):
    """A server that must not start as configured (the message says why)."""


def read_secret(path: Path | None, env: str) -> str:
    """The secret in `path` (first line) when given, else the environment variable `env`."""
    if path is not None:
        try:
            return path.read_text().strip().splitlines()[0].strip() if path.stat().st_size else ""
        except (OSError, UnicodeDecodeError, IndexError) as e:
            raise ConfigError(f"cannot read the secret file {path}: {e}") from None
    return os.environ.get(env, "").strip()


def read_secrets(path: Path | None, env: str) -> list[str]:
    """Several secrets: one per line of `path`, or comma-separated in `env`."""
    if path is not None:
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read the key file {path}: {e}") from None
        return [x.strip() for x in lines if x.strip()]
    return [x.strip() for x in os.environ.get(env, "").split(",") if x.strip()]


def bearer(request: Request) -> str | None:
    """The token of `Authorization: Bearer <token>` (the scheme is case-insensitive, RFC 9110)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def matches(given: str | None, allowed: list[str]) -> bool:
    """Constant-time comparison against every allowed secret (no early exit on a match)."""
    if given is None:
        return False
    found = False
    for secret in allowed:
        found |= hmac.compare_digest(given.encode(), secret.encode())
    return found


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_secret_off_loopback(host: str, secret: str, what: str) -> None:
    """A server that other machines can reach must authenticate who calls it."""
    if not secret and not is_loopback(host):
        raise ConfigError(
            f"{what} on {host} is reachable from other machines: set the fleet secret "
            f"({FLEET_SECRET_ENV} or --secret-file)"
        )


class BodyRefused(Exception):
    """A request body refused as it arrives: too large (413) or stalled (408)."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def body_timeout() -> float:
    return float(os.environ.get(BODY_TIMEOUT_ENV, BODY_TIMEOUT))


async def read_body(
    scope: Scope, receive: Receive, limit: int | None, timeout: float
) -> bytes | None:
    """The whole request body, counted as it arrives (a client need not say its length) and
    refused (BodyRefused) past `limit` bytes or when a piece takes over `timeout` seconds; None
    when the client went away first."""
    if limit is not None:
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _too_large(limit)
    chunks, size = [], 0
    while True:
        message = await _next_piece(receive, timeout)
        if message["type"] != "http.request":  # the client went away
            return None
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if limit is not None and size > limit:
            raise _too_large(limit)
        if not message.get("more_body"):
            return b"".join(chunks)


async def _next_piece(receive: Receive, timeout: float) -> Message:
    """`receive()` within `timeout`, in the caller's task: a timer cancels it (asyncio.wait_for
    would make a task per piece, on every request)."""
    loop = asyncio.get_running_loop()  # once: each look-up is a getpid() on Python 3.11
    task = asyncio.current_task(loop)
    assert task is not None
    stalled = False

    def stall() -> None:
        nonlocal stalled
        stalled = True
        task.cancel()

    timer = loop.call_later(timeout, stall)
    try:
        return await receive()
    except asyncio.CancelledError:
        if stalled and took_back(task):
            raise BodyRefused(
                408, f"the request body stalled for {timeout:g} s", "request_timeout"
            ) from None
        raise
    finally:
        timer.cancel()


def _too_large(limit: int) -> BodyRefused:
    return BodyRefused(413, f"the request body is over {limit} bytes", "request_too_large")


class BodyLimit:
    """413 for a request body over `limit` bytes, 408 when it stalls for `timeout` seconds
    (`read_body`); a body within the limit is handed on whole."""

    def __init__(
        self, app: ASGIApp, limit: int = MAX_BODY_BYTES, timeout: float | None = None
    ) -> None:
        self.app, self.limit = app, limit
        self.timeout = timeout or body_timeout()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        try:
            body = await read_body(scope, receive, self.limit, self.timeout)
        except BodyRefused as e:
            await refuse(send, e)
            return
        if body is None:
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        await self.app(scope, replay, send)


async def refuse(send: Send, e: BodyRefused) -> None:
    import json

    body = json.dumps(
        {
            "error": {
                "message": e.message,
                "type": "invalid_request_error",
                "code": e.code,
                "param": None,
            }
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": e.status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})
