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

FLEET_SECRET_ENV = "VICUNA_SKY_FLEET_SECRET"
"""Between the controller and its workers (registration, heartbeats, generation)."""
API_KEYS_ENV = "VICUNA_SKY_API_KEYS"
"""The controller's client keys, comma-separated."""
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


class BodyLimit:
    """413 for a request body over `limit` bytes, counted as it arrives (a client need not say
    its length) and before any of it is parsed; 408 when the body stalls for `timeout` seconds;
    a body within the limit is handed on whole."""

    def __init__(
        self, app: ASGIApp, limit: int = MAX_BODY_BYTES, timeout: float | None = None
    ) -> None:
        self.app, self.limit = app, limit
        self.timeout = timeout or float(os.environ.get(BODY_TIMEOUT_ENV, BODY_TIMEOUT))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _too_large(send, self.limit)
            return
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.timeout)
            except asyncio.TimeoutError:
                await _refuse(send, 408, f"the request body stalled for {self.timeout:g} s",
                              "request_timeout")  # fmt: skip
                return
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await _too_large(send, self.limit)
                return
            if not message.get("more_body"):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        await self.app(scope, replay, send)


async def _too_large(send: Send, limit: int) -> None:
    await _refuse(send, 413, f"the request body is over {limit} bytes", "request_too_large")


async def _refuse(send: Send, status: int, message: str, code: str) -> None:
    import json

    body = json.dumps(
        {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "code": code,
                "param": None,
            }
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})
