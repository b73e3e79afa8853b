"""`python -m vicuna_sky.serve.controller`: the worker registry and the OpenAI API, in one hop.

Clients call `/v1/models`, `/v1/chat/completions`, `/v1/completions`, `/v1/embeddings` here; the
controller picks the least-loaded worker in rotation for the model and streams its answer back.

What counts as whose failure:
- A bad request is the client's: it is refused here (validation) or by the worker (a 4xx, e.g.
  the context length), and the worker stays in rotation.
- A broken worker leaves rotation: refused or reset connections, a garbled answer, no first
  token within `first_token_timeout` or no next one within `inter_token_timeout`, missed
  heartbeats, or the worker reporting itself unhealthy (its engine stuck). Requests in flight
  to it are failed over at once: retried on another worker before the answer has begun,
  continued by another after the text already sent (the client sees one answer), or ended with
  an error event when no worker can.
- A worker's other 5xx is retried once elsewhere; it stays in rotation, so a request that
  breaks every worker it reaches cannot take a model down.

Every port is authenticated: clients with an API key (`--api-key-file` or
VICUNA_SKY_API_KEYS), workers and admins (`/workers`, `/openapi.json`) with the fleet secret
(`--secret-file` or VICUNA_SKY_FLEET_SECRET) or an admin key. Secrets never travel on the
command line, and a controller reachable from other machines refuses to start without one.
Workers on other machines register on the TLS fleet port (`--fleet-port`) and are reached over
https with their certificate pinned (serve/tls.py); without a fleet port, only workers on this
machine may register.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import ipaddress
import os
import struct
import sys
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import orjson
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from vicuna_sky.serve.answers import respond, took_back, unless_disconnected
from vicuna_sky.serve.auth import (
    BodyLimit,
    bearer,
    is_loopback,
    matches,
    read_secret,
    read_secrets,
)
from vicuna_sky.serve.http_server import add_error_handlers, dependency, json_post
from vicuna_sky.serve.metrics import FleetMetrics
from vicuna_sky.serve.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    GenerateRequest,
    Registration,
    SamplingParams,
)
from vicuna_sky.serve.registry import Registry, WorkerState
from vicuna_sky.serve.structured import AnswerShape, answer_shape
from vicuna_sky.serve.tls import FLEET_TLS_ENV, TlsError, pinned, server_files

JSON = {"Content-Type": "application/json"}
T = TypeVar("T")


class WorkerFailed(Exception):
    """The worker is broken for this request (the reason is the message)."""


class Controller:
    def __init__(
        self,
        registry: Registry,
        secret: str,
        api_keys: list[str],
        admin_keys: list[str] | None = None,
        *,
        first_token_timeout: float = 120.0,
        inter_token_timeout: float = 60.0,
        request_timeout: float = 600.0,
        require_tls: bool = False,
    ) -> None:
        self.registry, self.secret = registry, secret
        self.require_tls = require_tls
        """Workers register over TLS only (the fleet port), and are reached over https with
        their certificate pinned: the fleet secret and prompts never travel in clear."""
        self._pins: dict[str, aiohttp.Fingerprint] = {}
        self.api_keys, self.admin_keys = list(api_keys), list(admin_keys or [])
        self.first_token_timeout = first_token_timeout
        self.inter_token_timeout = inter_token_timeout
        self.request_timeout = request_timeout
        """A whole non-streamed answer (a hung worker is caught sooner by its heartbeats)."""
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=2.0)
        self._session: aiohttp.ClientSession | None = None
        self.metrics = FleetMetrics()
        self._reading: dict[str, set[asyncio.Task]] = {}
        """The tasks waiting on each worker's answer: cancelled when it is found dead or
        unhealthy, so that their requests fail over."""
        self._abandoned: dict[asyncio.Task, str] = {}
        """Tasks cancelled because their worker failed them (dead, or too slow), and why: not
        by their client, nor by a shutdown."""

    @property
    def http(self) -> aiohttp.ClientSession:
        """The client for the hop to workers. aiohttp rather than httpx: on the one hop every
        request takes, its client costs a fraction of the CPU (measured in
        benchmarks/serve_throughput.py). Made inside the server's event loop, on first use."""
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30)
            headers = {"Authorization": f"Bearer {self.secret}"} if self.secret else {}
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=self.timeout, headers=headers
            )
        return self._session

    def pin(self, worker: WorkerState) -> aiohttp.Fingerprint | bool:
        """How the hop checks `worker`'s certificate: its registered fingerprint (no CA); a
        plain http worker has none to check (`True`: aiohttp's default, unused for http)."""
        if not worker.tls_fingerprint:
            return True
        pin = self._pins.get(worker.tls_fingerprint)
        if pin is None:
            pin = self._pins[worker.tls_fingerprint] = pinned(worker.tls_fingerprint)
        return pin

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    # -- who may do what -------------------------------------------------------------------
    def check_key(self, request: Request) -> None:
        if self.api_keys and not matches(bearer(request), self.api_keys):
            raise ApiError(401, "invalid API key", code="invalid_api_key")

    def check_worker(self, request: Request) -> None:
        """Registration, heartbeats and drains carry the fleet secret (over TLS, when the
        controller has a fleet port)."""
        if self.require_tls and request.url.scheme != "https":
            raise ApiError(
                403,
                "workers register over TLS: use the controller's fleet port (https)",
                kind="permission_error",
                code="tls_required",
            )
        if not self.require_tls and not (request.client and is_loopback(request.client.host)):
            # No TLS: nothing between machines, where the secret and prompts would be in clear.
            raise ApiError(
                403,
                "this controller has no TLS fleet port (--fleet-port): only workers on its own "
                "machine may register",
                kind="permission_error",
                code="tls_required",
            )
        if self.secret and not matches(bearer(request), [self.secret]):
            raise ApiError(403, "wrong fleet secret", kind="permission_error")

    def check_admin(self, request: Request) -> None:
        """The worker list (addresses) and the schema: the fleet secret or an admin key."""
        allowed = [s for s in [self.secret, *self.admin_keys] if s]
        if allowed and not matches(bearer(request), allowed):
            raise ApiError(401, "the fleet secret or an admin key is required", code="unauthorized")

    def check_caller(self, request: Request) -> None:
        """Whoever the route is for: workers on /workers/, clients elsewhere."""
        if request.url.path.startswith("/workers/"):
            self.check_worker(request)
        else:
            self.check_key(request)

    def require_model(self, model: str) -> None:
        if model not in self.registry.models():
            raise ApiError(
                404, f"the model {model!r} does not exist or has no worker", code="model_not_found"
            )

    # -- failing over ------------------------------------------------------------------------
    async def watch_workers(self, every: float = 0.2) -> None:
        """Fail over the requests in flight to a worker that stopped heartbeating or says it is
        unhealthy, and forget workers long gone."""
        while True:
            for address, tasks in list(self._reading.items()):
                if tasks and not self.registry.alive(address):
                    for task in list(tasks):
                        self._abandon(task, "the worker stopped heartbeating or is unhealthy")
            self.registry.forget_expired()
            await asyncio.sleep(every)

    def _abandon(self, task: asyncio.Task, why: str) -> None:
        if task not in self._abandoned:
            self._abandoned[task] = why
            task.cancel()

    async def guarded(self, address: str, step: Awaitable[T], timeout: float | None) -> T:
        """`step` (a read from the worker) unless the worker is found gone or `timeout` passes
        first: then WorkerFailed. The read runs in the caller's task, which `watch_workers` or
        a timer cancels: no task of its own, nor a watcher per read (measured on the hop by
        benchmarks/profile_controller.py)."""
        if not self.registry.alive(address):
            if asyncio.iscoroutine(step):
                step.close()
            raise WorkerFailed("the worker stopped heartbeating or is unhealthy")
        task = asyncio.current_task()
        assert task is not None
        reading = self._reading.setdefault(address, set())
        reading.add(task)
        timer = None
        if timeout is not None:
            why = f"no answer within {timeout:g} s"
            timer = asyncio.get_running_loop().call_later(timeout, self._abandon, task, why)
        try:
            return await step
        except asyncio.CancelledError:
            why = self._abandoned.pop(task, None)
            if why is not None and took_back(task):
                raise WorkerFailed(why) from None
            raise
        finally:
            if timer is not None:
                timer.cancel()
            self._abandoned.pop(task, None)
            reading.discard(task)
            if not reading:
                self._reading.pop(address, None)

    async def generate(self, gen: GenerateRequest) -> AsyncIterator[dict]:
        """Deltas `{"text": ...}` then `{"finish_reason": ..., usage}`, or `{"error": ApiError}`
        once the answer has begun; failover inside."""
        self.require_model(gen.model)
        tried: set[str] = set()
        sent = ""
        prompt_tokens: int | None = None
        # Deltas already sent (about one per token): a continuation may only use the rest of
        # max_tokens, and the usage it reports is added to them.
        pieces = 0
        server_errors = 0
        while True:
            worker = self.registry.pick(gen.model, tried)
            if worker is None:
                if sent:
                    what = "the worker failed mid-answer and no other worker could continue it"
                    yield {"error": ApiError(503, what, kind="server_error")}
                    return
                raise ApiError(
                    503, f"no worker for {gen.model!r} is available", kind="server_error"
                )
            tried.add(worker.address)
            carried = pieces
            left = None if gen.max_tokens is None else gen.max_tokens - carried
            if left is not None and left <= 0:
                self.registry.release(worker)
                yield {"finish_reason": "length", "completion_tokens": carried}
                return
            payload = gen.model_copy(update={"prefix": sent, "max_tokens": left}).model_dump()
            url = f"{worker.address}/generate"
            try:
                # A worker answers once it has its first token (streamed) or the whole answer:
                # waiting for it is already a read that a hung worker must not hold up forever.
                # Redirects are not followed: a worker answers itself, or is broken.
                opening = self.http.post(
                    url,
                    data=encoded(payload),
                    headers=JSON,
                    allow_redirects=False,
                    ssl=self.pin(worker),
                )
                wait = self.first_token_timeout if gen.stream else self.request_timeout
                async with await self.guarded(worker.address, opening, wait) as r:
                    self.metrics.requests.labels(gen.model, worker.address, str(r.status)).inc()
                    if r.status != 200:
                        error = _worker_error(r.status, await r.read())
                        if r.status == 503:  # draining: no new work, in-flight work goes on
                            self.registry.mark(worker.address, draining=True)
                        elif r.status not in CLIENT_ERRORS and r.status < 500:
                            # A 404/405/3xx/403: not a worker of this fleet at that address (a
                            # wrong WORKER_ADDRESS, the controller itself, another secret).
                            raise WorkerFailed(f"the worker answered HTTP {r.status}")
                        elif r.status >= 500:
                            server_errors += 1
                            if server_errors > 1:  # it fails wherever it goes: give up
                                error = ApiError(502, f"workers failed: {error.message}",
                                                 kind="server_error")  # fmt: skip
                        if r.status < 500 or server_errors > 1:
                            if sent:  # the answer has begun: the client hears it in the stream
                                yield {"error": error}
                                return
                            raise error
                        continue
                    if not gen.stream:
                        content = await self.guarded(worker.address, r.read(), self.request_timeout)
                        final = _final(content)
                        yield {"text": final.pop("text")}
                        yield final
                        return
                    timeout = self.first_token_timeout
                    while True:
                        raw = await self.guarded(worker.address, r.content.readline(), timeout)
                        if not raw:
                            raise WorkerFailed("the stream ended without its final line")
                        timeout = self.inter_token_timeout
                        event = _event(raw)
                        if event is None:
                            continue
                        if "error" in event:  # the generation failed after it began
                            yield {"error": _error_event(event)}
                            return
                        if "text" in event:
                            sent += event["text"]
                            pieces += 1
                        elif "finish_reason" not in event:  # the prompt's size, told up front
                            prompt_tokens = event.get("prompt_tokens", prompt_tokens)
                            continue
                        if prompt_tokens is not None:
                            event.setdefault("prompt_tokens", prompt_tokens)
                        if "finish_reason" in event:
                            event["completion_tokens"] = event.get("completion_tokens", 0) + carried
                            yield event
                            return
                        yield event
            except (WorkerFailed, aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                self.registry.mark(worker.address, failed=True)
                self.metrics.requests.labels(gen.model, worker.address, "failed").inc()
                self.metrics.failovers.labels(gen.model).inc()
            finally:
                self.registry.release(worker)


CLIENT_ERRORS = (400, 413)
"""What a worker answers for the client's mistake (its validation, its body limit): passed on,
the worker staying in rotation. Any other 4xx or a 3xx means the address is not a worker."""


def encoded(body: object) -> bytes:
    """`body` as JSON; a 400 for text that cannot travel as UTF-8 (a lone surrogate, which
    JSON's \\u escapes can carry), raised where the worker picked for it is released."""
    try:
        return orjson.dumps(body)
    except TypeError as e:
        raise ApiError(400, f"the request is not valid Unicode text: {e}") from None


def _worker_error(status: int, content: bytes) -> ApiError:
    """A worker's error as the client should see it (4xx: the client's mistake, passed on)."""
    try:
        error = orjson.loads(content or b"{}").get("error", {})
        message = str(error.get("message", "worker error"))
    except (ValueError, AttributeError):
        error, message = {}, f"worker answered HTTP {status}"
    kind = "invalid_request_error" if status < 500 else "server_error"
    return ApiError(status, message, str(error.get("type") or kind), error.get("code"))


def _final(content: bytes) -> dict:
    """A non-streamed answer from a worker; anything else means the worker is broken."""
    final = orjson.loads(content)
    if not isinstance(final, dict) or not isinstance(final.get("text"), str):
        raise ValueError("a malformed answer")
    if "error" in final:
        raise ValueError("the worker failed the generation")
    return {
        "text": final["text"],
        "finish_reason": str(final.get("finish_reason", "stop")),
        "prompt_tokens": _count(final.get("prompt_tokens")),
        "completion_tokens": _count(final.get("completion_tokens")),
    }


def _event(raw: bytes) -> dict | None:
    line = raw.strip()
    if not line:
        return None
    event = orjson.loads(line)
    if not isinstance(event, dict) or ("text" in event and not isinstance(event["text"], str)):
        raise ValueError("a malformed stream line")
    for key in ("prompt_tokens", "completion_tokens"):
        if key in event:
            event[key] = _count(event[key])
    return event


def _error_event(event: dict) -> ApiError:
    error = event.get("error") if isinstance(event.get("error"), dict) else {}
    message = str(error.get("message", "the generation failed"))
    return ApiError(500, message, kind="server_error")


def _encoded(vector: list[float], req: EmbeddingRequest) -> list[float] | str:
    if req.encoding_format == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


def _count(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**31:
        raise ValueError("a malformed token count")
    return value


def _gen_request(
    req: SamplingParams, model: str, shape: AnswerShape, **fields: object
) -> GenerateRequest:
    return GenerateRequest(
        model=model,
        max_tokens=req.answer_limit(),  # None: the worker gives the rest of the context
        temperature=req.temperature,
        top_p=req.top_p,
        stop=req.stop_list(),
        seed=req.seed,
        stream=req.stream,
        guided_choice=req.guided_choice,
        json_schema=shape.json_schema,
        tools=shape.tools,
        ignore_eos=req.ignore_eos,
        **fields,
    )


def _model_card(model: str, context_length: int) -> dict:
    return {
        "id": model,
        "object": "model",
        "created": 0,
        "owned_by": "vicuna-sky",
        "context_length": context_length,
    }


def _with_source_host(reg: Registration, request: Request) -> Registration:
    """A worker that announces 0.0.0.0 (or ::) is reached at the address its registration came
    from: the one address the controller knows reaches it, whatever its cloud calls it."""
    url = urlsplit(reg.address)
    try:
        unspecified = ipaddress.ip_address(url.hostname or "").is_unspecified
    except ValueError:
        unspecified = False
    if not unspecified or request.client is None:
        return reg
    host = request.client.host
    netloc = f"[{host}]:{url.port}" if ":" in host else f"{host}:{url.port}"
    return reg.model_copy(update={"address": urlunsplit((url.scheme, netloc, "", "", ""))})


def create_app(controller: Controller, max_body: int | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        watcher = asyncio.create_task(controller.watch_workers())
        yield
        watcher.cancel()
        await controller.close()

    # No public docs: the schema lists every route; admins fetch it with a key.
    app = FastAPI(
        title="vicuna-sky controller",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    if max_body:
        app.add_middleware(BodyLimit, limit=max_body)

    add_error_handlers(app, controller.check_caller)

    # -- workers ---------------------------------------------------------------------------
    # Who may call comes first (dependencies run before the body is validated): a caller
    # without the secret learns nothing about what a valid request would be.
    worker_only = [Depends(dependency(controller.check_worker))]
    admin_only = [Depends(dependency(controller.check_admin))]
    clients_only = [Depends(dependency(controller.check_key))]

    @app.post("/workers/register", dependencies=worker_only)
    async def register(reg: Registration, request: Request) -> dict:
        reg = _with_source_host(reg, request)
        if controller.require_tls and not (
            reg.address.startswith("https://") and reg.tls_fingerprint
        ):
            raise ApiError(
                400,
                "this fleet runs over TLS: a worker serves https and registers its certificate's "
                "fingerprint (tls_fingerprint)",
                code="tls_required",
            )
        if not controller.require_tls and not is_loopback(urlsplit(reg.address).hostname or ""):
            raise ApiError(
                400,
                "this controller has no TLS fleet port: it sends prompts only to workers on its "
                "own machine",
                code="tls_required",
            )
        outcome = controller.registry.register(reg)
        if outcome == "taken":
            raise ApiError(409, f"{reg.address} is registered by another worker", code="taken")
        if outcome == "full":
            raise ApiError(429, "the registry is full", code="registry_full")
        return {"ok": True, "address": reg.address}

    @app.post("/workers/heartbeat", dependencies=worker_only)
    async def heartbeat(payload: dict) -> dict:
        known = controller.registry.heartbeat(
            str(payload.get("address")),
            str(payload.get("worker_id")),
            healthy=payload.get("healthy", True) is not False,
        )
        if not known:
            raise ApiError(404, "unknown worker: register again", code="unknown_worker")
        return {"ok": True}

    @app.post("/workers/drain", dependencies=worker_only)
    async def drain(payload: dict) -> dict:
        address, worker_id = str(payload.get("address")), str(payload.get("worker_id"))
        if not controller.registry.mark(address, draining=True, worker_id=worker_id):
            raise ApiError(404, "unknown worker", code="unknown_worker")
        controller.metrics.drains.inc()
        return {"ok": True}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        """For load balancers' readiness probes (SkyServe): 200 once a worker serves a model.
        Open, because it reaches no model and says nothing a client could use."""
        serving = bool(controller.registry.models())
        return JSONResponse({"ready": serving}, status_code=200 if serving else 503)

    @app.get("/health")
    async def health() -> dict:
        """Liveness, as vLLM's `/health` (guidellm and load balancers call it): open, because it
        says nothing but that this process answers."""
        return {"status": "ok"}

    @app.get("/workers", dependencies=admin_only)
    async def workers() -> dict:
        return {"workers": controller.registry.snapshot()}

    @app.get("/metrics", dependencies=admin_only, include_in_schema=False)
    async def metrics() -> Response:
        workers = controller.registry.snapshot()
        controller.metrics.workers.labels("registered").set(len(workers))
        controller.metrics.workers.labels("available").set(sum(w["available"] for w in workers))
        return controller.metrics.response()

    @app.get("/openapi.json", dependencies=admin_only, include_in_schema=False)
    async def schema() -> dict:
        return app.openapi()

    # -- OpenAI API ------------------------------------------------------------------------
    @app.get("/v1/models", dependencies=clients_only)
    async def models() -> dict:
        models = sorted(controller.registry.models().items())
        return {"object": "list", "data": [_model_card(m, n) for m, n in models]}

    @app.get("/v1/models/{model:path}", dependencies=clients_only)
    async def model(model: str) -> dict:
        context = controller.registry.models().get(model)
        if context is None:
            raise ApiError(404, f"the model {model!r} does not exist", code="model_not_found")
        return _model_card(model, context)

    async def chat(req: ChatCompletionRequest, request: Request) -> object:
        shape = answer_shape(req)
        gen = _gen_request(req, req.model, shape, messages=req.messages)
        return await respond(controller, request, req, [gen], "chat", shape)

    async def completions(req: CompletionRequest, request: Request) -> object:
        shape = answer_shape(req)
        gens = [_gen_request(req, req.model, shape, prompt=p) for p in req.prompts()]
        return await respond(controller, request, req, gens, "text", shape)

    async def embeddings(req: EmbeddingRequest, request: Request) -> dict:
        return await unless_disconnected(request, embed(req))

    # The routes every prompt takes, lean (and matched first).
    json_post(app, "/v1/embeddings", EmbeddingRequest, controller.check_key, embeddings)
    json_post(app, "/v1/completions", CompletionRequest, controller.check_key, completions)
    json_post(app, "/v1/chat/completions", ChatCompletionRequest, controller.check_key, chat)

    async def embed(req: EmbeddingRequest) -> dict:
        texts = req.inputs()
        controller.require_model(req.model)
        tried: set[str] = set()
        refused: ApiError | None = None
        while (worker := controller.registry.pick(req.model, tried)) is not None:
            tried.add(worker.address)
            try:
                url = f"{worker.address}/embed"
                body, pin = encoded({"input": texts}), controller.pin(worker)
                async with controller.http.post(
                    url, data=body, headers=JSON, allow_redirects=False, ssl=pin
                ) as r:
                    content = await controller.guarded(
                        worker.address, r.read(), controller.request_timeout
                    )
                if r.status != 200 and r.status != 503 and r.status not in CLIENT_ERRORS:
                    raise WorkerFailed(f"the worker answered HTTP {r.status}")
                if r.status in CLIENT_ERRORS:
                    # This worker cannot embed (e.g. a vLLM generation worker); another might.
                    refused = _worker_error(r.status, content)
                    continue
                if r.status == 200:
                    data = orjson.loads(content)
                    vectors, tokens = data["data"], _count(data["tokens"])
                    if not isinstance(vectors, list) or len(vectors) != len(texts):
                        raise ValueError("a malformed answer")
                    if req.dimensions is not None and any(
                        len(v) != req.dimensions for v in vectors
                    ):
                        raise ApiError(
                            400,
                            f"dimensions: this model's embeddings have {len(vectors[0])} "
                            "dimensions, and it cannot shorten them",
                        )
                    return {
                        "object": "list",
                        "model": req.model,
                        "data": [
                            {"object": "embedding", "index": i, "embedding": _encoded(v, req)}
                            for i, v in enumerate(vectors)
                        ],
                        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                    }
                if r.status == 503:
                    controller.registry.mark(worker.address, draining=True)
            except (WorkerFailed, aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError):
                controller.registry.mark(worker.address, failed=True)
            finally:
                controller.registry.release(worker)
        if refused is not None:
            raise refused
        raise ApiError(503, f"no worker for {req.model!r} is available", kind="server_error")

    return app


def main(argv: list[str] | None = None) -> None:

    from vicuna_sky.serve.auth import (
        ADMIN_KEYS_ENV,
        API_KEYS_ENV,
        FLEET_SECRET_ENV,
        MAX_BODY_BYTES,
        ConfigError,
        is_loopback,
        require_secret_off_loopback,
    )
    from vicuna_sky.serve.http_server import MAX_CONNECTIONS, server_config

    p = argparse.ArgumentParser(prog="python -m vicuna_sky.serve.controller", allow_abbrev=False)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--fleet-port",
        type=int,
        default=0,
        help="a TLS port for workers (registration, heartbeats); then they may use no other",
    )
    p.add_argument(
        "--tls-file", type=Path, default=None, help=f"key + certificate PEM (else ${FLEET_TLS_ENV})"
    )
    p.add_argument(
        "--secret-file", type=Path, default=None, help=f"fleet secret (else ${FLEET_SECRET_ENV})"
    )
    p.add_argument(
        "--api-key-file", type=Path, default=None, help=f"client keys (else ${API_KEYS_ENV})"
    )
    p.add_argument(
        "--admin-key-file", type=Path, default=None, help=f"admin keys (else ${ADMIN_KEYS_ENV})"
    )
    p.add_argument("--db", type=Path, default=None, help="SQLite file for the worker registry")
    p.add_argument(
        "--expiry-seconds", type=float, default=3.0, help="a worker silent this long fails over"
    )
    p.add_argument(
        "--forget-seconds", type=float, default=60.0, help="a worker silent this long is removed"
    )
    p.add_argument("--max-workers", type=int, default=1024, help="registry size")
    p.add_argument("--first-token-timeout", type=float, default=120.0)
    p.add_argument("--inter-token-timeout", type=float, default=60.0)
    p.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES)
    p.add_argument(
        "--max-connections", type=int, default=MAX_CONNECTIONS, help="open connections, then 503"
    )
    p.add_argument(
        "--public",
        action="store_true",
        help="serve clients without API keys off loopback (an open endpoint, on purpose)",
    )
    args = p.parse_args(argv)
    try:
        secret = read_secret(args.secret_file, FLEET_SECRET_ENV)
        api_keys = read_secrets(args.api_key_file, API_KEYS_ENV)
        admin_keys = read_secrets(args.admin_key_file, ADMIN_KEYS_ENV)
        require_secret_off_loopback(args.host, secret, "the controller")
        if not api_keys and not args.public and not is_loopback(args.host):
            raise ConfigError(
                f"the controller on {args.host} is reachable from other machines and has no API "
                f"key: set {API_KEYS_ENV} or --api-key-file (or pass --public to serve anyone)"
            )
        tls = fleet_tls(args.tls_file, args.fleet_port)
    except (ConfigError, TlsError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    registry = Registry(args.db, args.expiry_seconds, args.forget_seconds, args.max_workers)
    controller = Controller(
        registry,
        secret,
        api_keys,
        admin_keys,
        first_token_timeout=args.first_token_timeout,
        inter_token_timeout=args.inter_token_timeout,
        require_tls=tls is not None,
    )
    app = create_app(controller, args.max_body_bytes)
    listeners = [server_config(app, args.host, args.port, args.max_connections)]
    if tls is not None:
        certfile, keyfile = tls
        listeners.append(
            server_config(
                app,
                args.host,
                args.fleet_port,
                args.max_connections,
                ssl_certfile=certfile,
                ssl_keyfile=keyfile,
                lifespan="off",  # the app's startup and shutdown run once, with the first
            )
        )
    asyncio.run(_serve(listeners))


def fleet_tls(path: Path | None, fleet_port: int) -> tuple[str, str] | None:
    """The fleet port's certificate files, or None when there is no fleet port: then workers
    talk plain HTTP, and only from this machine (a SkyServe replica's own worker)."""
    from vicuna_sky.serve.auth import ConfigError

    if path is not None:
        try:
            pem = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read the TLS file {path}: {e}") from None
    else:
        pem = os.environ.get(FLEET_TLS_ENV, "")
    if not fleet_port:
        return None  # workers on this machine only (Controller.check_worker, register)
    if not pem.strip():
        raise ConfigError(
            f"--fleet-port needs the fleet's TLS key and certificate ({FLEET_TLS_ENV} or "
            "--tls-file)"
        )
    return server_files(pem)


async def _serve(listeners: list) -> None:
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


if __name__ == "__main__":
    main()
