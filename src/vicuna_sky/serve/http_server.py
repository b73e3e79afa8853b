"""What the controller and the workers share as HTTP servers: OpenAI-shaped errors on every route,
and a uvicorn that does not let slow or idle connections pile up.

uvicorn times out idle keep-alive connections only: a client that sends half its headers, or
half its body, holds a socket (and a file descriptor) forever. Here a connection must complete
its request headers within `header_timeout` (`HeaderDeadline`), each piece of a body must arrive
within `body_timeout` (`auth.BodyLimit`), and past `max_connections` open connections uvicorn
answers 503 at once instead of running out of descriptors.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from vicuna_sky.serve.answers import ClientGone
from vicuna_sky.serve.protocol import ApiError, invalid_request

HEADER_TIMEOUT_ENV = "VICUNA_SKY_HEADER_TIMEOUT"
HEADER_TIMEOUT = 10.0
"""Seconds a connection has to send its request headers (on opening, and between requests);
VICUNA_SKY_HEADER_TIMEOUT overrides it."""
MAX_CONNECTIONS = 2048


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
    of the controller's CPU per request (measured by benchmarks/profile_controller.py)."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.max_body: int | None = None
        self.json_posts: dict[str, Endpoint] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            endpoint = self.json_posts.get(scope["path"])
            if endpoint is not None:
                await endpoint(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


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
    # request to it first.
    async def documented(**_: object) -> None:
        raise AssertionError("unreachable")

    parameter = inspect.Parameter("body", inspect.Parameter.KEYWORD_ONLY, annotation=body)
    documented.__signature__ = inspect.Signature([parameter])  # type: ignore[attr-defined]
    documented.__name__ = handle.__name__
    app.post(path, response_model=None)(documented)


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
    opening or of its last response. Mixed into uvicorn's protocols, which replace `cycle` once
    a request's headers are complete."""

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self.transport = Coalesced(transport, self.loop)  # type: ignore[attr-defined]
        self._header_timeout = float(os.environ.get(HEADER_TIMEOUT_ENV, HEADER_TIMEOUT))
        self._arm_header_timer()

    def on_response_complete(self) -> None:
        # The answer leaves now, ahead of uvicorn's and our own timer book-keeping.
        self.transport.flush()  # type: ignore[attr-defined]
        super().on_response_complete()  # type: ignore[misc]
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
        super().connection_lost(exc)  # type: ignore[misc]

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


def server_config(
    app: FastAPI, host: str, port: int, max_connections: int = MAX_CONNECTIONS, **kw: Any
) -> Any:
    import uvicorn

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        http=GuardedHttpTools,
        timeout_keep_alive=5,
        # No X-Forwarded-For rewriting: nothing here reads the client's address from a proxy,
        # and checking the proxy's address costs an ip_address() parse per request.
        proxy_headers=False,
        # No access log (the log level is warning: each line would be formatted for nothing),
        # and no `server: uvicorn` header telling callers what to attack.
        access_log=False,
        server_header=False,
        limit_concurrency=max_connections,
        **kw,
    )


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
        asyncio.run(main)
        return
    uvloop.run(main)
