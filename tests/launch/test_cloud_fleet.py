"""The fleet on the cloud path: the controller as a cluster and the workers as managed jobs,
its repair on a re-run, and where workers announce themselves. SkyPilot's SDK is faked at its
boundary (`FakeSky`, tests/launch/conftest.py); tasks are SkyPilot's own objects."""

from __future__ import annotations

import contextlib
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from vicuna_sky.errors import VicunaSkyError
from vicuna_sky.launch import cloud, runner, serve_fleet
from vicuna_sky.launch.fleet_state import FleetState
from vicuna_sky.launch.skypilot_backend import SkyPilotBackend
from vicuna_sky.launch.tasks import (
    Spec,
    SpecError,
    load_task,
)
from vicuna_sky.ports import free_port
from vicuna_sky.recipe import Recipe
from vicuna_sky.serve import address
from vicuna_sky.serve.local_fleet import LocalFleet
from vicuna_sky.serve.tls import fingerprint

from .conftest import ROOT, recipe

FLEET_BUCKET = "vicuna-sky-bucket"
"""The recipes' bucket (gs://), on the GCS emulator: a fleet keeps its sealed certificate there."""


@pytest.fixture(autouse=True)
def fleet_bucket(gcs_endpoint) -> str:
    from google.api_core.exceptions import Conflict
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(project="emulator", credentials=AnonymousCredentials())
    with contextlib.suppress(Conflict):  # made by an earlier test of the session
        client.create_bucket(FLEET_BUCKET)
    for blob in client.list_blobs(FLEET_BUCKET, prefix="fleets/"):  # each test its own fleets
        blob.delete()
    return f"gs://{FLEET_BUCKET}"


def fleet_tasks(r: Recipe | None = None):
    r = r or recipe()
    controller = load_task(Spec.CONTROLLER, r)
    worker = load_task(Spec.WORKER, r, {"CONTROLLER_URL": "http://CONTROLLER:8000"})
    return controller, worker


def test_fleet_controller_is_a_cluster_and_workers_are_managed_jobs(fake_sky, controller_vms):
    controller, worker = fleet_tasks()
    fleet = cloud.launch_fleet(controller, worker, "vic", workers=2, poll_seconds=0)
    (launch,) = fake_sky.named("launch")
    assert launch[1] == "vic-controller"
    assert all(not r.use_spot for r in launch[2].resources)
    jobs = fake_sky.named("jobs.launch")
    assert [j[1] for j in jobs] == ["vic-worker-0", "vic-worker-1"] == fleet.launched
    for _, _, task, envs, _secrets in jobs:
        for res in task.resources:  # SkyPilot's own Resources, from sky/serve-worker.yaml
            assert res.use_spot
            assert res.job_recovery["strategy"] == "EAGER_NEXT_REGION"
            assert res.job_recovery["max_restarts_on_errors"] == 0  # a failed setup ends it
            assert res.job_recovery["recover_on_exit_codes"] == [75]
        # Workers reach the controller on its TLS fleet port, pinning its certificate.
        assert envs["CONTROLLER_URL"] == f"https://127.0.0.1:{fake_sky.ports[8002]}"
        assert "VICUNA_SKY_FLEET_SECRET" not in envs
    assert fleet.url == f"https://127.0.0.1:{fake_sky.ports[8000]}"
    secret = jobs[0][4]["VICUNA_SKY_FLEET_SECRET"].get_secret_value()
    assert len(secret) >= 24
    assert launch[2].secrets["VICUNA_SKY_FLEET_SECRET"].get_secret_value() == secret
    pem = launch[2].secrets["VICUNA_SKY_FLEET_TLS"].get_secret_value()
    assert "PRIVATE KEY" in pem and "VICUNA_SKY_FLEET_TLS" not in jobs[0][4]  # the key stays
    assert jobs[0][3]["CONTROLLER_FINGERPRINT"] == fingerprint(pem)
    assert not fleet.controller_reused


def test_the_launcher_waits_for_the_controller_endpoint(fake_sky, controller_vms):
    fake_sky.endpoint_answers = [{}, ValueError("Cluster vic-controller is not UP"), {"8000": ""}]
    controller, worker = fleet_tasks()
    fleet = cloud.launch_fleet(controller, worker, "vic", workers=1, poll_seconds=0)
    # {} twice and an error, then the port; then the fleet port at once
    assert len(fake_sky.named("endpoints")) == 5
    assert fleet.url == f"https://127.0.0.1:{fake_sky.ports[8000]}"
    fake_sky.endpoint_answers = [{}] * 100
    with pytest.raises(VicunaSkyError, match=r"vic-controller: port 8000 not exposed after 0 s"):
        cloud.wait_for_endpoint("vic-controller", 8000, wait_seconds=0, poll_seconds=0)


@pytest.fixture
def answering_controller(fake_sky, tmp_path, monkeypatch):
    """The fleet's controller cluster "UP" on 127.0.0.1: a real controller process on a
    free port stands in for its port 8000, with the fleet secret the launcher will use."""
    monkeypatch.setenv("VICUNA_SKY_FLEET_SECRET", "fleet-secret-0123456789")
    with LocalFleet(tmp_path / "controller", "fleet-secret-0123456789", tls=True) as stand_in:
        # The fleet's certificate, as the launcher keeps it: the stand-in shows it.
        state = FleetState(tls=stand_in.tls_pem)
        state.save("vic")
        stand_in.start_controller()
        fake_sky.host = "127.0.0.1"
        fake_sky.ports = {8000: stand_in.port, 8002: stand_in.fleet_port}
        yield stand_in


def test_a_rerun_reuses_the_running_controller_its_secret_and_its_workers(
    fake_sky, answering_controller
):
    controller, worker = fleet_tasks()
    first = cloud.launch_fleet(controller, worker, "vic", workers=2, poll_seconds=0)
    secret = fake_sky.named("jobs.launch")[0][4]["VICUNA_SKY_FLEET_SECRET"]
    pem = fake_sky.named("launch")[0][2].secrets["VICUNA_SKY_FLEET_TLS"]
    assert (
        Path(os.environ["VICUNA_SKY_STATE_DIR"]) / "fleets" / "vic.json"
    ).stat().st_mode & 0o77 == 0
    fake_sky.jobs[1]["status"] = "FAILED_SETUP"  # worker-1 ended; worker-0 still runs
    fake_sky.calls.clear()
    controller, worker = fleet_tasks()  # a new `vicuna-sky serve --fleet` process
    again = cloud.launch_fleet(controller, worker, "vic", workers=2, poll_seconds=0)
    assert again.controller_reused and again.url == first.url
    assert not fake_sky.named("launch")  # no second controller on port 8000
    assert again.kept == ["vic-worker-0"] and again.launched == ["vic-worker-1"]
    (relaunch,) = fake_sky.named("jobs.launch")
    assert relaunch[4]["VICUNA_SKY_FLEET_SECRET"].get_secret_value() == secret.get_secret_value()
    # The same certificate: running workers keep trusting the controller.
    assert relaunch[3]["CONTROLLER_FINGERPRINT"] == fingerprint(pem.get_secret_value())


def test_a_dead_controller_on_an_up_cluster_is_relaunched_and_workers_kept(
    fake_sky, controller_vms
):
    """The cluster is UP (after a refresh) but nothing answers on the controller's port: its
    job is cancelled and the task runs on it again with the fleet's secret and certificate;
    running workers stay (they register with the new process at the same URL)."""
    controller, worker = fleet_tasks()
    first = cloud.launch_fleet(controller, worker, "vic", workers=2, poll_seconds=0)
    pem = fake_sky.named("launch")[0][2].secrets["VICUNA_SKY_FLEET_TLS"].get_secret_value()
    controller_vms[0].close()  # the controller died; its cluster is still UP
    fake_sky.calls.clear()
    controller, worker = fleet_tasks()
    again = cloud.launch_fleet(controller, worker, "vic", workers=2, poll_seconds=0)
    assert again.controller_relaunched and not again.controller_reused
    # The hung controller's job is cancelled before the new one is submitted beside it (it
    # would hold the ports): then the task runs again, and answers before any worker is kept.
    kinds = [c[0] for c in fake_sky.calls]
    assert fake_sky.named("cancel") == [("cancel", "vic-controller", True)]
    assert kinds.index("cancel") < kinds.index("launch")
    (relaunch,) = fake_sky.named("launch")
    assert relaunch[1] == "vic-controller"
    assert relaunch[2].secrets["VICUNA_SKY_FLEET_TLS"].get_secret_value() == pem
    assert again.kept == ["vic-worker-0", "vic-worker-1"] and not again.launched
    assert again.url == first.url and len(controller_vms) == 2


def test_workers_launch_only_once_the_controller_answers_with_its_certificate(
    fake_sky, controller_vms, tmp_path
):
    """sky.launch returns with the controller's setup still running: a controller that never
    starts (a failed setup) must not get spot GPU workers billing against it."""

    class NeverStarts:
        def close(self) -> None:
            pass

    dead = {8000: free_port(), 8002: free_port()}  # nothing listens: its setup failed
    fake_sky.run_controller = lambda task, ports: (NeverStarts(), dead)
    controller, worker = fleet_tasks()
    quick = dict(workers=2, wait_seconds=1, poll_seconds=0.2)
    with pytest.raises(VicunaSkyError, match=r"does not answer on .* so no worker was launched"):
        cloud.launch_fleet(controller, worker, "vic", **quick)
    assert fake_sky.named("launch") and not fake_sky.named("jobs.launch")
    # A controller that answers with another certificate is no better: no secret, no workers.
    with LocalFleet(tmp_path / "other", "fleet-secret-of-another", tls=True) as other:
        other.start_controller()
        impostor = {8000: other.port, 8002: other.fleet_port}
        fake_sky.run_controller = lambda task, ports: (NeverStarts(), impostor)
        fake_sky.clusters.clear()
        controller, worker = fleet_tasks()
        with pytest.raises(VicunaSkyError, match="no worker was launched"):
            cloud.launch_fleet(controller, worker, "vic", **quick)
    assert not fake_sky.named("jobs.launch")


def test_a_controller_still_in_its_setup_is_waited_for_then_gets_its_workers(
    fake_sky, controller_vms
):
    """sky.launch returns while the controller's setup runs: its fleet port does not answer
    yet, and the launcher asks again (every poll) until it does, then launches the workers."""
    import time

    start_now = fake_sky.run_controller

    class InSetup:
        def __init__(self, task, ports: dict[int, int]) -> None:
            self.thread = threading.Thread(target=self.start, args=(task, ports))
            self.thread.start()

        def start(self, task, ports: dict[int, int]) -> None:
            time.sleep(1.5)  # the node's install
            start_now(task, ports)

        def close(self) -> None:
            self.thread.join()

    setups: list[InSetup] = []

    def slow(task, ports):
        ports = ports or {8000: free_port(), 8002: free_port()}
        setups.append(InSetup(task, ports))
        return setups[-1], ports

    fake_sky.run_controller = slow
    controller, worker = fleet_tasks()
    started = time.monotonic()
    try:
        result = cloud.launch_fleet(controller, worker, "vic", workers=2, wait_seconds=60,
                                    poll_seconds=0.2)  # fmt: skip
    finally:
        for setup in setups:  # its controller joins controller_vms' list, which stops it
            setup.close()
    assert time.monotonic() - started >= 1.5
    assert result.launched == ["vic-worker-0", "vic-worker-1"]
    assert len(fake_sky.named("jobs.launch")) == 2


def test_a_controller_that_moved_gets_new_workers(fake_sky, controller_vms):
    controller, worker = fleet_tasks()
    cloud.launch_fleet(controller, worker, "vic", workers=1, poll_seconds=0)
    fake_sky.clusters["vic-controller"] = "STOPPED"  # gone: it comes back elsewhere
    fake_sky.stop("vic-controller")
    controller, worker = fleet_tasks()
    moved = cloud.launch_fleet(controller, worker, "vic", workers=1, poll_seconds=0)
    assert not moved.controller_reused and len(fake_sky.named("launch")) == 2
    assert moved.cancelled == ["vic-worker-0"] and moved.launched == ["vic-worker-0"]
    url = f"https://127.0.0.1:{fake_sky.ports[8002]}"
    assert fake_sky.named("jobs.launch")[-1][3]["CONTROLLER_URL"] == url
    assert fake_sky.named("jobs.launch")[0][3]["CONTROLLER_URL"] != url


def test_a_running_controller_whose_secret_is_unknown_is_a_one_line_error(fake_sky):
    fake_sky.clusters["vic-controller"] = "UP"
    controller, worker = fleet_tasks()
    with pytest.raises(VicunaSkyError, match="export VICUNA_SKY_FLEET_SECRET") as e:
        cloud.launch_fleet(controller, worker, "vic", workers=1, poll_seconds=0)
    assert "\n" not in str(e.value) and not fake_sky.named("jobs.launch")


def test_the_fleet_secret_comes_from_the_users_environment(fake_sky, controller_vms, monkeypatch):
    monkeypatch.setenv("VICUNA_SKY_FLEET_SECRET", "mine-0123456789abcdef")
    controller, worker = fleet_tasks()
    cloud.launch_fleet(controller, worker, "vic", workers=1, poll_seconds=0)
    (job,) = fake_sky.named("jobs.launch")
    assert job[4]["VICUNA_SKY_FLEET_SECRET"].get_secret_value() == "mine-0123456789abcdef"


class MetadataFake:
    """AWS IMDSv2 and GCP metadata answers on 127.0.0.1 (a VM's public IP)."""

    def __init__(self, aws_ip: str | None = "203.0.113.7", gcp_ip: str | None = "198.51.100.9"):
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def reply(self, status: int, body: str = "") -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())

            def do_PUT(self) -> None:
                ok = self.path == "/aws/token" and self.headers.get(
                    "X-aws-ec2-metadata-token-ttl-seconds"
                )
                self.reply(200, "tok") if ok else self.reply(403)

            def do_GET(self) -> None:
                if self.path == "/aws/public-ipv4":
                    if self.headers.get("X-aws-ec2-metadata-token") != "tok":
                        return self.reply(401)
                    return self.reply(200, outer.aws_ip) if outer.aws_ip else self.reply(404)
                if self.path == "/gcp/external-ip":
                    if self.headers.get("Metadata-Flavor") != "Google":
                        return self.reply(403)
                    return self.reply(200, outer.gcp_ip or "")
                return self.reply(404)

            def log_message(self, *args: object) -> None:
                pass

        self.aws_ip, self.gcp_ip = aws_ip, gcp_ip
        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        base = f"http://127.0.0.1:{self.http.server_address[1]}"
        self.env = {
            "VICUNA_SKY_AWS_TOKEN_URL": f"{base}/aws/token",
            "VICUNA_SKY_AWS_PUBLIC_IP_URL": f"{base}/aws/public-ipv4",
            "VICUNA_SKY_GCP_EXTERNAL_IP_URL": f"{base}/gcp/external-ip",
        }
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def metadata(monkeypatch):
    fake = MetadataFake()
    for key, value in fake.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SKYPILOT_NODE_IPS", "10.128.0.5\n10.128.0.6")
    yield fake
    fake.close()


def test_a_worker_announces_its_public_ip_not_the_private_one(metadata):
    assert address.worker_url(8001, cloud="aws") == "http://203.0.113.7:8001"
    assert address.worker_url(8001, cloud="gcp") == "http://198.51.100.9:8001"
    metadata.aws_ip = None  # a VM with no public IP: the private one, and a warning
    assert address.worker_url(8001, cloud="aws") == "http://10.128.0.5:8001"
    metadata.gcp_ip = "not an address"
    assert address.worker_url(8001, cloud="gcp") == "http://10.128.0.5:8001"
    assert address.worker_url(8001, cloud="") == "http://10.128.0.5:8001"


def test_a_worker_with_an_ipv6_address_announces_a_url_that_parses(metadata, monkeypatch):
    """An IPv6 address goes in brackets (RFC 3986): without them the port cannot be told from
    the address, and the controller refuses the registration or dials the wrong port."""
    from urllib.parse import urlsplit

    metadata.gcp_ip = "2001:db8::7"
    url = address.worker_url(8001, cloud="gcp")
    assert url == "http://[2001:db8::7]:8001"
    assert (urlsplit(url).hostname, urlsplit(url).port) == ("2001:db8::7", 8001)
    metadata.gcp_ip = None
    monkeypatch.setenv("SKYPILOT_NODE_IPS", "fd00::5\nfd00::6")  # the private one, IPv6 too
    assert address.worker_url(8001, cloud="gcp") == "http://[fd00::5]:8001"


def test_the_worker_spec_asks_for_the_public_address_unless_overridden(metadata):
    """The ADDRESS line of sky/serve-worker.yaml's run, run by bash as SkyPilot would."""
    task = load_task(Spec.WORKER, recipe(), {"CONTROLLER_URL": "http://CONTROLLER:8000"})
    (line,) = [x.strip() for x in task.run.splitlines() if x.strip().startswith("ADDRESS=")]
    env = {
        **os.environ,
        **task.envs,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "SKYPILOT_CLUSTER_INFO": '{"cloud": "gcp", "region": "us-central1"}',
    }
    env.pop("VICUNA_SKY_CLOUD", None)
    script = f'{line}\necho "$ADDRESS"'
    out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "http://198.51.100.9:8001", out.stderr
    env["WORKER_ADDRESS"] = "http://worker.example:9000"
    out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "http://worker.example:9000"


def test_fleet_overrides_go_to_the_task_that_declares_them(fake_sky, tmp_path, capsys):
    options = dict(dryrun=True, backend=SkyPilotBackend(), name=None)
    envs = ("SERVE_BACKEND=echo", "SERVED_MODEL_NAME=m", "WEBUI_PORT=7000")
    serve_fleet.launch_fleet("vicuna-7b", envs, **options)
    printed = capsys.readouterr().out
    assert "SERVE_BACKEND: echo" in printed and "WEBUI_PORT: '7000'" in printed
    assert printed.count("SERVED_MODEL_NAME: m") == 2  # both tasks declare it
    with pytest.raises(SpecError, match=r"declares no env 'SERVE_BACKNED' \(did you mean"):
        serve_fleet.launch_fleet("vicuna-7b", ("SERVE_BACKNED=echo",), **options)
    assert not fake_sky.calls


def test_a_fleet_goes_down_workers_first_then_its_controller(
    fake_sky, controller_vms, fleet_bucket
):
    from checkpoints_sync.factory import open_store

    controller, worker = fleet_tasks()
    cloud.launch_fleet(controller, worker, "vic", workers=2, poll_seconds=0)
    assert open_store(f"{fleet_bucket}/fleets/vic").exists("tls.sealed")
    fake_sky.calls.clear()
    gone = cloud.down("vic", "fleet")
    assert gone == ["vic-worker-0", "vic-worker-1", "vic-controller"]
    assert [c[0] for c in fake_sky.calls] == ["jobs.cancel", "jobs.cancel", "down"]
    assert not cloud.FleetState.path("vic").exists()
    assert not open_store(f"{fleet_bucket}/fleets/vic").exists("tls.sealed")
    assert cloud.down("vic", "fleet") == []


def test_no_public_endpoint_without_keys(fake_sky, controller_vms, monkeypatch, capsys):
    """`serve` and `serve --fleet` on a cloud without VICUNA_SKY_API_KEYS are refused before
    anything launches, unless --public; the dry runs say which it would be."""
    options = dict(dryrun=False, backend=SkyPilotBackend(), name=None)
    with pytest.raises(VicunaSkyError, match="VICUNA_SKY_API_KEYS is not set"):
        runner.launch_recipe(Spec.SERVICE, "vicuna-7b", (), **options)
    with pytest.raises(VicunaSkyError, match="--public to serve without keys"):
        serve_fleet.launch_fleet("vicuna-7b", (), **options)
    assert fake_sky.calls == []
    serve_fleet.launch_fleet("vicuna-7b", (), **{**options, "dryrun": True})
    printed = capsys.readouterr().out
    assert "endpoint: would be refused" in printed
    assert "controller cluster: vicuna-7b-controller; worker jobs: vicuna-7b-worker-0" in printed
    runner.launch_recipe(Spec.SERVICE, "vicuna-7b", (), public=True, **options)
    assert [c[0] for c in fake_sky.calls] == ["serve.up"]
    assert "endpoint: public (--public)" in capsys.readouterr().out
    # --public reaches the process that needs it: the replica's controller, through the spec
    # (the flag alone stopped at the launcher, and a keyless controller off loopback exits 2).
    assert fake_sky.named("serve.up")[0][2].envs["VICUNA_SKY_PUBLIC"] == "1"
    serve_fleet.launch_fleet("vicuna-7b", (), **{**options, "public": True})
    assert fake_sky.named("launch")[0][2].envs["VICUNA_SKY_PUBLIC"] == "1"
    monkeypatch.setenv("VICUNA_SKY_API_KEYS", "key-test-1234")
    runner.launch_recipe(Spec.SERVICE, "vicuna-7b", (), **{**options, "name": "vic2"})
    assert "clients need one of the keys" in capsys.readouterr().out
    assert fake_sky.named("serve.up")[1][2].envs["VICUNA_SKY_PUBLIC"] == "0"


def test_a_teammate_with_the_secret_repairs_the_fleet_from_another_machine(
    fake_sky, controller_vms, monkeypatch, tmp_path, fleet_bucket
):
    """The first launcher's state stays on its laptop; the fleet's certificate and key live in
    the bucket too, sealed with the fleet secret. A teammate with the secret exported (and no
    state) recognises the running controller and launches workers that pin its certificate;
    a wrong secret opens nothing and launches nothing."""
    from checkpoints_sync.factory import open_store

    controller, worker = fleet_tasks()
    first = cloud.launch_fleet(controller, worker, "vic", workers=1, poll_seconds=0)
    secret = fake_sky.named("jobs.launch")[0][4]["VICUNA_SKY_FLEET_SECRET"].get_secret_value()
    sealed = open_store(f"{fleet_bucket}/fleets/vic")
    assert sealed.exists("tls.sealed")
    sealed.get_file("tls.sealed", tmp_path / "sealed")  # the key is not in it in clear
    assert b"PRIVATE KEY" not in (tmp_path / "sealed").read_bytes()

    monkeypatch.setenv("VICUNA_SKY_STATE_DIR", str(tmp_path / "teammate"))
    monkeypatch.setenv("VICUNA_SKY_FLEET_SECRET", "not-the-fleets-secret-0123")
    fake_sky.calls.clear()
    with pytest.raises(VicunaSkyError, match="sealed with another fleet secret") as e:
        cloud.launch_fleet(*fleet_tasks(), "vic", workers=2, poll_seconds=0)
    assert "\n" not in str(e.value) and not fake_sky.named("jobs.launch")

    monkeypatch.setenv("VICUNA_SKY_FLEET_SECRET", secret)
    again = cloud.launch_fleet(*fleet_tasks(), "vic", workers=2, poll_seconds=0)
    assert again.controller_reused and again.fingerprint == first.fingerprint
    assert not fake_sky.named("launch")  # the running controller was recognised
    (added,) = fake_sky.named("jobs.launch")
    assert added[3]["CONTROLLER_FINGERPRINT"] == first.fingerprint


def test_a_sealed_certificate_opens_only_with_its_secret_and_its_fleet_name():
    from vicuna_sky.launch.fleet_state import seal, unseal
    from vicuna_sky.serve.tls import make_certificate

    pem = make_certificate("vic controller")
    blob = seal(pem, "the-secret", "vic")
    assert unseal(blob, "the-secret", "vic") == pem
    assert seal(pem, "the-secret", "vic") != blob  # a fresh nonce each time
    for secret, name in (("another", "vic"), ("the-secret", "other-fleet")):
        with pytest.raises(VicunaSkyError, match="sealed with another fleet secret"):
            unseal(blob, secret, name)
    flipped = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(VicunaSkyError, match="sealed with another"):
        unseal(flipped, "the-secret", "vic")
    with pytest.raises(VicunaSkyError, match="not ours"):
        unseal(b"garbage", "the-secret", "vic")


def test_the_fleet_dry_run_prices_each_machine_and_says_how_to_take_it_down(
    fake_sky, capsys, monkeypatch
):
    """What runs where, on which ports, and what each machine costs an hour while the fleet is
    up, from SkyPilot's catalog (the test HOME's: made-up prices, tests/fixtures/catalog)."""
    from vicuna_sky.launch import report

    monkeypatch.setattr(report.console, "width", 200)  # a pipe's 80 columns would wrap rows
    options = dict(dryrun=True, backend=SkyPilotBackend(), name=None)
    serve_fleet.launch_fleet("vicuna-7b", (), **options)
    out = capsys.readouterr().out
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in out.splitlines() if line.count("│") == 8}  # fmt: skip
    controller = rows["fleet controller"]
    assert controller[:2] == ["1", "on-demand"] and "n2-standard-2" in controller[2]
    assert controller[3] == "7860, 8000, 8002" and controller[4:] == ["0.1000", "0.1000"]
    worker = rows["worker"]  # g2-standard-4 (0.07) + one L4 (0.20), spot
    assert worker[:2] == ["2", "spot"] and "g2-standard-4" in worker[2] and worker[3] == "8001"
    assert worker[4:] == ["0.2700", "0.5400"]
    assert rows["SkyPilot jobs controller"][4] == "0.1900"
    assert rows["all"][-1] == "0.8300"
    assert "take it all down: vicuna-sky down vicuna-7b --kind fleet" in out


def test_the_fleet_costs_under_a_dollar_an_hour_on_real_catalog_rows(tmp_path, offline_env):
    """The README's figure, from SkyPilot's own catalog rows (tests/fixtures/catalog-v8, read
    2026-12-07): `serve --fleet --dryrun` of the 7B recipe, two L4 spot workers on GCP."""
    import shutil

    catalog = Path(offline_env["HOME"]) / ".sky" / "catalogs" / "v8"
    shutil.copytree(ROOT / "tests" / "fixtures" / "catalog-v8", catalog)
    exe = Path(sys.executable).parent / "vicuna-sky"
    done = subprocess.run(
        [str(exe), "serve", str(ROOT / "recipes" / "vicuna-7b.yaml"), "--fleet", "--dryrun"],
        cwd=tmp_path, env=offline_env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in done.stdout.splitlines() if line.count("│") == 8}  # fmt: skip
    assert "n4-standard-2" in rows["fleet controller"][2]
    assert rows["fleet controller"][4] == "0.0907"
    assert "us-east4 g2-standard-4" in rows["worker"][2] and rows["worker"][4] == "0.2818"
    assert rows["SkyPilot jobs controller"][4] == "0.1814"
    assert rows["all"][-1] == "0.8357"
