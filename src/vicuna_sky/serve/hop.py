"""The controller's hop to its workers: a prompt to the least-loaded worker in rotation, its
answer back, and failover when the worker breaks (what counts as whose failure: see
serve/controller.py). Every read from a worker is guarded: by a deadline, and by the worker's
heartbeats.
"""

from __future__ import annotations

import asyncio
import base64
import struct
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import orjson

from vicuna_sky.serve.cancel import took_back
from vicuna_sky.serve.hop_client import HopClient, HopError
from vicuna_sky.serve.metrics import FleetMetrics
from vicuna_sky.serve.protocol import ApiError, EmbeddingRequest, GenerateRequest
from vicuna_sky.serve.registry import Registry

T = TypeVar("T")


class WorkerFailed(Exception):
    """The worker is broken for this request (the reason is the message)."""


class WorkerHop:
    """Prompts to the workers and their answers back: picking one, pinning its certificate,
    guarding every read, failing over."""

    def __init__(
        self,
        registry: Registry,
        secret: str,
        *,
        first_token_timeout: float = 120.0,
        inter_token_timeout: float = 60.0,
        request_timeout: float = 600.0,
    ) -> None:
        self.registry, self.secret = registry, secret
        self.first_token_timeout = first_token_timeout
        self.inter_token_timeout = inter_token_timeout
        self.request_timeout = request_timeout
        """A whole non-streamed answer (a hung worker is caught sooner by its heartbeats)."""
        self.client = HopClient(secret)
        self.metrics = FleetMetrics()
        self._reading: dict[str, set[asyncio.Task]] = {}
        """The tasks waiting on each worker's answer: cancelled when it is found dead or
        unhealthy, so that their requests fail over."""
        self._abandoned: dict[asyncio.Task, str] = {}
        """Tasks cancelled because their worker failed them (dead, or too slow), and why: not
        by their client, nor by a shutdown."""

    async def close(self) -> None:
        self.client.close()

    def no_worker(self, model: str, tried: set[str]) -> ApiError:
        """Why no worker was picked for `model`: none serves it (404), or none is left (503)."""
        if not tried:
            what = f"the model {model!r} does not exist or has no worker"
            return ApiError(404, what, code="model_not_found")
        return ApiError(503, f"no worker for {model!r} is available", kind="server_error")

    # -- failing over ------------------------------------------------------------------------
    async def watch_workers(self, every: float = 0.2) -> None:
        """Fail over the requests in flight to a worker that stopped heartbeating or says it is
        unhealthy, and forget workers long gone."""
        while True:
            for address, tasks in list(self._reading.items()):
                if tasks and not self.registry.alive(address):
                    for task in list(tasks):
                        self._abandon(task, "the worker stopped heartbeating or is unhealthy")
            for address in self.registry.forget_expired():
                self.client.forget(address)
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
        # One look-up of the loop: on Python 3.11 each one is a getpid() system call.
        loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        assert task is not None
        reading = self._reading.setdefault(address, set())
        reading.add(task)
        timer = None
        if timeout is not None:
            why = f"no answer within {timeout:g} s"
            timer = loop.call_later(timeout, self._abandon, task, why)
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
        tried: set[str] = set()
        sent = ""
        prompt_tokens: int | None = None
        # Deltas already sent (about one per token): a continuation may only use the rest of
        # max_tokens, and the usage it reports is added to them.
        pieces = 0
        server_errors = 0
        request = gen.model_dump()
        while True:
            worker = self.registry.pick(gen.model, tried)
            if worker is None:
                if sent:
                    what = "the worker failed mid-answer and no other worker could continue it"
                    yield {"error": ApiError(503, what, kind="server_error")}
                    return
                raise self.no_worker(gen.model, tried)
            tried.add(worker.address)
            carried = pieces
            left = None if gen.max_tokens is None else gen.max_tokens - carried
            if left is not None and left <= 0:
                self.registry.release(worker)
                yield {"finish_reason": "length", "completion_tokens": carried}
                return
            payload = request | {"prefix": sent, "max_tokens": left}
            answered = False  # a whole answer: the worker's failure back-off starts over
            try:
                # A worker answers once it has its first token (streamed) or the whole answer:
                # waiting for it is already a read that a hung worker must not hold up forever.
                # Redirects are not followed: a worker answers itself, or is broken.
                # A whole answer is one guarded read.
                opening = self.client.post(
                    worker.address,
                    "/generate",
                    encoded(payload),
                    worker.tls_fingerprint,
                    whole=not gen.stream,
                )
                # A stream's headers come once the worker has a slot for it and has started:
                # the wait before is its queue, which is no failure. A worker that makes no
                # progress meanwhile is caught by its heartbeats (its engine stuck, its
                # process gone), not by a deadline that a busy worker would miss.
                wait = None if gen.stream else self.request_timeout
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
                        final = _final(await r.read())
                        answered = True
                        yield {"text": final.pop("text")}
                        yield final
                        return
                    timeout = self.first_token_timeout
                    while True:
                        raw = await self.guarded(worker.address, r.readline(), timeout)
                        if not raw:
                            raise WorkerFailed("the stream ended without its final line")
                        event = _event(raw)
                        if event is None:
                            continue
                        if "text" in event:  # the first token is in: the next is due sooner
                            timeout = self.inter_token_timeout
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
                            # This worker's count after the pieces carried over; a worker
                            # that gives none is counted by its pieces, as the carried ones.
                            count = event.get("completion_tokens", pieces - carried)
                            event["completion_tokens"] = count + carried
                            answered = True
                            yield event
                            return
                        yield event
            except (WorkerFailed, HopError, ValueError):
                self.registry.mark(worker.address, failed=True)
                self.metrics.requests.labels(gen.model, worker.address, "failed").inc()
                self.metrics.failovers.labels(gen.model).inc()
            finally:
                self.registry.release(worker, answered)

    # -- embeddings --------------------------------------------------------------------------
    async def embed(self, req: EmbeddingRequest) -> dict:
        """Embeddings from a worker of `req.model` that makes them (failover as `generate`)."""
        texts = req.inputs()
        tried: set[str] = set()
        refused: ApiError | None = None
        while (worker := self.registry.pick(req.model, tried)) is not None:
            tried.add(worker.address)
            answered = False
            try:
                body = encoded({"input": texts})
                opening = self.client.post(
                    worker.address, "/embed", body, worker.tls_fingerprint, whole=True
                )
                async with await self.guarded(worker.address, opening, self.request_timeout) as r:
                    content = await r.read()
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
                    answered = True
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
                    self.registry.mark(worker.address, draining=True)
            except (WorkerFailed, HopError, ValueError, KeyError):
                self.registry.mark(worker.address, failed=True)
            finally:
                self.registry.release(worker, answered)
        if refused is not None:
            raise refused
        raise self.no_worker(req.model, tried)


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
