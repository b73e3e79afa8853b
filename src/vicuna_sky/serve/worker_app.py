"""A worker's HTTP API: `/generate` (NDJSON lines, or one JSON object), `/embed`, `/health` and
`/metrics`, all but `/health` for the fleet secret's holder only (serve/worker.py runs it)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from vicuna_sky.serve.answers import unless_disconnected
from vicuna_sky.serve.auth import (
    bearer,
    matches,
)
from vicuna_sky.serve.http_server import (
    add_error_handlers,
    api_app,
    dependency,
    json_post,
)
from vicuna_sky.serve.model_worker import GenerationFailed, Worker
from vicuna_sky.serve.protocol import ApiError, GenerateRequest


def _embeddable(x: object) -> bool:
    if isinstance(x, str):
        return bool(x)
    return (
        isinstance(x, list)
        and bool(x)
        and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in x)
    )


def create_app(worker: Worker, max_body: int | None = None) -> FastAPI:
    app = api_app("vicuna-sky worker", max_body)

    @app.exception_handler(GenerationFailed)
    async def failed(_request: Request, e: GenerationFailed) -> JSONResponse:
        error = ApiError(500, str(e), kind="server_error")
        return JSONResponse(error.body(), status_code=500)

    def check_secret(request: Request) -> None:
        if worker.secret and not matches(bearer(request), [worker.secret]):
            raise ApiError(403, "the fleet secret is required", kind="permission_error")

    add_error_handlers(app, check_secret)
    fleet_only = [Depends(dependency(check_secret))]

    @app.get("/health")
    async def health(request: Request) -> dict:
        """Open, for probes; the worker's state only to the fleet (it tells how busy and what
        models this address serves)."""
        if worker.secret and not matches(bearer(request), [worker.secret]):
            return {"status": "ok"}
        return {
            "status": "ok",
            "models": worker.registration.models,
            "in_flight": worker.in_flight,
            "draining": worker.draining,
            "healthy": worker.healthy,
        }

    @app.get("/metrics", dependencies=fleet_only)
    async def metrics() -> Response:
        return worker.metrics.response()

    async def generate(request: GenerateRequest, http: Request) -> StreamingResponse | dict:
        if worker.draining:
            raise ApiError(503, "worker is draining", kind="server_error")
        stream = worker.generate(request)
        if not request.stream:

            async def whole() -> dict:
                text, final = "", {}
                async for line in stream:
                    event = json.loads(line)
                    text += event.get("text", "")
                    final = event if "finish_reason" in event else final
                return final | {"text": text}

            # The controller hangs up when its client does: the generation stops with it.
            return await unless_disconnected(http, whole())
        try:
            # Errors before the first piece become proper 4xx/5xx. Waiting for it (a slot, the
            # prompt) ends when the controller hangs up: a request abandoned in the queue never
            # runs.
            first = await unless_disconnected(http, anext(stream))
        except StopAsyncIteration:
            first = b""

        async def body() -> AsyncIterator[bytes]:
            if first:
                yield first
            try:
                async for chunk in stream:
                    yield chunk
            except (GenerationFailed, ApiError) as e:
                error = e if isinstance(e, ApiError) else ApiError(500, str(e), "server_error")
                yield (json.dumps(error.body()) + "\n").encode()

        return StreamingResponse(body(), media_type="application/x-ndjson")

    json_post(app, "/generate", GenerateRequest, check_secret, generate)  # every prompt's route

    @app.post("/embed", dependencies=fleet_only)
    async def embed(payload: dict) -> dict:
        texts = payload.get("input")
        if not isinstance(texts, list) or not texts or not all(_embeddable(x) for x in texts):
            raise ApiError(400, "input: a list of non-empty strings or token id lists")
        async with worker.slots:
            vectors = await worker.backend.embed(texts)
            tokens = await asyncio.to_thread(
                lambda: sum(
                    len(x) if isinstance(x, list) else worker.backend.count_tokens(x) for x in texts
                )
            )
            return {"data": vectors, "tokens": tokens}

    return app
