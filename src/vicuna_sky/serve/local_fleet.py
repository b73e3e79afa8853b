"""A fleet on this machine: a controller and workers as processes on 127.0.0.1.

Used by the demo, the tests and the benchmarks; the cloud fleet is sky/serve-*.yaml.
"""

from __future__ import annotations

import contextlib
import os
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx

from vicuna_sky.ports import free_port
from vicuna_sky.serve.auth import FLEET_SECRET_ENV
from vicuna_sky.serve.tls import (
    CLIENT_TLS_ENV,
    FLEET_TLS_ENV,
    fingerprint,
    make_certificate,
    trusting,
)


class FleetError(RuntimeError):
    """A process of the fleet exited while it was being started."""


class Proc:
    def __init__(
        self,
        args: list[str],
        log: Path,
        env: dict[str, str] | None = None,
        python: str = sys.executable,
    ) -> None:
        # `python`: another interpreter, for a backend that lives in its own venv (vLLM).
        self.args, self.log, self.env, self.python = args, log, env or {}, python
        self.start()

    def start(self) -> None:
        env = {**os.environ, "VICUNA_SKY_CLOUD": "", **self.env}
        self.proc = subprocess.Popen(
            [self.python, "-m", *self.args],
            stdout=self.log.open("a"),
            stderr=subprocess.STDOUT,
            env=env,
            # Its own process group, so stop() also takes down what it started (vLLM's engine
            # processes outlive a SIGKILLed worker otherwise).
            start_new_session=True,
        )

    def check_alive(self, what: str) -> None:
        """FleetError, with the last line of its log, when the process has exited: nothing is
        gained by waiting for a dead process to answer."""
        if self.proc.poll() is None:
            return
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        lines = text.strip().splitlines()
        last = lines[-1][:300] if lines else "no output"
        raise FleetError(f"{what} exited ({self.proc.returncode}): {last} (log: {self.log})")

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


class LocalFleet:
    def __init__(
        self,
        workdir: Path,
        secret: str = "local-fleet",
        tls: bool = False,
        client_tls: bool = False,
    ) -> None:
        """`tls`: workers register on the controller's TLS fleet port (a certificate made
        here, its fingerprint pinned by the workers) and serve https themselves; `client_tls`:
        the client port serves https too, with that certificate (as off loopback)."""
        self.workdir, self.secret = Path(workdir), secret
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"{'https' if client_tls else 'http'}://127.0.0.1:{self.port}"
        self.tls_pem = make_certificate() if tls or client_tls else ""
        self.client_tls = client_tls
        self.verify: ssl.SSLContext | bool = trusting(self.tls_pem) if client_tls else True
        """How clients check the client port's certificate (httpx's `verify`)."""
        self.fleet_port = free_port() if tls else 0
        self.fingerprint = fingerprint(self.tls_pem) if self.tls_pem else ""
        self.worker_url = f"https://127.0.0.1:{self.fleet_port}" if tls else self.url
        """Where workers reach the controller."""
        self.procs: list[Proc] = []
        self.workers: dict[str, Proc] = {}

    def __enter__(self) -> LocalFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start_controller(
        self, *extra: str, env: dict[str, str] | None = None, python: str = sys.executable
    ) -> Proc:
        """The controller, with the fleet secret (and anything in `env`) in its environment;
        `python`: the interpreter (a wrapper that sets limits first, say)."""
        args = [
            "vicuna_sky.serve.controller",
            "--port",
            str(self.port),
            "--db",
            str(self.workdir / "registry.db"),
            *(["--fleet-port", str(self.fleet_port)] if self.fleet_port else []),
            *extra,
        ]
        env = {FLEET_SECRET_ENV: self.secret, **(env or {})}
        if self.fleet_port:
            env[FLEET_TLS_ENV] = self.tls_pem
        if self.client_tls:
            env[CLIENT_TLS_ENV] = self.tls_pem
        self.controller = Proc(args, self.workdir / "controller.log", env, python)
        self.procs.append(self.controller)
        self.wait_http(f"{self.url}/v1/models", proc=self.controller, verify=self.verify)
        return self.controller

    def start_worker(
        self,
        backend: str,
        model: str,
        name: str,
        *extra: str,
        secret: str | None = None,
        env: dict[str, str] | None = None,
        python: str = sys.executable,
        controller_fingerprint: str | None = None,
    ) -> str:
        """A worker process; returns the address it registers (https with `tls`).
        `controller_fingerprint` overrides the pinned one (None: the fleet's)."""
        port = free_port()
        pin = self.fingerprint if controller_fingerprint is None else controller_fingerprint
        args = [
            "vicuna_sky.serve.worker",
            "--backend",
            backend,
            "--model-path",
            model,
            "--model-name",
            name,
            "--controller-url",
            self.worker_url,
            *(["--controller-fingerprint", pin] if pin else []),
            "--port",
            str(port),
            "--heartbeat-seconds",
            "0.5",
            *extra,
        ]
        address = f"{'https' if self.tls_pem else 'http'}://127.0.0.1:{port}"
        env = {FLEET_SECRET_ENV: self.secret if secret is None else secret, **(env or {})}
        proc = Proc(args, self.workdir / f"worker-{port}.log", env, python)
        self.procs.append(proc)
        self.workers[address] = proc
        return address

    @staticmethod
    def wait_http(
        url: str,
        timeout: float = 60,
        proc: Proc | None = None,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None:
                proc.check_alive("the process serving " + url)
            try:
                httpx.get(url, timeout=1, verify=verify)
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise TimeoutError(url)

    def worker_states(self) -> list[dict]:
        """The controller's registry (`GET /workers`, with the fleet secret)."""
        headers = {"Authorization": f"Bearer {self.secret}"}
        response = httpx.get(f"{self.url}/workers", timeout=5, headers=headers, verify=self.verify)
        response.raise_for_status()
        return response.json()["workers"]

    def available(self) -> set[str]:
        return {w["address"] for w in self.worker_states() if w["available"]}

    def wait_workers(self, addresses: set[str], timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for address in addresses:
                if address in self.workers:
                    self.workers[address].check_alive(f"the worker {address}")
            if controller := getattr(self, "controller", None):
                controller.check_alive("the controller")
            if addresses <= self.available():
                return
            time.sleep(0.1)
        raise TimeoutError(f"workers {addresses} never registered")

    def client(self, **kw: object):  # noqa: ANN201 (openai.OpenAI)
        from openai import OpenAI

        if self.client_tls:
            kw.setdefault("http_client", httpx.Client(verify=self.verify))
        return OpenAI(
            base_url=f"{self.url}/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw
        )

    def close(self) -> None:
        for proc in self.procs:
            proc.stop()
