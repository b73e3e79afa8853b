"""SkyServe's own load balancer (skypilot 0.14.1) on this machine, for the proxy layers of
benchmarks/serve_throughput.py: what a SkyPilot user would put in front of replicas instead of
our controller.

Three processes on 127.0.0.1, each as SkyServe runs it or talks to it:
- an OpenAI-speaking echo replica: a fixed chat completion for every request (aiohttp);
- a stand-in for SkyServe's controller: `POST /controller/load_balancer_sync` answers
  `{"replica_info": {<replica url>: {"gpu_type": "unknown"}}}`, which is all the load balancer
  reads of it (sky/serve/load_balancer.py, `_sync_with_controller`);
- `sky.serve.load_balancer.run_load_balancer`, started in a process as sky/serve/service.py
  starts it, with a `TLSCredential` when TLS is on (the service's `tls:` keyfile and
  certfile). It reaches replicas over http whatever its own TLS (replica URLs are http).

The load balancer syncs 5 s after it starts (then every 20 s): `started` waits for its log line
naming the replica. Importing `sky` makes ~/.sky: `HOME` is pointed at a temporary folder first.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections.abc import Callable
from pathlib import Path

CHAT = {
    "id": "chatcmpl-echo",
    "object": "chat.completion",
    "created": 0,
    "model": "echo",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "echo"}, "finish_reason": "stop"}
    ],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}


def _replica(port: int) -> None:
    from aiohttp import web

    answer = json.dumps(CHAT).encode()

    async def chat(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=answer, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


def _controller(port: int, replica: str) -> None:
    from aiohttp import web

    async def sync(request: web.Request) -> web.Response:
        await request.read()  # the load balancer's request timestamps, for autoscaling
        return web.json_response({"replica_info": {replica: {"gpu_type": "unknown"}}})

    app = web.Application()
    app.router.add_post("/controller/load_balancer_sync", sync)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


def _load_balancer(controller: str, port: int, pem: str | None, log: str, home: str) -> None:
    os.environ["HOME"] = home  # before `import sky`, which writes under ~/.sky
    from sky.serve import constants, load_balancer, serve_utils
    from sky.utils import ux_utils

    credential = serve_utils.TLSCredential(keyfile=pem, certfile=pem) if pem else None
    ux_utils.RedirectOutputForProcess(load_balancer.run_load_balancer, log).run(
        controller, port, None, credential, None, constants.DEFAULT_LB_STREAM_TIMEOUT
    )


class SkyServeLB:
    """`with SkyServeLB(workdir, free_port, pem) as lb:` lb.url (through the load balancer) and
    lb.replica (the replica itself); `pem`: key + certificate for the load balancer's TLS."""

    def __init__(
        self, workdir: Path, free_port: Callable[[], int], pem_file: Path | None = None
    ) -> None:
        self.workdir, self.pem_file = workdir, pem_file
        self.ports = [free_port() for _ in range(3)]
        self.replica = f"http://127.0.0.1:{self.ports[0]}"
        scheme = "https" if pem_file else "http"
        self.url = f"{scheme}://127.0.0.1:{self.ports[2]}"
        self.log = workdir / f"skyserve-lb-{scheme}.log"
        self.procs: list[multiprocessing.Process] = []

    def __enter__(self) -> SkyServeLB:
        context = multiprocessing.get_context("spawn")
        home = self.workdir / "home"
        home.mkdir(exist_ok=True)
        controller = f"http://127.0.0.1:{self.ports[1]}"
        pem = str(self.pem_file) if self.pem_file else None
        for target, args in (
            (_replica, (self.ports[0],)),
            (_controller, (self.ports[1], self.replica)),
            (_load_balancer, (controller, self.ports[2], pem, str(self.log), str(home))),
        ):
            process = context.Process(target=target, args=args, daemon=True)
            process.start()
            self.procs.append(process)
        self.started()
        return self

    def started(self, timeout: float = 90.0) -> None:
        """Once the load balancer has synced and names the replica."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log.exists() and f"Available Replica URLs: ['{self.replica}" in (
                self.log.read_text(errors="replace")
            ):
                return
            if not all(p.is_alive() for p in self.procs):
                break
            time.sleep(0.2)
        raise RuntimeError(f"SkyServe's load balancer never synced (log: {self.log})")

    def __exit__(self, *exc: object) -> None:
        for process in self.procs:
            process.kill()
            process.join(5)
