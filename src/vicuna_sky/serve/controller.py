"""`python -m vicuna_sky.serve.controller`: the worker registry and the OpenAI API, in one hop.

Clients call `/v1/models`, `/v1/chat/completions`, `/v1/completions`, `/v1/embeddings` here; the
controller picks the least-loaded worker in rotation for the model and streams its answer back.
A worker that fails before its first token (refused, reset, 5xx, timeout) is taken out of
rotation and the request goes to another, invisibly. A worker that dies mid-stream is replaced
by another that continues after the text already sent (the client sees one answer); when no
worker can, the stream ends with an error event.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from vicuna_sky.serve.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    GenerateRequest,
    Registration,
    SamplingParams,
)
from vicuna_sky.serve.registry import Registry

DEFAULT_MAX_TOKENS = 256
JSON = {"Content-Type": "application/json"}
WORKER_FAILURES = (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError)
"""Refused, reset, cut short, timed out or garbled: the worker is out of rotation."""


class Controller:
    def __init__(
        self, registry: Registry, secret: str, api_keys: list[str], request_timeout: float = 600.0
    ) -> None:
        self.registry, self.secret, self.api_keys = registry, secret, set(api_keys)
        # No limit on a whole answer (a long healthy stream is fine); a worker silent for
        # `request_timeout` between two reads, or not accepting within 2 s, has failed.
        self.timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=2.0, sock_read=request_timeout
        )
        self._session: aiohttp.ClientSession | None = None

    @property
    def http(self) -> aiohttp.ClientSession:
        """The client for the hop to workers. aiohttp rather than httpx: on the one hop every
        request takes, its client costs a fraction of the CPU (measured in
        benchmarks/serve_throughput.py). Made inside the server's event loop, on first use."""
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self.timeout)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def post(self, url: str, payload: dict) -> tuple[int, bytes]:
        async with self.http.post(url, data=orjson.dumps(payload), headers=JSON) as response:
            return response.status, await response.read()

    def check_key(self, request: Request) -> None:
        if not self.api_keys:
            return
        header = request.headers.get("authorization", "")
        if not header.startswith("Bearer ") or header[7:] not in self.api_keys:
            raise ApiError(401, "invalid API key", code="invalid_api_key")

    def check_secret(self, secret: str) -> None:
        if self.secret and secret != self.secret:
            raise ApiError(403, "wrong registration secret", kind="permission_error")

    def out_of_rotation(self, address: str, status: int) -> None:
        """A worker answered with a failure: 503 means it is draining, 5xx that it is broken."""
        self.registry.mark(address, failed=status >= 500 and status != 503, draining=status == 503)

    def require_model(self, model: str) -> None:
        if model not in self.registry.models():
            raise ApiError(
                404, f"the model {model!r} does not exist or has no worker", code="model_not_found"
            )

    async def generate(self, gen: GenerateRequest) -> AsyncIterator[dict]:
        """Deltas `{"text": ...}` then `{"finish_reason": ..., usage}`; failover inside."""
        self.require_model(gen.model)
        tried: set[str] = set()
        sent = ""
        # Deltas already sent (about one per token): a continuation may only use the rest of
        # max_tokens, and the usage it reports is added to them.
        pieces = 0
        while True:
            worker = self.registry.pick(gen.model, tried)
            if worker is None:
                if sent:
                    yield {
                        "error": ApiError(
                            503,
                            "the worker died mid-answer and no other worker could continue it",
                            kind="server_error",
                        )
                    }
                    return
                raise ApiError(
                    503, f"no worker for {gen.model!r} is available", kind="server_error"
                )
            tried.add(worker.address)
            carried = pieces
            left = gen.max_tokens - carried
            if left <= 0:
                self.registry.release(worker)
                yield {"finish_reason": "length", "completion_tokens": carried}
                return
            payload = gen.model_copy(update={"prefix": sent, "max_tokens": left}).model_dump()
            try:
                if not gen.stream:
                    status, content = await self.post(f"{worker.address}/generate", payload)
                    if 400 <= status < 500:
                        raise _worker_error(status, content)
                    if status != 200:
                        self.out_of_rotation(worker.address, status)
                        continue
                    final = orjson.loads(content)
                    yield {"text": final.pop("text", "")}
                    yield final
                    return
                async with self.http.post(
                    f"{worker.address}/generate", data=orjson.dumps(payload), headers=JSON
                ) as response:
                    if 400 <= response.status < 500:
                        error = _worker_error(response.status, await response.read())
                        if sent:  # the answer has begun: the client hears it in the stream
                            yield {"error": error}
                            return
                        raise error
                    if response.status != 200:
                        self.out_of_rotation(worker.address, response.status)
                        continue
                    async for raw in response.content:
                        line = raw.strip()
                        if not line:
                            continue
                        event = orjson.loads(line)
                        if "text" in event:
                            sent += event["text"]
                            pieces += 1
                        if "finish_reason" in event:
                            event["completion_tokens"] = event.get("completion_tokens", 0) + carried
                            yield event
                            return
                        yield event
                # The stream ended without its final line: the worker died mid-answer.
                self.registry.mark(worker.address, failed=True)
            except WORKER_FAILURES:
                self.registry.mark(worker.address, failed=True)
            finally:
                self.registry.release(worker)


def _worker_error(status: int, content: bytes) -> ApiError:
    """A worker's 4xx (the client's mistake, e.g. context length) passed on as it is."""
    error = json.loads(content or b"{}").get("error", {})
    return ApiError(
        status,
        error.get("message", "bad request"),
        error.get("type", "invalid_request_error"),
        error.get("code"),
    )


def _gen_request(req: SamplingParams, model: str, **fields: object) -> GenerateRequest:
    return GenerateRequest(
        model=model,
        max_tokens=req.max_tokens or DEFAULT_MAX_TOKENS,
        temperature=req.temperature,
        top_p=req.top_p,
        stop=req.stop_list(),
        seed=req.seed,
        stream=req.stream,
        guided_choice=req.guided_choice,
        **fields,
    )


def _usage(final: dict) -> dict:
    p, c = final.get("prompt_tokens", 0), final.get("completion_tokens", 0)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def create_app(controller: Controller) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        await controller.close()

    app = FastAPI(title="vicuna-sky controller", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", [])[1:])
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else "invalid request"
        return JSONResponse(ApiError(400, message).body(), status_code=400)

    # -- workers ---------------------------------------------------------------------------
    @app.post("/workers/register")
    async def register(reg: Registration) -> dict:
        controller.check_secret(reg.secret)
        controller.registry.register(reg)
        return {"ok": True}

    @app.post("/workers/heartbeat")
    async def heartbeat(payload: dict) -> dict:
        controller.check_secret(str(payload.get("secret", "")))
        if not controller.registry.heartbeat(str(payload.get("address"))):
            raise ApiError(404, "unknown worker: register again", code="unknown_worker")
        return {"ok": True}

    @app.post("/workers/drain")
    async def drain(payload: dict) -> dict:
        controller.check_secret(str(payload.get("secret", "")))
        controller.registry.mark(str(payload.get("address")), draining=True)
        return {"ok": True}

    @app.get("/workers")
    async def workers() -> dict:
        reg = controller.registry
        return {
            "workers": [
                w.__dict__ | {"available": w.available(reg.expiry)} for w in reg.workers.values()
            ]
        }

    # -- OpenAI API ------------------------------------------------------------------------
    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        controller.check_key(request)
        return {
            "object": "list",
            "data": [
                {
                    "id": m,
                    "object": "model",
                    "created": 0,
                    "owned_by": "vicuna-sky",
                    "context_length": n,
                }
                for m, n in sorted(controller.registry.models().items())
            ],
        }

    async def respond(gen: GenerateRequest, stream: bool, kind: str) -> object:
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        events = controller.generate(gen)
        first = await anext(events)  # 4xx/5xx before anything is sent are plain HTTP errors

        def choice(text: str, finish: str | None) -> dict:
            if kind == "chat":
                key = "delta" if stream else "message"
                return {
                    "index": 0,
                    key: {"role": "assistant", "content": text},
                    "finish_reason": finish,
                }
            return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}

        obj = {"chat": "chat.completion", "text": "text_completion"}[kind]
        if not stream:
            text, final = "", {}
            async for event in _chain(first, events):
                if "error" in event:
                    raise event["error"]
                text += event.get("text", "")
                final = event if "finish_reason" in event else final
            return {
                "id": rid,
                "object": obj,
                "created": created,
                "model": gen.model,
                "choices": [choice(text, final.get("finish_reason", "stop"))],
                "usage": _usage(final),
            }

        async def sse() -> AsyncIterator[bytes]:
            chunk_obj = obj + ".chunk" if kind == "chat" else obj
            async for event in _chain(first, events):
                if "error" in event:
                    yield f"data: {json.dumps(event['error'].body())}\n\n".encode()
                    break
                finish = event.get("finish_reason")
                body = {
                    "id": rid,
                    "object": chunk_obj,
                    "created": created,
                    "model": gen.model,
                    "choices": [choice(event.get("text", ""), finish)],
                }
                if finish:
                    body["usage"] = _usage(event)
                yield f"data: {json.dumps(body)}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request) -> object:
        controller.check_key(request)
        gen = _gen_request(req, req.model, messages=req.messages)
        return await respond(gen, req.stream, "chat")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> object:
        controller.check_key(request)
        return await respond(_gen_request(req, req.model, prompt=req.prompt), req.stream, "text")

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest, request: Request) -> dict:
        controller.check_key(request)
        texts = [req.input] if isinstance(req.input, str) else req.input
        controller.require_model(req.model)
        tried: set[str] = set()
        refused: ApiError | None = None
        while (worker := controller.registry.pick(req.model, tried)) is not None:
            tried.add(worker.address)
            try:
                status, content = await controller.post(f"{worker.address}/embed", {"input": texts})
                if 400 <= status < 500:
                    # This worker cannot embed (e.g. a vLLM generation worker); another might.
                    refused = _worker_error(status, content)
                    continue
                if status == 200:
                    data = orjson.loads(content)
                    return {
                        "object": "list",
                        "model": req.model,
                        "data": [
                            {"object": "embedding", "index": i, "embedding": v}
                            for i, v in enumerate(data["data"])
                        ],
                        "usage": {"prompt_tokens": data["tokens"], "total_tokens": data["tokens"]},
                    }
                controller.out_of_rotation(worker.address, status)
            except WORKER_FAILURES:
                controller.registry.mark(worker.address, failed=True)
            finally:
                controller.registry.release(worker)
        if refused is not None:
            raise refused
        raise ApiError(503, f"no worker for {req.model!r} is available", kind="server_error")

    return app


async def _chain(first: dict, rest: AsyncIterator[dict]) -> AsyncIterator[dict]:
    yield first
    async for event in rest:
        yield event


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    p = argparse.ArgumentParser(prog="python -m vicuna_sky.serve.controller")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--secret", default="", help="workers must present it to register")
    p.add_argument("--api-key", action="append", default=[], help="accepted Bearer key")
    p.add_argument("--db", type=Path, default=None, help="SQLite file for the worker registry")
    p.add_argument(
        "--expiry-seconds",
        type=float,
        default=3.0,
        help="a worker silent this long leaves rotation",
    )
    args = p.parse_args(argv)
    registry = Registry(args.db, args.expiry_seconds)
    app = create_app(Controller(registry, args.secret, args.api_key))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
