"""What the controller and the workers share as HTTP servers: one set of request checks and
OpenAI-shaped errors on every route, and a uvicorn that does not let slow, idle or oversized
connections pile up.

uvicorn times out idle keep-alive connections only: a client that sends half its headers, or
half its body, holds a socket (and a file descriptor) forever, and its headers may be as large
as the client likes. Here a connection must complete its request headers within
`header_timeout` (`HeaderDeadline`) in at most MAX_HEADER_BYTES (431 past them), each piece of a
body must arrive within `body_timeout` (`auth.BodyLimit`), and every listener counts its
connections from accept (serve/connections.py): strangers cannot take the places of those who
showed a credential, and a TLS port terminates TLS itself, with a handshake deadline.

Every request, whichever route answers it (`json_post`'s fast path or FastAPI's router), passes
the same checks first (`ApiApp.__call__`): a path without control characters, a JSON body
declared as such, and on a server without credentials (loopback only) a `Host` and `Origin` of
this machine, so that no web page a developer visits can drive a local fleet (DNS rebinding, or
a browser's "simple" text/plain POST that needs no preflight).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from vicuna_sky.serve.answers import ClientGone
from vicuna_sky.serve.connections import SCOPE_KEY, ConnectionBudget, TlsAccept, peer_host
from vicuna_sky.serve.protocol import ApiError, invalid_request

HEADER_TIMEOUT_ENV = "VICUNA_SKY_HEADER_TIMEOUT"
HEADER_TIMEOUT = 10.0
"""Seconds a connection has to send its request headers (on opening, and between requests);
VICUNA_SKY_HEADER_TIMEOUT overrides it."""
MAX_CONNECTIONS = 2048
MAX_HEADER_BYTES = 32 * 1024
"""A request line and headers larger than this are refused (431), as nginx refuses a header
line over 8 KiB and h11 a head over 16 KiB."""
FLEET_PER_ADDRESS = 32
"""Connections one address may hold on the fleet port: a worker needs one or two."""


def dependency(check: Callable[[Request], None]) -> Callable[[Request], Awaitable[None]]:
    """`check` as a FastAPI dependency run on the event loop: FastAPI runs a plain function in
    its thread pool, a thread hop per request (measured by benchmarks/profile_controller.py)
    for a check that takes microseconds."""

    async def run(request: Request) -> None:
        check(request)

    return run


M = TypeVar("M", bound=BaseModel)


def api_app(title: str, max_body: int | None = None, **kw: Any) -> ApiApp:
    """A FastAPI app for the fleet: no public docs (admins fetch the schema with a key), bodies
    over `max_body` refused as they arrive (auth.BodyLimit), and `json_post` routes."""
    from vicuna_sky.serve.auth import BodyLimit

    app = ApiApp(title=title, docs_url=None, redoc_url=None, openapi_url=None, **kw)
    app.max_body = max_body
    if max_body:
        app.add_middleware(BodyLimit, limit=max_body)
    return app


Endpoint = Callable[[Scope, Receive, Send], Awaitable[None]]


class ApiApp(FastAPI):
    """FastAPI, with the routes every prompt takes (`json_post`) answered ahead of all of its
    layers: its middleware, router, dependency solving and request/response wrapping were most
    of the controller's CPU per request (measured by benchmarks/profile_controller.py). The
    checks every request passes come first, for both (`refusal`)."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.max_body: int | None = None
        self.json_posts: dict[str, Endpoint] = {}
        self.keyless = False
        """No credential guards this server (it listens on loopback only): requests must name
        this machine in Host and Origin (`local_origin`)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refused = refusal(scope, self.keyless)
            if refused is not None:
                await send_error(send, refused)
                return
            if scope["method"] == "POST":
                endpoint = self.json_posts.get(scope["path"])
                if endpoint is not None:
                    await endpoint(scope, receive, send)
                    return
        await super().__call__(scope, receive, send)


def refusal(scope: Scope, keyless: bool) -> ApiError | None:
    """What every request is refused for before any route sees it, or None."""
    path = scope["path"]
    if not path.isprintable():
        # A decoded %0A or %00: starlette's route patterns end in `$`, which matches before a
        # final newline, so `/v1/chat/completions\n` would reach a route the fast path missed.
        return ApiError(404, "no such route", code="not_found")
    headers = scope["headers"]
    if keyless:
        host = _header(headers, b"host")
        origin = _header(headers, b"origin")
        if host is None or not local_origin(host):
            return ApiError(403, "this server answers requests for localhost only (Host)",
                            kind="permission_error", code="host_not_allowed")  # fmt: skip
        if origin is not None and not local_origin(origin.split(b"://", 1)[-1]):
            return ApiError(403, "this server answers pages of localhost only (Origin)",
                            kind="permission_error", code="origin_not_allowed")  # fmt: skip
    length = _header(headers, b"content-length")
    has_body = (length is not None and length != b"0") or _header(headers, b"transfer-encoding")
    if has_body:
        kind = (_header(headers, b"content-type") or b"").split(b";", 1)[0].strip().lower()
        if kind != b"application/json":
            return ApiError(415, "the request body must be JSON (Content-Type: application/json)",
                            code="unsupported_media_type")  # fmt: skip
    return None


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def local_origin(host: bytes) -> bool:
    """`host[:port]` names this machine: localhost or a loopback address, nothing a DNS name
    could be pointed at (a rebinding attack names its own domain)."""
    text = host.decode("latin-1").strip().lower()
    if text.startswith("["):
        name = text[1 : text.find("]")] if "]" in text else ""
    else:
        name = text.rsplit(":", 1)[0] if text.count(":") == 1 else text
    from vicuna_sky.serve.auth import is_loopback

    return is_loopback(name)


async def send_error(send: Send, error: ApiError) -> None:
    body = orjson.dumps(error.body())
    length = (b"content-length", str(len(body)).encode())
    await send({"type": "http.response.start", "status": error.status,
                "headers": [*JSON_HEADERS, length]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


JSON_HEADERS = [(b"content-type", b"application/json")]


def json_post(
    app: ApiApp,
    path: str,
    body: type[M],
    authorize: Callable[[Request], None],
    handle: Callable[[M, Request], Awaitable[object]],
) -> None:
    """`POST path` on an `api_app`, its JSON body validated as `body` (pydantic's own JSON
    parser), answered by `handle`: a dict is sent as JSON (orjson), a Response as it is. The
    body is limited as on every route (auth.read_body), then `authorize` runs before it is
    judged, as on the FastAPI routes; errors go through the app's own exception handlers."""
    from vicuna_sky.serve.auth import BodyRefused, body_timeout, read_body, refuse

    handlers = app.exception_handlers
    timeout = body_timeout()

    async def answer(request: Request) -> object:
        raw = await read_body(request.scope, request.receive, app.max_body, timeout)
        if raw is None:
            raise ClientGone
        authorize(request)
        try:
            parsed = body.model_validate_json(raw)
        except ValidationError as e:
            errors = e.errors()
            if errors[0]["type"] == "json_invalid" and "hex escape" in errors[0]["msg"]:
                # A lone surrogate (\ud800): JSON can write it, no UTF-8 text can hold it.
                what = f"the request is not valid Unicode text: {errors[0]['msg']}"
                raise ApiError(400, what) from None
            raise invalid_request([{**x, "loc": ("body", *x["loc"])} for x in errors]) from None
        return await handle(parsed, request)

    async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
        scope["app"] = app
        request = Request(scope, receive, send)
        try:
            result = await answer(request)
        except BodyRefused as e:
            await refuse(send, e)
            return
        except Exception as e:
            handler = next((handlers[t] for t in type(e).__mro__ if t in handlers), None)
            if handler is None:
                raise  # uvicorn answers 500 and logs it
            result = await handler(request, e)
        if isinstance(result, StreamingResponse):
            await _stream(result, scope, receive, send)
            return
        if isinstance(result, Response):
            await result(scope, receive, send)
            return
        content = orjson.dumps(result)
        length = (b"content-length", str(len(content)).encode())
        start = {"type": "http.response.start", "status": 200, "headers": [*JSON_HEADERS, length]}
        await send(start)
        await send({"type": "http.response.body", "body": content})

    app.json_posts[path] = endpoint

    # The same route declared to FastAPI, for the OpenAPI document only: ApiApp answers every
    # request to it first, and one that reached it anyway would be no route of ours.
    async def documented(**_: object) -> None:
        raise ApiError(404, "no such route", code="not_found")

    parameter = inspect.Parameter("body", inspect.Parameter.KEYWORD_ONLY, annotation=body)
    documented.__signature__ = inspect.Signature([parameter])  # type: ignore[attr-defined]
    documented.__name__ = handle.__name__
    app.post(path, response_model=None)(documented)


class ConnectionGone(OSError):
    """The client's connection closed while its answer was being written."""


async def _stream(response: StreamingResponse, scope: Scope, receive: Receive, send: Send) -> None:
    """A streamed answer that ends as soon as its client has gone: the next piece written
    raises, and the generator is closed at once (its work cancelled, on every worker).

    starlette ends a stream whose client left by cancelling the task writing it (anyio), but
    that cancellation lands only when the task waits on something not yet done: a stream whose
    next piece is always ready (a fast worker, a buffered hop) ran to its end for nobody, and
    uvicorn drops the writes of a closed connection without a word."""
    connection = scope.get(SCOPE_KEY)

    async def send_while_connected(message: Message) -> None:
        if connection is not None and connection.gone:
            raise ConnectionGone("the client closed the connection")
        await send(message)

    try:
        await response(scope, receive, send_while_connected)
    except (ConnectionGone, ClientDisconnect):
        pass
    finally:
        body = response.body_iterator
        if hasattr(body, "aclose"):
            await body.aclose()


def add_error_handlers(app: FastAPI, authorize: Callable[[Request], None] | None = None) -> None:
    """Every error as `{"error": {...}}`, unknown routes and methods included. `authorize`
    (raising ApiError) runs before a request's body is judged: a caller without credentials
    hears 401/403, never what a valid body would be."""

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        if authorize is not None:
            try:
                authorize(request)
            except ApiError as denied:
                return JSONResponse(denied.body(), status_code=denied.status)
        return JSONResponse(invalid_request(e.errors()).body(), 400)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, e: HTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        message = {404: "no such route", 405: "method not allowed"}.get(e.status_code, e.detail)
        error = ApiError(e.status_code, str(message), code=codes.get(e.status_code))
        return JSONResponse(error.body(), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(ClientGone)
    async def gone(_request: Request, _e: ClientGone) -> JSONResponse:
        # Nobody reads it: the client closed its connection (nginx's 499).
        return JSONResponse(ApiError(499, "the client closed the request").body(), 499)


class HeaderDeadline:
    """Closes a connection that has not sent whole request headers within HEADER_TIMEOUT of
    opening or of its last response, and refuses (431) a head over MAX_HEADER_BYTES. Mixed
    into uvicorn's protocols, which replace `cycle` once a request's headers are complete.
    Each connection is counted in its listener's `budget` (serve/connections.py)."""

    budget: ConnectionBudget | None = None
    counted = False
    """Already in the budget (a TLS connection, counted from its handshake)."""
    gone = False
    """The connection closed (a stream still being written ends: `_stream`)."""

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self.transport = Coalesced(transport, self.loop)  # type: ignore[attr-defined]
        self._header_timeout = float(os.environ.get(HEADER_TIMEOUT_ENV, HEADER_TIMEOUT))
        self._head_bytes, self._in_head, self._messages = 0, True, 0
        admitted = self.counted or self.budget is None
        if not admitted and not self.budget.admit(self, peer_host(transport)):  # type: ignore
            transport.abort()
            return
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        in_head, messages = self._in_head, self._messages
        super().data_received(data)  # type: ignore[misc]
        # Only what was all head counts (the piece a head ends in may carry a body, or the end
        # of the request before it): llhttp holds a header until it ends, so the head is cut
        # within one read of the limit.
        if in_head and self._in_head and self._messages == messages:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEADER_BYTES:
                self._headers_too_large()

    def on_headers_complete(self) -> None:
        self._in_head = False
        head = len(self.url) + sum(len(k) + len(v) + 4 for k, v in self.headers)  # type: ignore
        if head > MAX_HEADER_BYTES:  # a head that came whole in one read
            self._headers_too_large()
            return
        self.scope[SCOPE_KEY] = self  # type: ignore[attr-defined]
        super().on_headers_complete()  # type: ignore[misc]

    def on_message_complete(self) -> None:
        super().on_message_complete()  # type: ignore[misc]
        self._head_bytes, self._in_head = 0, True
        self._messages += 1

    def on_response_complete(self) -> None:
        # The answer leaves now, ahead of uvicorn's and our own timer book-keeping.
        self.transport.flush()  # type: ignore[attr-defined]
        super().on_response_complete()  # type: ignore[misc]
        # A pipelined request whose headers are in already runs now: the deadline is for the
        # headers of a request still to come, not for that one's answer.
        cycle = self.cycle  # type: ignore[attr-defined]
        if cycle is None or cycle.response_complete:
            self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
        if self.budget is not None:
            self.budget.release(self)  # type: ignore[arg-type]
        super().connection_lost(exc)  # type: ignore[misc]

    def vouched(self) -> None:
        """A request on this connection showed a credential (connections.vouch)."""
        if self.budget is not None:
            self.budget.vouch(self)  # type: ignore[arg-type]

    def close_now(self) -> None:
        """Closed to make room for a newer connection (connections.ConnectionBudget)."""
        self.transport.abort()  # type: ignore[attr-defined]

    def _arm_header_timer(self) -> None:
        old = getattr(self, "_header_timer", None)
        if old is not None:
            old.cancel()
        waiting_since = self.cycle  # type: ignore[attr-defined]
        self._header_timer = self.loop.call_later(  # type: ignore[attr-defined]
            self._header_timeout, self._headers_too_slow, waiting_since
        )

    def _headers_too_slow(self, waiting_since: object) -> None:
        transport = self.transport  # type: ignore[attr-defined]
        if self.cycle is waiting_since and not transport.is_closing():  # type: ignore[attr-defined]
            transport.close()

    def _headers_too_large(self) -> None:
        transport = self.transport  # type: ignore[attr-defined]
        cycle = self.cycle  # type: ignore[attr-defined]
        self._in_head = False
        if transport.is_closing():
            return
        if cycle is None or cycle.response_complete:  # no answer is being written: say why
            error = ApiError(431, f"the request headers are over {MAX_HEADER_BYTES} bytes",
                             code="request_header_fields_too_large")  # fmt: skip
            body = orjson.dumps(error.body())
            transport.write(
                b"HTTP/1.1 %d Request Header Fields Too Large\r\n"
                % error.status
                + b"content-type: application/json\r\nconnection: close\r\n"
                b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
        transport.close()


class Coalesced:
    """A connection's transport whose writes in one turn of the event loop leave as one.
    uvicorn writes a response's headers, then its body: two TCP segments, and a reader woken
    for each (the controller, for every answer of a worker; the client, for the controller's).
    A streamed answer's pieces, written in turns of their own, still leave one by one."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport, self._loop = transport, loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(data)

    def writelines(self, pieces: list[bytes]) -> None:
        self.write(b"".join(pieces))

    def flush(self) -> None:
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending.clear()
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class GuardedHttpTools(HeaderDeadline, HttpToolsProtocol):
    """uvicorn's httptools protocol (llhttp, in C) with the header deadline. Not h11: its
    pure-Python parsing was a fifth of the controller's CPU per request (measured by
    benchmarks/profile_controller.py)."""

    def __init__(
        self, *args: Any, budget: ConnectionBudget | None = None, counted: bool = False, **kw: Any
    ) -> None:
        super().__init__(*args, **kw)
        self.budget, self.counted = budget, counted


def server_config(
    app: FastAPI,
    host: str,
    port: int,
    max_connections: int = MAX_CONNECTIONS,
    *,
    per_address: int = 0,
    tls: tuple[str, str] | None = None,
    **kw: Any,
) -> Any:
    """A uvicorn config for `app` on host:port, its connections counted from accept in a budget
    of `max_connections`, at most `per_address` from one address (0: any number), and served
    over TLS with `tls` = (certfile, keyfile), terminated by connections.TlsAccept."""
    import uvicorn

    budget = ConnectionBudget(max_connections, per_address)
    context = None
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(*tls)

    def protocol(**uvicorn_args: Any) -> asyncio.Protocol:
        if context is None:
            return GuardedHttpTools(budget=budget, **uvicorn_args)
        loop = asyncio.get_running_loop()
        return TlsAccept(
            lambda: GuardedHttpTools(budget=budget, counted=True, **uvicorn_args),
            context,
            budget,
            loop,
            # The handshake has the time the headers have, then the headers theirs.
            float(os.environ.get(HEADER_TIMEOUT_ENV, HEADER_TIMEOUT)),
        )

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        http=protocol,  # type: ignore[arg-type]
        timeout_keep_alive=5,
        # No X-Forwarded-For rewriting: nothing here reads the client's address from a proxy,
        # and checking the proxy's address costs an ip_address() parse per request.
        proxy_headers=False,
        # No access log (the log level is warning: each line would be formatted for nothing),
        # and no `server: uvicorn` header telling callers what to attack.
        access_log=False,
        server_header=False,
        **kw,
    )
    config.budget = budget  # type: ignore[attr-defined]
    return config


async def serve_listeners(listeners: list) -> None:
    """Every listener in one event loop; SIGTERM/SIGINT stop them all (uvicorn's own handlers
    would stop only the last one started)."""
    import signal

    import uvicorn

    class Listener(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):  # one handler for all listeners, below
            yield

    servers = [Listener(config) for config in listeners]
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: [setattr(s, "should_exit", True) for s in servers])
    await asyncio.gather(*(server.serve() for server in servers))


def run_event_loop(main: Coroutine[Any, Any, None]) -> None:
    """`main` in uvloop's event loop where uvloop is installed (Linux, macOS): the hop's socket
    work in C, not in asyncio's Python loop; asyncio's own elsewhere."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(_quiet_connection_errors(main))
        return
    uvloop.run(_quiet_connection_errors(main))


async def _quiet_connection_errors(main: Coroutine[Any, Any, None]) -> None:
    """A connection torn down mid-TLS (a cancelled request's hop, a client gone) is one line in
    the log, not the event loop's traceback: under load there are thousands, and the log must
    still show what matters."""
    loop = asyncio.get_running_loop()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        error = context.get("exception")
        message = str(context.get("message", ""))
        if "SSL" in message or isinstance(error, ssl.SSLError | ConnectionError):
            logging.getLogger("vicuna_sky.serve").info("%s: %r", message, error)
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
    await main
