"""A real fleet on loopback: a controller process and worker processes (hf on the tiny Llama,
or echo), started and stopped by the tests."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from vicuna_sky.launch.s3_server import free_port

SECRET = "fleet-secret"


class Proc:
    def __init__(self, args: list[str], log: Path) -> None:
        self.args, self.log = args, log
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", *self.args],
            stdout=self.log.open("a"),
            stderr=subprocess.STDOUT,
            env={**os.environ, "VICUNA_SKY_CLOUD": ""},
        )

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class Fleet:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.procs: list[Proc] = []
        self.workers: dict[str, Proc] = {}

    def start_controller(self, *extra: str) -> Proc:
        args = [
            "vicuna_sky.serve.controller",
            "--port",
            str(self.port),
            "--secret",
            SECRET,
            "--db",
            str(self.tmp / "registry.db"),
            *extra,
        ]
        proc = Proc(args, self.tmp / "controller.log")
        self.procs.append(proc)
        self.wait_http(f"{self.url}/v1/models")
        self.controller = proc
        return proc

    def start_worker(
        self, backend: str, model: str, name: str, *extra: str, secret: str = SECRET
    ) -> str:
        port = free_port()
        args = [
            "vicuna_sky.serve.worker",
            "--backend",
            backend,
            "--model-path",
            model,
            "--model-name",
            name,
            "--controller-url",
            self.url,
            "--secret",
            secret,
            "--port",
            str(port),
            "--heartbeat-seconds",
            "0.5",
            *extra,
        ]
        address = f"http://127.0.0.1:{port}"
        proc = Proc(args, self.tmp / f"worker-{port}.log")
        self.procs.append(proc)
        self.workers[address] = proc
        return address

    def wait_http(self, url: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                httpx.get(url, timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise TimeoutError(url)

    def available(self) -> set[str]:
        workers = httpx.get(f"{self.url}/workers", timeout=5).json()["workers"]
        return {w["address"] for w in workers if w["available"]}

    def wait_workers(self, addresses: set[str], timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if addresses <= self.available():
                return
            time.sleep(0.1)
        raise TimeoutError(f"workers {addresses} never registered")

    def client(self, **kw):
        from openai import OpenAI

        return OpenAI(
            base_url=f"{self.url}/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw
        )

    def close(self) -> None:
        for proc in self.procs:
            proc.stop()


@pytest.fixture
def fleet(tmp_path):
    f = Fleet(tmp_path)
    yield f
    f.close()


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory) -> Path:
    from vicuna_sky.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("serve-model") / "tiny-llama")
