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
import logging
import secrets
import signal
import sys
from pathlib import Path

from vicuna_sky.serve.auth import (
    FLEET_SECRET_ENV,
    MAX_BODY_BYTES,
    ConfigError,
    is_loopback,
    read_secret,
    require_secret_off_loopback,
)
from vicuna_sky.serve.backends.load import load_backend
from vicuna_sky.serve.connections import raise_open_files
from vicuna_sky.serve.http_server import (
    MAX_CONNECTIONS,
    run_event_loop,
    server_config,
)
from vicuna_sky.serve.model_worker import Worker
from vicuna_sky.serve.protocol import Registration
from vicuna_sky.serve.tls import TlsError, make_certificate, pinned, server_files
from vicuna_sky.serve.tls import fingerprint as tls_fingerprint
from vicuna_sky.spot import PreemptionWatcher

log = logging.getLogger("vicuna_sky.serve.worker")


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
    from vicuna_sky.serve.worker_app import create_app

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
    if worker.refused:  # not retryable: the job ends (sky/serve-worker.yaml recovers only 75)
        print(f"error: {worker.refused}", file=sys.stderr)
        sys.exit(3)


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
