"""`python -m vicuna_sky.serve.worker`: one model behind a small HTTP API, registered with a
controller.

The controller calls `POST /generate` (NDJSON: `{"text": delta}` lines, then a final line with
`finish_reason` and token counts), `POST /embed`, `GET /health`. Concurrency is bounded by a
semaphore held in `async with`, so a raising backend can never leak a slot. The worker registers
with the controller, heartbeats every `heartbeat_seconds`, and registers again at once when the
controller says it does not know it (a restarted controller). On SIGTERM or a spot preemption
notice it drains: it tells the controller, refuses new work (503), finishes what it has within
the notice window, and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import time
from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, ORJSONResponse, StreamingResponse

from vicuna_sky.serve.backends import Backend, Finish, load_backend
from vicuna_sky.serve.protocol import ApiError, GenerateRequest, Registration
from vicuna_sky.spot import PreemptionWatcher

log = logging.getLogger("vicuna_sky.serve.worker")


class Worker:
    def __init__(
        self,
        backend: Backend,
        registration: Registration,
        controller_url: str,
        heartbeat_seconds: float = 1.0,
        drain_seconds: float = 30.0,
    ) -> None:
        self.backend, self.registration = backend, registration
        self.controller_url = controller_url.rstrip("/")
        self.heartbeat_seconds, self.drain_seconds = heartbeat_seconds, drain_seconds
        self.slots = asyncio.Semaphore(registration.max_concurrency)
        self.in_flight = 0
        self.draining = False
        self.stopped = asyncio.Event()

    # -- the work --------------------------------------------------------------------------
    async def generate(self, request: GenerateRequest) -> AsyncIterator[bytes]:
        async with self.slots:
            self.in_flight += 1
            try:
                pieces = 0
                text = ""
                finish = None
                async for delta in self.backend.generate(request):
                    if isinstance(delta, Finish):
                        finish = delta.reason
                        continue
                    pieces += 1
                    text += delta
                    yield (json.dumps({"text": delta}) + "\n").encode()
                if finish is None:  # a backend that does not say: about one delta per token
                    finish = "length" if pieces >= request.max_tokens else "stop"
                prompt = " ".join(m.content for m in request.messages or []) or request.prompt
                yield (
                    json.dumps(
                        {
                            "finish_reason": finish,
                            "prompt_tokens": self.backend.count_tokens(prompt or ""),
                            "completion_tokens": self.backend.count_tokens(text),
                        }
                    )
                    + "\n"
                ).encode()
            finally:
                self.in_flight -= 1

    # -- the controller --------------------------------------------------------------------
    async def keep_registered(self) -> None:
        async with httpx.AsyncClient(timeout=5.0) as client:
            registered = False
            while not self.stopped.is_set():
                try:
                    if not registered:
                        r = await client.post(
                            f"{self.controller_url}/workers/register",
                            json=self.registration.model_dump(),
                        )
                        registered = r.status_code == 200
                        if r.status_code == 403:
                            log.error("the controller refused the registration secret")
                    else:
                        r = await client.post(
                            f"{self.controller_url}/workers/heartbeat",
                            json={
                                "address": self.registration.address,
                                "in_flight": self.in_flight,
                                "secret": self.registration.secret,
                            },
                        )
                        registered = r.status_code == 200  # 404: unknown, register again now
                        if not registered:
                            continue
                except httpx.HTTPError as e:
                    log.debug("controller unreachable: %s", e)
                    registered = False
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.stopped.wait(), self.heartbeat_seconds)

    async def drain(self, reason: str) -> None:
        """Stop taking work, tell the controller, finish in-flight requests, then stop."""
        if self.draining:
            return
        self.draining = True
        log.warning("draining (%s): %d request(s) in flight", reason, self.in_flight)
        with contextlib.suppress(httpx.HTTPError):
            async with httpx.AsyncClient(timeout=5.0) as client:
                await client.post(
                    f"{self.controller_url}/workers/drain",
                    json={"address": self.registration.address, "secret": self.registration.secret},
                )
        deadline = time.monotonic() + self.drain_seconds
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.stopped.set()


def create_app(worker: Worker) -> FastAPI:
    app = FastAPI(title="vicuna-sky worker")

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.get("/health")
    async def health() -> dict:
        return {
            "models": worker.registration.models,
            "in_flight": worker.in_flight,
            "draining": worker.draining,
        }

    @app.post("/generate", response_model=None)
    async def generate(request: GenerateRequest) -> StreamingResponse | ORJSONResponse:
        if worker.draining:
            raise ApiError(503, "worker is draining", kind="server_error")
        stream = worker.generate(request)
        if not request.stream:
            text, final = "", {}
            async for line in stream:
                event = json.loads(line)
                text += event.get("text", "")
                final = event if "finish_reason" in event else final
            return ORJSONResponse(final | {"text": text})
        try:
            first = await anext(stream)  # errors before the first token become proper 4xx/5xx
        except StopAsyncIteration:
            first = b""

        async def body() -> AsyncIterator[bytes]:
            if first:
                yield first
            async for chunk in stream:
                yield chunk

        return StreamingResponse(body(), media_type="application/x-ndjson")

    @app.post("/embed")
    async def embed(payload: dict) -> dict:
        texts = payload.get("input") or []
        async with worker.slots:
            return {
                "data": await worker.backend.embed(list(texts)),
                "tokens": sum(worker.backend.count_tokens(t) for t in texts),
            }

    return app


async def serve(args: argparse.Namespace) -> None:
    import uvicorn

    backend = load_backend(args.backend, args.model_path, args.template)
    if args.backend == "echo":
        backend.delay = args.echo_delay
    names = args.model_name or [args.model_path.rstrip("/").split("/")[-1]]
    address = args.worker_address or f"http://{args.host}:{args.port}"
    registration = Registration(
        address=address,
        models=names,
        max_concurrency=args.max_concurrency,
        context_length=backend.context_length,
        secret=args.secret,
    )
    worker = Worker(
        backend, registration, args.controller_url, args.heartbeat_seconds, args.drain_seconds
    )
    server = uvicorn.Server(
        uvicorn.Config(create_app(worker), host=args.host, port=args.port, log_level="warning")
    )
    server.install_signal_handlers = lambda: None  # SIGTERM means drain, handled below
    loop = asyncio.get_running_loop()
    watcher = PreemptionWatcher()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda s=sig: loop.create_task(worker.drain(s.name)))

    async def watch_notices() -> None:
        while not worker.stopped.is_set():
            if await asyncio.to_thread(watcher.check_once):
                await worker.drain(f"{watcher.cloud} preemption notice")
            await asyncio.sleep(watcher.poll_seconds)

    tasks = [asyncio.create_task(worker.keep_registered()), asyncio.create_task(watch_notices())]
    serving = asyncio.create_task(server.serve())
    await worker.stopped.wait()
    server.should_exit = True
    await serving
    for task in tasks:
        task.cancel()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m vicuna_sky.serve.worker")
    p.add_argument("--backend", choices=["hf", "vllm", "echo"], default="hf")
    p.add_argument("--model-path", "--model", dest="model_path", required=True)
    p.add_argument("--model-name", action="append", help="name clients use (repeatable)")
    p.add_argument("--template", default="vicuna_v1.1")
    p.add_argument("--controller-url", "--controller", dest="controller_url", required=True)
    p.add_argument("--secret", default="")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=21002)
    p.add_argument("--worker-address", default="", help="URL the controller reaches us at")
    p.add_argument("--max-concurrency", type=int, default=4)
    p.add_argument("--heartbeat-seconds", type=float, default=1.0)
    p.add_argument("--drain-seconds", type=float, default=30.0)
    p.add_argument(
        "--echo-delay",
        type=float,
        default=0.0,
        help="echo backend: seconds per word (failover tests)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
