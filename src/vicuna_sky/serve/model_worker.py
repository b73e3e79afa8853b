"""A model worker's state: its backend behind a bounded number of slots, its registration
with the controller, heartbeats and drain (`Worker`), and the one error a generation raises.

Defined apart from the entry module (worker.py, run as `python -m vicuna_sky.serve.worker`):
run as `__main__`, a module's classes are a second copy, and the routes (worker_app.py) would
not catch the errors that copy raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator

import aiohttp

from vicuna_sky.errors import VicunaSkyError
from vicuna_sky.serve.backends import Backend, Finish, Started
from vicuna_sky.serve.metrics import ServingMetrics
from vicuna_sky.serve.protocol import ApiError, GenerateRequest, Registration
from vicuna_sky.serve.tls import pinned

log = logging.getLogger("vicuna_sky.serve.worker")


class Worker:
    def __init__(
        self,
        backend: Backend,
        registration: Registration,
        controller_url: str,
        heartbeat_seconds: float = 1.0,
        drain_seconds: float = 30.0,
        controller_fingerprint: str = "",
    ) -> None:
        self.backend, self.registration = backend, registration
        self.controller_pin = pinned(controller_fingerprint) if controller_fingerprint else True
        """The certificate the controller must show (https): anything else is refused before
        the fleet secret is sent."""
        self.address = registration.address
        """As announced (0.0.0.0: the controller fills in the address it sees us at)."""
        self.controller_url = controller_url.rstrip("/")
        self.heartbeat_seconds, self.drain_seconds = heartbeat_seconds, drain_seconds
        self.slots = asyncio.Semaphore(registration.max_concurrency)
        self.in_flight = 0
        self.draining = False
        self.refused = ""
        """Why the controller's refusals stopped this worker ('' while they have not)."""
        self.stopped = asyncio.Event()
        self.secret = ""
        """The fleet secret: required on the model routes, sent to the controller."""
        self.stuck_seconds = 120.0
        self._progress: dict[int, float] = {}
        self.metrics = ServingMetrics()
        """In-flight generation -> when it last produced something (or started)."""

    @property
    def healthy(self) -> bool:
        """False when a generation has made no progress for `stuck_seconds`: the engine is
        stuck, and the controller fails its requests over."""
        now = time.monotonic()
        return all(now - t < self.stuck_seconds for t in self._progress.values())

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secret}"} if self.secret else {}

    # -- the work --------------------------------------------------------------------------
    async def generate(self, request: GenerateRequest) -> AsyncIterator[bytes]:
        """NDJSON lines of one generation, in a slot (waiting for one counts as queued)."""
        model = request.model
        started = time.monotonic()
        self.metrics.waiting.labels(model).inc()
        try:
            await self.slots.acquire()
        finally:
            self.metrics.waiting.labels(model).dec()
        try:
            # Closed with its reader: a client gone ends the generation now, not at GC.
            async with contextlib.aclosing(self._generate(request, started)) as lines:
                async for line in lines:
                    yield line
        finally:
            self.slots.release()

    async def _generate(self, request: GenerateRequest, started: float) -> AsyncIterator[bytes]:
        model, metrics, last = request.model, self.metrics, None
        self.in_flight += 1
        metrics.running.labels(model).inc()
        key = id(request)
        self._progress[key] = time.monotonic()
        try:
            pieces = 0
            text = ""
            finish, generated, prompt_tokens = None, None, None
            try:
                async for delta in self.backend.generate(request):
                    self._progress[key] = time.monotonic()
                    if isinstance(delta, Started):  # the prompt's size, for usage so far
                        prompt_tokens = delta.prompt_tokens
                        yield (json.dumps({"prompt_tokens": prompt_tokens}) + "\n").encode()
                        continue
                    if isinstance(delta, Finish):
                        finish, generated = delta.reason, delta.tokens
                        prompt_tokens = delta.prompt_tokens
                        continue
                    pieces += 1
                    text += delta
                    now = time.monotonic()
                    if last is None:
                        metrics.ttft.labels(model).observe(now - started)
                    else:
                        metrics.itl.labels(model).observe(now - last)
                    last = now
                    yield (json.dumps({"text": delta}) + "\n").encode()
            except VicunaSkyError as e:  # the request does not fit the model's template
                raise ApiError(400, str(e)) from None
            except (ApiError, asyncio.CancelledError, GeneratorExit):
                raise
            except Exception as e:
                log.exception("generation failed")
                raise GenerationFailed(f"the generation failed: {type(e).__name__}") from e
            if finish is None:  # a backend that does not say: about one delta per token
                limit = request.max_tokens
                finish = "length" if limit is not None and pieces >= limit else "stop"

            def count() -> tuple[int, int]:
                return (
                    prompt_tokens if prompt_tokens is not None else self._count_prompt(request),
                    generated
                    if generated is not None
                    else self.backend.count_tokens(text, special=False),
                )

            # A tokenizer takes milliseconds on a long text: off the event loop, unless nothing
            # is left to count or the backend counts instantly (a thread hop per request).
            instant = getattr(self.backend, "instant_counts", False)
            known = prompt_tokens is not None and generated is not None
            counts = count() if known or instant else await asyncio.to_thread(count)
            yield (
                json.dumps(
                    {
                        "finish_reason": finish,
                        "prompt_tokens": counts[0],
                        "completion_tokens": counts[1],
                    }
                )
                + "\n"
            ).encode()
            metrics.prompt_tokens.labels(model).inc(counts[0])
            metrics.generation_tokens.labels(model).inc(counts[1])
        finally:
            self._progress.pop(key, None)
            self.in_flight -= 1
            metrics.running.labels(model).dec()
            metrics.e2e.labels(model).observe(time.monotonic() - started)

    def _count_prompt(self, request: GenerateRequest) -> int:
        """For a backend that does not say: the prompt's own tokens (a template's wrapping is
        the backend's to count, as hf and vllm do)."""
        if isinstance(request.prompt, list):
            return len(request.prompt)
        text = " ".join(m.content or "" for m in request.messages or []) or request.prompt
        return self.backend.count_tokens(text or "")

    # -- the controller --------------------------------------------------------------------
    async def tell_controller(
        self, client: aiohttp.ClientSession, route: str, body: dict
    ) -> tuple[int, object]:
        """POST to the controller (pinned when https): (status, parsed JSON or text)."""
        async with client.post(
            f"{self.controller_url}/workers/{route}",
            json=body,
            headers=self._auth(),
            ssl=self.controller_pin,
        ) as r:
            text = await r.text()
            with contextlib.suppress(ValueError):
                return r.status, json.loads(text)
            return r.status, text

    async def keep_registered(self) -> None:
        """Register, then heartbeat; register again whenever the controller does not know us
        (it was relaunched: its URL, secret and certificate are the fleet's, so nothing here
        restarts)."""
        timeout = aiohttp.ClientTimeout(total=5.0)
        async with aiohttp.ClientSession(timeout=timeout) as client:
            registered = False
            refusals = 0
            while not self.stopped.is_set():
                refused = ""
                try:
                    if not registered:
                        status, answer = await self.tell_controller(
                            client, "register", self.registration.model_dump()
                        )
                        registered = status == 200 and isinstance(answer, dict)
                        if registered:  # the address the controller reaches us at
                            self.registration.address = answer.get("address", self.address)
                            log.info("registered as %s", self.registration.address)
                        elif status in (400, 403, 409, 422, 429):
                            log.error("the controller refused the registration: %s", answer)
                        if status in (401, 403):
                            refused = f"it answers {status}: this worker's fleet secret is not its"
                    else:
                        status, _ = await self.tell_controller(
                            client,
                            "heartbeat",
                            {
                                "address": self.registration.address,
                                "worker_id": self.registration.worker_id,
                                "in_flight": self.in_flight,
                                "healthy": self.healthy,
                            },
                        )
                        registered = status == 200  # 404: unknown, register again now
                        if not registered:
                            continue
                except aiohttp.ServerFingerprintMismatch:
                    log.error(
                        "the controller at %s shows a certificate other than the pinned one: "
                        "not sending it anything",
                        self.controller_url,
                    )
                    registered = False
                    refused = "it shows a certificate other than the pinned one"
                except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                    log.debug("controller unreachable: %s", e)
                    registered = False
                # A controller that answers but refuses this worker is not this worker's fleet
                # (a relaunch makes neither a new secret nor a new certificate): after a few
                # answers alike, it stops, and its job ends instead of billing a GPU to spin.
                refusals = refusals + 1 if refused else 0
                if refusals >= REFUSALS_TO_STOP:
                    self.refused = (
                        f"the controller at {self.controller_url} refused this worker "
                        f"{refusals} times ({refused}): not retrying"
                    )
                    self.stopped.set()
                    return
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.stopped.wait(), self.heartbeat_seconds)

    async def drain(self, reason: str) -> None:
        """Stop taking work, tell the controller, finish in-flight requests, then stop."""
        if self.draining:
            return
        self.draining = True
        log.warning("draining (%s): %d request(s) in flight", reason, self.in_flight)
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5.0)) as client:
                await self.tell_controller(
                    client,
                    "drain",
                    {
                        "address": self.registration.address,
                        "worker_id": self.registration.worker_id,
                    },
                )
        deadline = time.monotonic() + self.drain_seconds
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.stopped.set()


REFUSALS_TO_STOP = 5
"""Refusals in a row (401/403, another certificate) after which a worker stops for good."""


class GenerationFailed(Exception):
    """The backend raised while generating (the worker stays up; the request ends)."""
