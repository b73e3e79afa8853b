"""The fleet across machines: the controller and a worker each in a network namespace of their
own, and the client outside both, on a bridge made here (198.18.0.0/24: RFC 2544's benchmark
range, no route off it), as on three hosts. Every port then faces another machine: the client
port and the fleet port serve TLS only, the worker serves https with a certificate of its own,
and nothing answers without its credential. Needs root and `ip` (skipped otherwise)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import openai
import pytest

from vicuna_sky.serve.auth import API_KEYS_ENV, FLEET_SECRET_ENV
from vicuna_sky.serve.local_fleet import LocalFleet, Proc
from vicuna_sky.serve.tls import FLEET_TLS_ENV, fingerprint, make_certificate, trusting

from .conftest import QUESTION, SECRET

KEY = "sk-across-machines"
CLIENT, CONTROLLER, WORKER = "198.18.0.1", "198.18.0.10", "198.18.0.11"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def hosts(tmp_path):
    """Two namespaces (controller, worker) on a bridge with this machine at CLIENT; yields, for
    each, a python that runs in it."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 (ip netns)")
    tag = uuid.uuid4().hex[:6]
    bridge, made, links = f"vsb{tag}", [], []
    try:
        ip("link", "add", bridge, "type", "bridge")
    except subprocess.CalledProcessError as e:
        pytest.skip(f"cannot make a bridge here: {e.stderr.decode().strip()}")
    pythons = {}
    try:
        ip("addr", "add", f"{CLIENT}/24", "dev", bridge)
        ip("link", "set", bridge, "up")
        for role, address in (("controller", CONTROLLER), ("worker", WORKER)):
            ns, outside, inside = f"vs{role[0]}{tag}", f"vs{role[0]}{tag}a", f"vs{role[0]}{tag}b"
            ip("netns", "add", ns)
            made.append(ns)
            ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            links.append(outside)
            ip("link", "set", inside, "netns", ns)
            ip("link", "set", outside, "master", bridge, "up")
            ip("-n", ns, "addr", "add", f"{address}/24", "dev", inside)
            ip("-n", ns, "link", "set", inside, "up")
            ip("-n", ns, "link", "set", "lo", "up")
            wrapper = tmp_path / f"python-{role}"
            wrapper.write_text(f'#!/bin/sh\nexec ip netns exec {ns} {sys.executable} "$@"\n')
            wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
            pythons[role] = str(wrapper)
        yield pythons
    finally:
        for link in [*links, bridge]:  # a veth goes with its pair's namespace, not always at once
            subprocess.run(["ip", "link", "del", link], capture_output=True)
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_a_fleet_on_three_machines_speaks_tls_with_credentials_only(hosts, tmp_path: Path):
    pem = make_certificate()
    controller = Proc(
        [
            "vicuna_sky.serve.controller",
            *("--host", "0.0.0.0", "--port", "8000", "--fleet-port", "8001"),
            *("--db", str(tmp_path / "registry.db")),
        ],
        tmp_path / "controller.log",
        {FLEET_SECRET_ENV: SECRET, FLEET_TLS_ENV: pem, API_KEYS_ENV: KEY},
        python=hosts["controller"],
    )
    worker = Proc(
        [
            "vicuna_sky.serve.worker",
            *("--backend", "echo", "--model-path", "echo", "--model-name", "echo"),
            *("--controller-url", f"https://{CONTROLLER}:8001"),
            *("--controller-fingerprint", fingerprint(pem)),
            *("--host", "0.0.0.0", "--port", "8000"),
            *("--worker-address", f"https://{WORKER}:8000", "--heartbeat-seconds", "0.5"),
        ],
        tmp_path / "worker.log",
        {FLEET_SECRET_ENV: SECRET},
        python=hosts["worker"],
    )
    try:
        url, verify = f"https://{CONTROLLER}:8000", trusting(pem)
        LocalFleet.wait_http(f"{url}/v1/models", proc=controller, verify=verify)
        client = openai.OpenAI(
            base_url=f"{url}/v1", api_key=KEY, http_client=httpx.Client(verify=verify)
        )
        deadline = time.monotonic() + 60
        while not (served := [m.id for m in client.models.list()]):
            worker.check_alive("the worker")
            assert time.monotonic() < deadline, "the worker never registered"
            time.sleep(0.2)
        assert served == ["echo"]
        # The controller reached the worker across the bridge, over https, and back.
        answer = client.chat.completions.create(model="echo", messages=QUESTION, max_tokens=8)
        assert answer.choices[0].message.content == "echo: hello there"

        # No key, a worker's secret on the client port, the wrong certificate, plain http.
        assert httpx.get(f"{url}/v1/models", verify=verify).status_code == 401
        with pytest.raises(httpx.ConnectError):  # a certificate other than the pinned one
            httpx.get(f"{url}/v1/models", verify=trusting(make_certificate()))
        with pytest.raises(httpx.HTTPError):  # TLS only: plain HTTP gets no answer
            httpx.get(f"http://{CONTROLLER}:8000/v1/models", timeout=5)
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://{CONTROLLER}:8001/workers", timeout=5)
        # The fleet port takes the fleet secret only; the worker too, on its own https port.
        register = httpx.post(
            f"https://{CONTROLLER}:8001/workers/register",
            json={},
            headers={"Authorization": f"Bearer {KEY}"},
            verify=verify,
        )
        assert register.status_code in (401, 403)
        no_secret = httpx.post(
            f"https://{WORKER}:8000/generate",
            json={"model": "echo", "prompt": "hi"},
            verify=False,
        )
        assert no_secret.status_code in (401, 403)
    finally:
        worker.stop()
        controller.stop()
