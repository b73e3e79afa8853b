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
The hop itself (picking, guarding reads, failing over) is serve/hop.py; here, who may call what.

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
import ipaddress
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from vicuna_sky.serve.answers import respond, unless_disconnected
from vicuna_sky.serve.auth import (
    bearer,
    is_loopback,
    matches,
    read_secret,
    read_secrets,
)
from vicuna_sky.serve.connections import vouch
from vicuna_sky.serve.hop import WorkerHop
from vicuna_sky.serve.http_server import add_error_handlers, api_app, dependency, json_post
from vicuna_sky.serve.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    GenerateRequest,
    Registration,
    SamplingParams,
    check_worker_address,
)
from vicuna_sky.serve.registry import Registry
from vicuna_sky.serve.structured import AnswerShape, answer_shape
from vicuna_sky.serve.tls import CLIENT_TLS_ENV, FLEET_TLS_ENV, TlsError, server_files


class Controller(WorkerHop):
    """The hop, and who may use it: clients with an API key, workers with the fleet secret,
    admins with either."""

    def __init__(
        self,
        registry: Registry,
        secret: str,
        api_keys: list[str],
        admin_keys: list[str] | None = None,
        *,
        require_tls: bool = False,
        **timeouts: float,
    ) -> None:
        super().__init__(registry, secret, **timeouts)
        self.require_tls = require_tls
        """Workers register over TLS only (the fleet port), and are reached over https with
        their certificate pinned: the fleet secret and prompts never travel in clear."""
        self.api_keys, self.admin_keys = list(api_keys), list(admin_keys or [])

    # -- who may do what -------------------------------------------------------------------
    def check_key(self, request: Request) -> None:
        if not self.api_keys:
            return
        if not matches(bearer(request), self.api_keys):
            raise ApiError(401, "invalid API key", code="invalid_api_key")
        vouch(request.scope)

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
        if self.secret:
            vouch(request.scope)  # a worker's heartbeats: never pushed out by strangers

    def check_admin(self, request: Request) -> None:
        """The worker list (addresses) and the schema: the fleet secret or an admin key."""
        allowed = [s for s in [self.secret, *self.admin_keys] if s]
        if allowed and not matches(bearer(request), allowed):
            raise ApiError(401, "the fleet secret or an admin key is required", code="unauthorized")
        if allowed:
            vouch(request.scope)

    def check_caller(self, request: Request) -> None:
        """Whoever the route is for: workers on /workers/, clients elsewhere."""
        if request.url.path.startswith("/workers/"):
            self.check_worker(request)
        elif request.url.path.startswith("/admin/"):
            self.check_admin(request)
        else:
            self.check_key(request)


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
    address = check_worker_address(urlunsplit((url.scheme, netloc, "", "", "")))
    return reg.model_copy(update={"address": address})


def _known_address(payload: dict) -> str:
    """A heartbeat's or a drain's address, spelled as registrations are (or as given, which
    then names no worker)."""
    address = str(payload.get("address"))
    try:
        return check_worker_address(address)
    except ValueError:
        return address


def create_app(controller: Controller, max_body: int | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        watcher = asyncio.create_task(controller.watch_workers())
        yield
        watcher.cancel()
        await controller.close()

    app = api_app("vicuna-sky controller", max_body, lifespan=lifespan)

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
            _known_address(payload),
            str(payload.get("worker_id")),
            healthy=payload.get("healthy", True) is not False,
        )
        if not known:
            raise ApiError(404, "unknown worker: register again", code="unknown_worker")
        return {"ok": True}

    @app.post("/workers/drain", dependencies=worker_only)
    async def drain(payload: dict) -> dict:
        address, worker_id = _known_address(payload), str(payload.get("worker_id"))
        if not controller.registry.mark(address, draining=True, worker_id=worker_id):
            raise ApiError(404, "unknown worker", code="unknown_worker")
        controller.metrics.drains.inc()
        return {"ok": True}

    @app.post("/admin/forget-worker", dependencies=admin_only)
    async def forget_worker(payload: dict) -> dict:
        """An operator's word that an address belongs to nobody now: a worker relaunched there
        with a new certificate registers at once, without waiting for the old one to be
        forgotten."""
        address = _known_address(payload)
        if not controller.registry.forget_worker(address):
            raise ApiError(404, "unknown worker", code="unknown_worker")
        controller.client.forget(address)
        return {"ok": True, "address": address}

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
        return await unless_disconnected(request, controller.embed(req))

    # The routes every prompt takes, lean.
    json_post(app, "/v1/embeddings", EmbeddingRequest, controller.check_key, embeddings)
    json_post(app, "/v1/completions", CompletionRequest, controller.check_key, completions)
    json_post(app, "/v1/chat/completions", ChatCompletionRequest, controller.check_key, chat)

    return app


def main(argv: list[str] | None = None) -> None:

    from vicuna_sky.serve.auth import (
        ADMIN_KEYS_ENV,
        API_KEYS_ENV,
        FLEET_SECRET_ENV,
        MAX_BODY_BYTES,
        PUBLIC_ENV,
        ConfigError,
        is_loopback,
        require_secret_off_loopback,
    )
    from vicuna_sky.serve.connections import raise_open_files
    from vicuna_sky.serve.http_server import (
        FLEET_PER_ADDRESS,
        MAX_CONNECTIONS,
        run_event_loop,
        serve_listeners,
        server_config,
    )

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
        "--client-tls-file",
        type=Path,
        default=None,
        help=f"the client port's key + certificate PEM (else ${CLIENT_TLS_ENV}; off loopback, "
        "else the fleet's)",
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
    p.add_argument(
        "--request-timeout",
        type=float,
        default=600.0,
        help="seconds a worker has for a whole non-streamed answer before another is asked",
    )
    p.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES)
    p.add_argument(
        "--max-connections",
        type=int,
        default=MAX_CONNECTIONS,
        help="open connections per port; past them, the oldest not to have shown a key goes",
    )
    p.add_argument(
        "--behind-tls-proxy",
        action="store_true",
        help="plain HTTP on the client port off loopback, for a proxy that terminates TLS in "
        "front of it (SkyServe's load balancer with service.tls reaches replicas over http)",
    )
    p.add_argument(
        "--public",
        action="store_true",
        help="serve clients without API keys off loopback (an open endpoint, on purpose); "
        f"also {PUBLIC_ENV}=1, as the specs in sky/ pass it",
    )
    args = p.parse_args(argv)
    args.public = args.public or os.environ.get(PUBLIC_ENV, "") == "1"
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
        # An operator's certificate is served wherever the port is; the fleet's off loopback.
        client_tls = tls_files(args.client_tls_file, CLIENT_TLS_ENV)
        if client_tls is None and not is_loopback(args.host) and not args.behind_tls_proxy:
            client_tls = tls
            if client_tls is None:
                raise ConfigError(
                    f"the client port on {args.host} is reachable from other machines: give it "
                    f"a certificate ({CLIENT_TLS_ENV}, --client-tls-file, or the fleet's with "
                    "--fleet-port) so keys and prompts never cross the network in clear"
                )
    except (ConfigError, TlsError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    listening = 2 if tls is not None else 1
    wanted = listening * args.max_connections + args.max_workers + 256
    before, after = raise_open_files(wanted)
    if after < wanted:
        print(
            f"warning: open files limited to {after} (raised from {before}), under the "
            f"{wanted} the connection budgets may need: lower --max-connections",
            file=sys.stderr,
        )
    else:
        print(f"open files: {after} (raised from {before})", file=sys.stderr)
    registry = Registry(args.db, args.expiry_seconds, args.forget_seconds, args.max_workers)
    controller = Controller(
        registry,
        secret,
        api_keys,
        admin_keys,
        first_token_timeout=args.first_token_timeout,
        inter_token_timeout=args.inter_token_timeout,
        request_timeout=args.request_timeout,
        require_tls=tls is not None,
    )
    app = create_app(controller, args.max_body_bytes)
    app.keyless = not api_keys and is_loopback(args.host)
    listeners = [server_config(app, args.host, args.port, args.max_connections, tls=client_tls)]
    if tls is not None:
        listeners.append(
            server_config(
                app,
                args.host,
                args.fleet_port,
                args.max_connections,
                # Strangers can reach it from anywhere: none may hold many of its sockets.
                per_address=FLEET_PER_ADDRESS,
                tls=tls,
                lifespan="off",  # the app's startup and shutdown run once, with the first
            )
        )
    run_event_loop(serve_listeners(listeners))


def fleet_tls(path: Path | None, fleet_port: int) -> tuple[str, str] | None:
    """The fleet port's certificate files, or None when there is no fleet port: then workers
    talk plain HTTP, and only from this machine (a SkyServe replica's own worker)."""
    from vicuna_sky.serve.auth import ConfigError

    if not fleet_port:
        return None  # workers on this machine only (Controller.check_worker, register)
    files = tls_files(path, FLEET_TLS_ENV)
    if files is None:
        raise ConfigError(
            f"--fleet-port needs the fleet's TLS key and certificate ({FLEET_TLS_ENV} or "
            "--tls-file)"
        )
    return files


def tls_files(path: Path | None, env: str) -> tuple[str, str] | None:
    """(certfile, keyfile) of the PEM in `path`, else in the environment variable `env`; None
    when neither holds one."""
    from vicuna_sky.serve.auth import ConfigError

    if path is not None:
        try:
            pem = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read the TLS file {path}: {e}") from None
    else:
        pem = os.environ.get(env, "")
    return server_files(pem) if pem.strip() else None


if __name__ == "__main__":
    main()
