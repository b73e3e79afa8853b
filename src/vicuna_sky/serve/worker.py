"""`python -m vicuna_sky.serve.worker`: one model behind a small HTTP API, registered with a
controller.

The controller calls `POST /generate` (NDJSON: `{"text": delta}` lines, then a final line with
`finish_reason` and token counts, or an `{"error": ...}` line when the generation fails after it
began), `POST /embed`, `GET /health`; both model routes require the fleet secret
(VICUNA_SKY_FLEET_SECRET or --secret-file), and a worker reachable from other machines refuses
to start without one. Concurrency is bounded by a semaphore held in `async with`, so a raising
backend can never leak a slot. A request the template cannot render is the client's (400); a
generation that raises ends its request with an error and frees its slot. The worker registers
with the controller, heartbeats every `heartbeat_seconds` (saying whether it is healthy: a
generation with no progress for `stuck_seconds` means its engine is stuck), and registers again
at once when the controller does not know it (a restarted controller). On SIGTERM or a spot
preemption notice it drains: it tells the controller, refuses new work (503), finishes what it
has within the notice window, and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import secrets
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp

from vicuna_sky.errors import VicunaSkyError
from vicuna_sky.serve.auth import (
    FLEET_SECRET_ENV,
    MAX_BODY_BYTES,
    ConfigError,
    is_loopback,
    read_secret,
    require_secret_off_loopback,
)
from vicuna_sky.serve.backends import Backend, Finish, Started, load_backend
from vicuna_sky.serve.connections import raise_open_files
from vicuna_sky.serve.http_server import (
    MAX_CONNECTIONS,
    run_event_loop,
    server_config,
)
from vicuna_sky.serve.metrics import ServingMetrics
from vicuna_sky.serve.protocol import ApiError, GenerateRequest, Registration
from vicuna_sky.serve.tls import TlsError, make_certificate, pinned, server_files
from vicuna_sky.serve.tls import fingerprint as tls_fingerprint
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
            while not self.stopped.is_set():
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
                except (aiohttp.ClientError, asyncio.TimeoutError) as e:
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


class GenerationFailed(Exception):
    """The backend raised while generating (the worker stays up; the request ends)."""


async def serve(args: argparse.Namespace) -> None:
    import uvicorn

    from vicuna_sky.models import resolve_model_path

    if args.backend != "echo":  # a built-in name (smollm2-135m) is made once, in the cache
        args.model_path = resolve_model_path(args.model_path)
    backend = load_backend(args.backend, args.model_path, args.template)
    if args.backend == "echo":
        backend.delay = args.echo_delay
    names = args.model_name or [args.model_path.rstrip("/").split("/")[-1]]
    address = args.worker_address or f"http://{args.host}:{args.port}"
    tls: tuple[str, str] | None = None
    fingerprint = ""
    if args.controller_url.startswith("https://"):
        # A fleet over TLS: serve https with a certificate of our own, made now; the
        # controller learns its fingerprint from the registration and pins it.
        pem = make_certificate("vicuna-sky worker")
        tls = server_files(pem)
        fingerprint = tls_fingerprint(pem)
        address = "https://" + address.split("://", 1)[-1]
    registration = Registration(
        address=address,
        worker_id=secrets.token_hex(12),
        models=names,
        max_concurrency=args.max_concurrency,
        context_length=backend.context_length,
        tls_fingerprint=fingerprint,
    )
    worker = Worker(
        backend,
        registration,
        args.controller_url,
        args.heartbeat_seconds,
        args.drain_seconds,
        controller_fingerprint=args.controller_fingerprint,
    )
    worker.secret, worker.stuck_seconds = args.secret, args.stuck_seconds
    from vicuna_sky.serve.worker_app import create_app  # it imports this module

    app = create_app(worker, args.max_body_bytes)
    app.keyless = not worker.secret  # on loopback only (require_secret_off_loopback)
    before, after = raise_open_files(MAX_CONNECTIONS + 256)
    log.info("open files: %d (raised from %d)", after, before)
    server = uvicorn.Server(server_config(app, args.host, args.port, tls=tls))
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


def require_pinned_controller(args: argparse.Namespace) -> None:
    """An https controller is trusted by its pinned fingerprint alone (no CA vouches for a
    fleet's certificate); a worker other machines reach talks to its controller over TLS."""
    https = args.controller_url.startswith("https://")
    if https and not args.controller_fingerprint:
        raise ConfigError(
            "an https controller needs its certificate's fingerprint: --controller-fingerprint "
            "(the launcher passes the fleet's)"
        )
    if args.controller_fingerprint:
        if not https:
            raise ConfigError("--controller-fingerprint needs an https:// --controller-url")
        pinned(args.controller_fingerprint)
    if not https and not is_loopback(args.host):
        raise ConfigError(
            f"the worker on {args.host} is reachable from other machines: its controller URL "
            "must be https (the fleet port) so prompts and the fleet secret travel over TLS"
        )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m vicuna_sky.serve.worker", allow_abbrev=False)
    p.add_argument("--backend", choices=["hf", "vllm", "echo"], default="hf")
    p.add_argument("--model-path", "--model", dest="model_path", required=True)
    p.add_argument("--model-name", action="append", help="name clients use (repeatable)")
    p.add_argument("--template", default="vicuna_v1.1")
    p.add_argument("--controller-url", "--controller", dest="controller_url", required=True)
    p.add_argument(
        "--controller-fingerprint",
        default="",
        help="SHA-256 of the controller's certificate (an https controller URL needs it)",
    )
    p.add_argument(
        "--secret-file", type=Path, default=None, help=f"fleet secret (else ${FLEET_SECRET_ENV})"
    )
    p.add_argument(
        "--stuck-seconds",
        type=float,
        default=120.0,
        help="a generation with no progress this long makes the worker report itself unhealthy",
    )
    p.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES)
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
    try:
        args.secret = read_secret(args.secret_file, FLEET_SECRET_ENV)
        require_secret_off_loopback(args.host, args.secret, "the worker")
        require_pinned_controller(args)
        Registration(
            address=args.worker_address or f"http://{args.host}:{args.port}",
            worker_id="x" * 8,
            models=args.model_name or ["m"],
            max_concurrency=args.max_concurrency,
        )
    except (ConfigError, TlsError, ValueError) as e:
        print(f"error: {str(e).splitlines()[0] if isinstance(e, ConfigError) else e}",
              file=sys.stderr)  # fmt: skip
        sys.exit(2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    run_event_loop(serve(args))


if __name__ == "__main__":
    main()
