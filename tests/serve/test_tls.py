"""Controller and workers over TLS on loopback: the controller's certificate pinned by the
workers, each worker's certificate pinned by the controller (vicuna_sky.serve.tls)."""

import os
import ssl
import subprocess
import sys
import time

import httpx
import pytest

from vicuna_sky.serve.auth import FLEET_SECRET_ENV
from vicuna_sky.serve.local_fleet import LocalFleet
from vicuna_sky.serve.tls import (
    FLEET_TLS_ENV,
    TlsError,
    fingerprint,
    make_certificate,
    parse_fingerprint,
    server_files,
)

SECRET = "fleet-secret"
WRONG_PIN = "ab" * 32


@pytest.fixture(scope="module")
def tls_fleet(tmp_path_factory):
    """A controller with a TLS fleet port and one echo worker that knows its fingerprint."""
    with LocalFleet(tmp_path_factory.mktemp("tls-fleet"), SECRET, tls=True) as fleet:
        fleet.start_controller()
        fleet.good = fleet.start_worker("echo", "echo", "echo")
        fleet.wait_workers({fleet.good})
        yield fleet


def registration(address: str, **extra: object) -> dict:
    return {
        "address": address,
        "worker_id": "a-worker-id",
        "models": ["m"],
        "max_concurrency": 1,
        **extra,
    }


def test_prompts_reach_the_worker_over_tls(tls_fleet):
    assert tls_fleet.good.startswith("https://")
    answer = tls_fleet.client().chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "over tls"}]
    )
    assert answer.choices[0].message.content == "echo: over tls"
    (entry,) = [w for w in tls_fleet.worker_states() if w["address"] == tls_fleet.good]
    assert len(entry["tls_fingerprint"]) == 64  # pinned by the controller on every request


def test_a_worker_that_does_not_know_the_fingerprint_is_refused(tls_fleet):
    address = tls_fleet.start_worker("echo", "echo", "stranger", controller_fingerprint=WRONG_PIN)
    deadline = time.monotonic() + 30
    proc = tls_fleet.workers[address]
    log = proc.log
    while "other than the pinned one" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "other than the pinned one" in log.read_text()
    assert address not in {w["address"] for w in tls_fleet.worker_states()}
    assert "stranger" not in {m.id for m in tls_fleet.client().models.list().data}
    # Not its fleet's controller: after a few refusals the worker stops for good (exit 3, which
    # sky/serve-worker.yaml does not recover), instead of a spot GPU spinning on it.
    assert proc.proc.wait(timeout=30) == 3
    last = log.read_text().strip().splitlines()[-1]
    assert last.startswith("error: the controller at") and "not retrying" in last


def test_a_worker_with_another_fleets_secret_stops_and_an_unreachable_controller_is_waited_for(
    tls_fleet,
):
    refused = tls_fleet.start_worker("echo", "echo", "outsider", secret="another-fleets-secret")
    proc = tls_fleet.workers[refused]
    assert proc.proc.wait(timeout=30) == 3
    last = proc.log.read_text().strip().splitlines()[-1]
    assert "refused this worker 5 times (it answers 403" in last, last
    # A controller that does not answer at all (relaunching, say) is waited for: no refusal.
    patient = unregistered_worker(tls_fleet, "patient")
    time.sleep(5)  # ten heartbeats' worth
    assert tls_fleet.workers[patient].proc.poll() is None
    tls_fleet.workers[patient].stop()


def unregistered_worker(fleet: LocalFleet, name: str) -> str:
    """A worker of `fleet` whose controller URL leads nowhere: it runs, and never registers."""
    from vicuna_sky.ports import free_port

    saved = fleet.worker_url
    fleet.worker_url = f"https://127.0.0.1:{free_port()}"
    try:
        return fleet.start_worker("echo", "echo", name)
    finally:
        fleet.worker_url = saved


def test_workers_may_not_register_in_clear(tls_fleet):
    """The client port (plain HTTP) takes no registration, even with the right secret."""
    r = httpx.post(
        f"{tls_fleet.url}/workers/register",
        json=registration("http://127.0.0.1:1"),
        headers={"Authorization": f"Bearer {SECRET}"},
    )
    assert r.status_code == 403 and r.json()["error"]["code"] == "tls_required"


def test_a_registration_without_a_worker_certificate_is_refused(tls_fleet):
    # `verify=False` here only: this test plays a worker that got through the handshake.
    with httpx.Client(verify=False) as client:
        r = client.post(
            f"{tls_fleet.worker_url}/workers/register",
            json=registration("http://127.0.0.1:1"),
            headers={"Authorization": f"Bearer {SECRET}"},
        )
    assert r.status_code == 400 and r.json()["error"]["code"] == "tls_required"


def test_the_controller_pins_each_workers_certificate(tls_fleet):
    """A stranger worker (which never registered itself: its controller URL leads nowhere) is
    registered here for a model of its own: with a wrong fingerprint the controller sends it
    nothing; with its certificate's own fingerprint, which no CA vouches for, the prompt goes
    through."""
    from openai import APIStatusError

    stranger = unregistered_worker(tls_fleet, "stranger-of-its-own")
    LocalFleet.wait_http(f"{stranger}/health", proc=tls_fleet.workers[stranger], verify=False)
    host, port = stranger.removeprefix("https://").split(":")
    actual = fingerprint(ssl.get_server_certificate((host, int(port))))

    def register(pin: str) -> None:
        with httpx.Client(verify=False) as client:
            r = client.post(
                f"{tls_fleet.worker_url}/workers/register",
                json=registration(stranger, models=["impostor"], tls_fingerprint=pin),
                headers={"Authorization": f"Bearer {SECRET}"},
            )
        assert r.status_code == 200

    def ask() -> str:
        answer = tls_fleet.client().chat.completions.create(
            model="impostor", messages=[{"role": "user", "content": "a prompt"}]
        )
        return answer.choices[0].message.content

    register(WRONG_PIN)
    with pytest.raises(APIStatusError) as refused:
        ask()
    assert refused.value.status_code == 503
    register(actual)
    assert ask() == "echo: a prompt"


def test_without_a_fleet_port_prompts_go_only_to_workers_on_the_same_machine(tmp_path):
    """A controller without TLS (a SkyServe replica's: its worker is on loopback) takes no
    worker elsewhere: the secret and prompts would cross the network in clear."""
    with LocalFleet(tmp_path, SECRET) as fleet:
        fleet.start_controller()
        secret = {"Authorization": f"Bearer {SECRET}"}
        far = httpx.post(
            f"{fleet.url}/workers/register", json=registration("http://10.1.2.3:8001"),
            headers=secret,
        )  # fmt: skip
        assert far.status_code == 400 and far.json()["error"]["code"] == "tls_required"
        near = httpx.post(
            f"{fleet.url}/workers/register", json=registration("http://127.0.0.1:8001"),
            headers=secret,
        )  # fmt: skip
        assert near.status_code == 200


def run_module(module: str, *args: str, env: dict[str, str] | None = None):
    return subprocess.run(
        [sys.executable, "-m", f"vicuna_sky.serve.{module}", *args],
        capture_output=True,
        text=True,
        env={**os.environ, FLEET_SECRET_ENV: SECRET, **(env or {})},
        timeout=60,
    )


@pytest.mark.parametrize(
    "module, args, said",
    [
        ("controller", ["--fleet-port", "1", "--port", "1"], FLEET_TLS_ENV),
        ("controller", ["--client-tls-file", "/nonexistent.pem", "--port", "1"], "cannot read"),
        ("controller", ["--tls-file", "/proc", "--fleet-port", "1", "--port", "1"], "cannot read"),
        ("worker", ["--controller-url", "https://127.0.0.1:1"], "--controller-fingerprint"),
        ("worker", ["--controller-url", "https://x:1", "--controller-fingerprint", "zz"], "SHA"),
        ("worker", ["--host", "0.0.0.0", "--controller-url", "http://x:1"], "https"),
    ],
)
def test_servers_without_the_tls_they_need_do_not_start(module, args, said):
    if module == "worker":
        args = [*args, "--backend", "echo", "--model-path", "echo", "--port", "1"]
    result = run_module(module, *args, env={FLEET_TLS_ENV: ""})
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and said in result.stderr


def test_certificate_material():
    pem = make_certificate()
    assert parse_fingerprint(fingerprint(pem)) == parse_fingerprint(fingerprint(pem).upper())
    assert fingerprint(make_certificate()) != fingerprint(pem)
    certfile, _ = server_files(pem)
    assert os.stat(certfile).st_mode & 0o077 == 0  # the key is readable by this user only
    cert_only = pem[pem.index("-----BEGIN CERTIFICATE-----") :]
    with pytest.raises(TlsError, match="private key"):
        server_files(cert_only)
    other_key = make_certificate()
    mismatched = other_key[: other_key.index("-----BEGIN CERTIFICATE-----")] + cert_only
    with pytest.raises(TlsError, match="do not load"):
        server_files(mismatched)


def test_the_certificate_shown_to_anyone_is_the_certificate_alone():
    """What the launcher writes to ~/.vicuna-sky/fleets/<name>.crt for clients: the whole
    certificate block and nothing of the key; material without a certificate is refused."""
    from vicuna_sky.serve.tls import certificate_pem

    pem = make_certificate()
    shown = certificate_pem(pem)
    begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----\n"
    assert shown.startswith(begin) and shown.endswith(end) and shown.count(begin) == 1
    assert "PRIVATE KEY" not in shown and shown in pem
    assert fingerprint(shown) == fingerprint(pem)
    assert certificate_pem(shown) == shown  # a certificate alone, from its first byte
    key_only = pem[: pem.index(begin)]
    for material in (key_only, key_only + begin + "\n", "", end + begin):
        with pytest.raises(TlsError, match="no certificate"):
            certificate_pem(material)


def until(check, timeout: float = 90.0):
    """`check()` once it returns without an httpx error (a server still starting)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_the_client_port_and_the_chat_ui_are_https_off_loopback(tmp_path):
    """Bound for other machines (0.0.0.0; asked here on 127.0.0.1 only), the client port and
    the UI serve https with the fleet's certificate: API keys, prompts, answers and the UI's
    password never cross the network in clear. The openai client trusts that certificate alone
    (tls.trusting, as the README shows); plain http, and a client expecting another
    certificate, get nothing."""
    import openai

    from vicuna_sky.ports import free_port
    from vicuna_sky.serve.auth import API_KEYS_ENV
    from vicuna_sky.serve.local_fleet import Proc
    from vicuna_sky.serve.tls import trusting
    from vicuna_sky.serve.webui import UI_API_KEY_ENV, UI_PASSWORD_ENV

    with LocalFleet(tmp_path, SECRET, tls=True) as fleet:
        env = {FLEET_SECRET_ENV: SECRET, FLEET_TLS_ENV: fleet.tls_pem, API_KEYS_ENV: "key"}
        args = ["vicuna_sky.serve.controller", "--host", "0.0.0.0", "--port", str(fleet.port)]
        args += ["--fleet-port", str(fleet.fleet_port)]
        controller = Proc(args, tmp_path / "controller.log", env)
        fleet.procs.append(controller)
        echo = fleet.start_worker("echo", "echo", "echo")
        pinned = httpx.Client(verify=trusting(fleet.tls_pem))
        url = f"https://127.0.0.1:{fleet.port}"
        fleet_key = {"Authorization": f"Bearer {SECRET}"}

        def registered() -> bool:
            controller.check_alive("the controller")
            workers = pinned.get(f"{url}/workers", headers=fleet_key).json()["workers"]
            if not any(w["address"] == echo and w["available"] for w in workers):
                raise httpx.ConnectError("not yet")
            return True

        until(registered)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="key", http_client=pinned)
        answer = client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "over tls"}]
        )
        assert answer.choices[0].message.content == "echo: over tls"
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{fleet.port}/v1/models", timeout=5)
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"{url}/v1/models", verify=trusting(make_certificate()), timeout=5)

        ui_port = free_port()
        ui_env = {
            FLEET_TLS_ENV: fleet.tls_pem,
            UI_PASSWORD_ENV: "ui-password",
            UI_API_KEY_ENV: "key",
            "GRADIO_ANALYTICS_ENABLED": "False",
        }
        ui = ["vicuna_sky.serve.webui", "--host", "0.0.0.0", "--port", str(ui_port)]
        ui += ["--controller-url", url]
        fleet.procs.append(Proc(ui, tmp_path / "webui.log", ui_env))
        page = f"https://127.0.0.1:{ui_port}"
        until(lambda: pinned.get(f"{page}/").raise_for_status(), 180)
        login = pinned.post(f"{page}/login", data={"username": "u", "password": "ui-password"})
        assert login.status_code == 200, login.text
        config = pinned.get(f"{page}/config").json()  # the page, as the browser gets it
        choices = [c for comp in config["components"] for c in comp["props"].get("choices") or []]
        assert ["echo", "echo"] in choices  # the UI asked the controller, over pinned TLS
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{ui_port}/", timeout=5)


def test_servers_off_loopback_without_a_certificate_do_not_start():
    from vicuna_sky.serve.auth import API_KEYS_ENV
    from vicuna_sky.serve.tls import CLIENT_TLS_ENV
    from vicuna_sky.serve.webui import UI_PASSWORD_ENV

    env = {FLEET_TLS_ENV: "", CLIENT_TLS_ENV: "", API_KEYS_ENV: "key", UI_PASSWORD_ENV: "pw"}
    for module, args in [
        ("controller", ["--host", "0.0.0.0", "--port", "1"]),
        ("webui", ["--host", "0.0.0.0", "--port", "1", "--controller-url", "https://x:1"]),
    ]:
        result = run_module(module, *args, env=env)
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and CLIENT_TLS_ENV in result.stderr


def test_behind_a_tls_proxy_the_client_port_is_plain_http(tmp_path):
    """SkyServe's load balancer ends TLS (service.tls) and reaches replicas over http only."""
    from vicuna_sky.ports import free_port
    from vicuna_sky.serve.auth import API_KEYS_ENV
    from vicuna_sky.serve.local_fleet import Proc

    port = free_port()
    args = ["vicuna_sky.serve.controller", "--host", "0.0.0.0", "--port", str(port)]
    env = {FLEET_SECRET_ENV: SECRET, API_KEYS_ENV: "key", FLEET_TLS_ENV: ""}
    proc = Proc([*args, "--behind-tls-proxy"], tmp_path / "controller.log", env)
    try:
        LocalFleet.wait_http(f"http://127.0.0.1:{port}/health", proc=proc)
        assert httpx.get(f"http://127.0.0.1:{port}/health").json() == {"status": "ok"}
    finally:
        proc.stop()


def test_a_stream_abandoned_mid_answer_stops_at_once_and_leaves_no_traceback(tls_fleet):
    """A stream whose next piece is always ready (a fast worker) ran to its end for nobody after
    its client left: starlette's cancellation lands only on a task that waits, and uvicorn
    drops the writes of a closed connection without a word. The worker, busy for nobody, then
    missed its heartbeats. Each of ten streams abandoned mid-answer over TLS is stopped at once
    on the worker, and the logs hold no traceback (the hop's TLS torn down mid-answer)."""
    from .conftest import in_flight

    body = {"model": "echo", "messages": [{"role": "user", "content": "a b c"}], "stream": True}
    body |= {"max_tokens": 1_000_000, "ignore_eos": True}  # minutes of work if never stopped
    for _ in range(10):
        with httpx.stream("POST", f"{tls_fleet.url}/v1/chat/completions", json=body) as r:
            for n, _line in enumerate(r.iter_lines()):
                if n > 50:
                    break  # and hang up
        deadline = time.monotonic() + 5
        while in_flight(tls_fleet.good) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert in_flight(tls_fleet.good) == 0
    assert tls_fleet.good in tls_fleet.available()
    for log in (tls_fleet.controller.log, tls_fleet.workers[tls_fleet.good].log):
        text = log.read_text()
        assert "Traceback" not in text, text[-3000:]
