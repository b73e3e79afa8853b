"""The serving fleet of sky/serve-controller.yaml and sky/serve-worker.yaml on the local backend.

The same two tasks the cloud path launches, run the way it runs them: the controller as a local
"cluster", each worker as a local managed job (`LocalRunner`), so a worker killed like a
preempted spot VM is relaunched in a fresh directory with the spec's `job_recovery`, registers
again and is routed to.

With a `Network` in the config, every cluster is a host of its own (localcloud/network.py):
the specs' own ports and bind addresses, the controller's client port in HTTPS (an API key
needed), the workers announcing their own addresses, as on a cloud. On loopback, only what one
machine needs differs: every process gets a free port (the specs' fixed 8000/8001 would
collide), binds 127.0.0.1, and the controller's URL is http://127.0.0.1.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import secrets
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import httpx

from vicuna_sky.errors import VicunaSkyError
from vicuna_sky.launch.fleet_state import FleetState
from vicuna_sky.localcloud.cluster import LocalConfig, LocalRunner
from vicuna_sky.ports import free_port
from vicuna_sky.serve.tls import FLEET_TLS_ENV, trusting

if TYPE_CHECKING:
    import sky

SECRET = "VICUNA_SKY_FLEET_SECRET"


class _Cancelled(KeyboardInterrupt):
    """Ends a runner's recovery loop: LocalRunner.run() turns a KeyboardInterrupt into
    CANCELLED, as `sky jobs cancel` ends a managed job instead of recovering it."""


class _FleetRunner(LocalRunner):
    """A LocalRunner that `cancel()` takes down for good instead of relaunching."""

    cancelled = False

    def _new_attempt(self):
        if self.cancelled:
            raise _Cancelled
        return super()._new_attempt()

    def cancel(self) -> None:
        self.cancelled = True
        self.stop("stopped by user")


@dataclasses.dataclass
class _Job:
    runner: _FleetRunner
    thread: threading.Thread


class LocalSkyFleet:
    """`controller` and `worker` are the loaded tasks (`tasks.load_task`); `workers` managed
    worker jobs named `<name>-worker-<i>` register with the controller."""

    def __init__(
        self,
        controller: sky.Task,
        worker: sky.Task,
        name: str,
        workers: int,
        config: LocalConfig,
        on_event: Callable[[str], None] | None = None,
        spec_ports: bool = False,
        state: FleetState | None = None,
    ) -> None:
        """`spec_ports`: the controller and UI on the spec's ports (8000, 7860) when those are
        free, as a user expects; else (and for tests running fleets side by side) free ones.
        `state`: a fleet launched before (its secret, certificate and ports), to repair."""
        self.name, self.count, self.config = name, workers, config
        self.on_event = on_event or (lambda _m: None)
        self.state = state or FleetState()
        given = controller.secrets.get(SECRET)
        # The fleet's secret when it has one, else the user's (a SkyPilot secret, from the
        # environment), else one made for this fleet.
        self.secret = (
            self.state.secret
            or (given.get_secret_value() if given else "")
            or secrets.token_urlsafe(24)
        )
        self.state.secret = self.secret
        pem, self.fingerprint = self.state.certificate(name)
        self.pem = pem
        self.hosts = config.network is not None
        """Each cluster a host of its own: the specs' ports, addresses and TLS, unchanged."""
        known = self.state.ports
        wanted = {
            "controller": controller.envs.get("CONTROLLER_PORT"),
            "webui": controller.envs.get("WEBUI_PORT"),
            "fleet": controller.envs.get("FLEET_PORT"),
        }
        ports = {
            k: int(p)
            if self.hosts
            else known.get(k) or port_or_free(int(p or 0) if spec_ports else 0)
            for k, p in wanted.items()
        }
        self.state.ports = ports
        self.port, self.webui_port, self.fleet_port = (
            ports["controller"],
            ports["webui"],
            ports["fleet"],
        )
        self._at("127.0.0.1")
        self.controller_task = copy.deepcopy(controller)
        self.controller_task.update_envs(
            {
                "CONTROLLER_PORT": str(self.port),
                "WEBUI_PORT": str(self.webui_port),
                "FLEET_PORT": str(self.fleet_port),
            }
        )
        if not self.hosts:  # one machine: nothing needs to reach it from outside
            self.controller_task.update_envs({"BIND_HOST": "127.0.0.1"})
        self.controller_task.update_secrets({SECRET: self.secret, FLEET_TLS_ENV: pem})
        self.controller_task.name = f"{name}-controller"
        self.worker_task = copy.deepcopy(worker)
        if not self.hosts:
            self.worker_task.update_envs({"BIND_HOST": "127.0.0.1"})
        self.controller: _Job | None = None
        self.workers: list[_Job] = []

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float = 300.0) -> str:
        """Controller, then the workers; returns once every worker has registered."""
        self.start_controller(timeout)
        for i in range(self.count):
            task = copy.deepcopy(self.worker_task)
            task.update_envs(
                {"CONTROLLER_URL": self.worker_url, "CONTROLLER_FINGERPRINT": self.fingerprint}
            )
            if not self.hosts:
                task.update_envs({"WORKER_PORT": str(free_port())})
            task.update_secrets({SECRET: self.secret})
            task.name = f"{self.name}-worker-{i}"
            self.workers.append(self._run(task))
        self.wait_registered(self.count, timeout)
        return self.url

    def start_controller(self, timeout: float = 300.0) -> None:
        """The controller alone (a repair: the workers of the fleet's first launcher register
        with it by themselves, at the same URL, pinning the same certificate)."""
        self.controller = self._run(self.controller_task)
        if self.hosts:
            runner = self.controller.runner
            self._wait(
                lambda: bool(runner.job.attempts and runner.job.attempts[-1].addresses),
                timeout,
                "the controller's host",
            )
            self._at(runner.job.attempts[-1].addresses[0])
        self._wait(lambda: self.registered() is not None, timeout, "the controller to answer")

    def _at(self, address: str) -> None:
        """The controller's URLs at `address`: the client port (HTTPS off loopback, with the
        fleet's certificate, as the controller serves it there) and the fleet port."""
        scheme = "https" if self.hosts else "http"
        self.url = f"{scheme}://{address}:{self.port}"
        self.worker_url = f"https://{address}:{self.fleet_port}"
        """Where workers register: the TLS fleet port, as on a cloud."""

    def stop(self) -> None:
        for job in [*self.workers, *([self.controller] if self.controller else [])]:
            job.runner.cancel()
        for job in [*self.workers, *([self.controller] if self.controller else [])]:
            job.thread.join(30)

    def __enter__(self) -> LocalSkyFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what a test or an operator looks at -------------------------------------------------
    def registered(self) -> list[dict] | None:
        """The controller's worker registry (None while it does not answer), asked on the fleet
        port with its certificate pinned, as the cloud's repair check asks: the secret never
        goes to a port or a peer it does not belong to."""
        try:
            r = httpx.get(
                f"{self.worker_url}/workers",
                headers={"Authorization": f"Bearer {self.secret}"},
                timeout=2.0,
                verify=trusting(self.pem),
            )
        except httpx.HTTPError:
            return None
        return r.json().get("workers", []) if r.status_code == 200 else None

    def healthy_workers(self) -> int:
        """Workers the controller would route to now."""
        return sum(1 for w in self.registered() or [] if _routable(w))

    def wait_registered(self, count: int, timeout: float = 300.0) -> None:
        self._wait(lambda: self.healthy_workers() >= count, timeout, f"{count} worker(s)")

    def _wait(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            for job in [*self.workers, *([self.controller] if self.controller else [])]:
                if not job.thread.is_alive():
                    raise VicunaSkyError(
                        f"local fleet: {job.runner.job.name} ended {job.runner.job.status} "
                        f"while waiting for {what}: see {job.runner.run_dir}"
                    )
            if time.monotonic() > deadline:
                raise VicunaSkyError(f"local fleet: no {what} after {timeout:.0f} s")
            time.sleep(0.2)

    def _run(self, task: sky.Task) -> _Job:
        config = dataclasses.replace(self.config)
        runner = _FleetRunner(task, config, on_event=lambda m: self.on_event(f"{task.name}: {m}"))

        def run() -> None:
            with contextlib.suppress(_Cancelled):
                runner.run()

        thread = threading.Thread(target=run, name=task.name, daemon=True)
        thread.start()
        return _Job(runner, thread)


def port_or_free(wanted: int) -> int:
    """`wanted` if nothing listens on it on 127.0.0.1, else a free port."""
    import socket

    if wanted:
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind(("127.0.0.1", wanted))
            return wanted
    return free_port()


def _routable(worker: dict) -> bool:
    """A registry entry the controller routes to (the registry's own `available`: heartbeating,
    not draining, not failed)."""
    return bool(worker.get("available"))
