"""The cloud path against SkyPilot's own objects, with the SDK replaced at its boundary.

Tasks are built by `sky.Task.from_yaml_config` from the real specs in sky/ and the service is
checked by `sky.serve.validate_service_task`; only the calls that would go to SkyPilot's API
server (`sky.launch`, `sky.jobs.launch`, `sky.endpoints`, `sky.status`, `sky.jobs.queue_v2`,
`sky.serve.status`, ...) are replaced by `FakeSky`, which records them and answers from its own
state. No API server is started and nothing leaves this machine.
"""

from __future__ import annotations

import dataclasses
import http.server
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from vicuna_sky.errors import VicunaSkyError
from vicuna_sky.launch import cloud, runner
from vicuna_sky.launch.s3_server import free_port
from vicuna_sky.launch.tasks import (
    Spec,
    SpecError,
    checkpoint_url,
    load_task,
    missing_secrets,
    resolved_yaml,
)
from vicuna_sky.recipe import Recipe
from vicuna_sky.serve import address
from vicuna_sky.serve.local_fleet import LocalFleet
from vicuna_sky.serve.tls import fingerprint

ROOT = Path(__file__).resolve().parents[2]
NO_BUCKET = ("bucket", "data")
"""Preflight checks skipped where a test launches with no bucket server (they have their own)."""
SECRET_ENV = {
    "OPENAI_API_KEY": "sk-test-openai-9f1c",
    "HF_TOKEN": "hf_test_token_77aa",
    "VICUNA_SKY_FLEET_SECRET": "",
    "VICUNA_SKY_API_KEYS": "key-test-1234",
}


def recipe(name: str = "vicuna-7b", **serve: object) -> Recipe:
    r = Recipe.from_yaml(ROOT / "recipes" / f"{name}.yaml")
    return dataclasses.replace(r, serve=dataclasses.replace(r.serve, **serve)) if serve else r


class FakeSky:
    """SkyPilot's SDK at its boundary: every call returns a request (a thunk) that `sky.get` /
    `sky.stream_and_get` run, as the real ones wait for the API server's answer."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.clusters: dict[str, str] = {}  # name -> status
        self.jobs: list[dict] = []  # managed job records
        self.endpoint_answers: list[object] = []  # popped per sky.endpoints call
        self.host = "203.0.113.10"  # a documentation address: never contacted
        self.ports: dict[int, int] = {}  # a spec's port -> where it is really served
        self.jobs_controller_up = True
        self.serve_controller_up = True
        self.services: list[dict] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import sky

        for target, fn in {
            "get": lambda request: request(),
            "stream_and_get": lambda request: request(),
            "launch": self.launch,
            "status": self.status,
            "endpoints": self.endpoints,
            "tail_logs": lambda *a, **k: self.calls.append(("tail_logs", a, k)),
            "down": self.down,
        }.items():
            monkeypatch.setattr(sky, target, fn)
        for target, fn in {
            "launch": self.jobs_launch,
            "queue_v2": self.queue_v2,
            "cancel": self.jobs_cancel,
            "tail_logs": lambda **k: self.calls.append(("jobs.tail_logs", k)),
        }.items():
            monkeypatch.setattr(sky.jobs, target, fn)
        monkeypatch.setattr(sky.serve, "status", self.serve_status)
        monkeypatch.setattr(sky.serve, "up", self.serve_up)
        monkeypatch.setattr(
            sky.serve, "tail_logs", lambda *a, **k: self.calls.append(("serve.tail_logs", a, k))
        )
        # Nothing to start or stop: there is no API server in these tests (this fake is one).
        monkeypatch.setattr(cloud, "_api_server_for_this_call", _no_api_server)
        monkeypatch.setattr(cloud, "api_server_up", lambda: True)

    # -- clusters --------------------------------------------------------------------------
    def launch(self, task, cluster_name):
        def run():
            self.calls.append(("launch", cluster_name, task))
            self.clusters[cluster_name] = "UP"
            return 1, None

        return run

    def down(self, cluster_name, purge=False):
        def run():
            self.calls.append(("down", cluster_name))
            self.clusters.pop(cluster_name, None)

        return run

    def status(self, cluster_names=None, refresh=None, all_users=False):
        def run():
            names = cluster_names or list(self.clusters)
            return [{"name": n, "status": self.clusters[n]} for n in names if n in self.clusters]

        return run

    def endpoints(self, cluster, port=None):
        def run():
            self.calls.append(("endpoints", cluster, port))
            if self.endpoint_answers:
                answer = self.endpoint_answers.pop(0)
                if isinstance(answer, Exception):
                    raise answer
                return answer
            return {port: f"{self.host}:{self.ports.get(port, port)}"}

        return run

    # -- managed jobs ----------------------------------------------------------------------
    def _jobs_controller(self) -> None:
        import sky

        if not self.jobs_controller_up:
            raise sky.exceptions.ClusterNotUpError("Jobs controller is not up.")

    def jobs_launch(self, task, name=None, **kwargs):
        def run():
            self.calls.append(("jobs.launch", name, task, dict(task.envs), dict(task.secrets)))
            self.jobs.append({"job_id": len(self.jobs) + 1, "job_name": name, "status": "RUNNING"})
            return [len(self.jobs)], None

        return run

    def queue_v2(self, refresh, skip_finished=False, **kwargs):
        def run():
            self._jobs_controller()
            done = {"SUCCEEDED", "FAILED", "FAILED_SETUP", "CANCELLED"}
            records = [j for j in self.jobs if not (skip_finished and j["status"] in done)]
            return records, len(records), {}, len(self.jobs)

        return run

    def jobs_cancel(self, name=None, **kwargs):
        def run():
            self.calls.append(("jobs.cancel", name))
            for job in self.jobs:
                if job["job_name"] == name:
                    job["status"] = "CANCELLED"

        return run

    # -- services --------------------------------------------------------------------------
    def serve_status(self, service_names):
        def run():
            import sky

            if not self.serve_controller_up:
                raise sky.exceptions.ClusterNotUpError("Sky serve controller is not up.")
            return self.services

        return run

    def serve_up(self, task, service_name):
        def run():
            self.calls.append(("serve.up", service_name, task))
            return service_name, "http://203.0.113.20:30001"

        return run

    def named(self, kind: str) -> list[tuple]:
        return [c for c in self.calls if c[0] == kind]


class _no_api_server:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


@pytest.fixture
def fake_sky(monkeypatch, tmp_path, clouds_enabled) -> FakeSky:
    """The SDK faked; AWS and GCP enabled in SkyPilot's state, as `sky check` leaves them."""
    fake = FakeSky()
    fake.install(monkeypatch)
    monkeypatch.setenv("VICUNA_SKY_STATE_DIR", str(tmp_path / "state"))
    for key in SECRET_ENV:
        monkeypatch.delenv(key, raising=False)
    return fake


def fleet_tasks(r: Recipe | None = None):
    r = r or recipe()
    controller = load_task(Spec.CONTROLLER, r)
    worker = load_task(Spec.WORKER, r, {"CONTROLLER_URL": "http://CONTROLLER:8000"})
    return controller, worker


# -- 1. the fleet ---------------------------------------------------------------------------


def test_fleet_controller_is_a_cluster_and_workers_are_managed_jobs(fake_sky):
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
        assert envs["CONTROLLER_URL"] == "https://203.0.113.10:8002"
        assert "VICUNA_SKY_FLEET_SECRET" not in envs
    assert fleet.url == "http://203.0.113.10:8000"
    secret = jobs[0][4]["VICUNA_SKY_FLEET_SECRET"].get_secret_value()
    assert len(secret) >= 24
    assert launch[2].secrets["VICUNA_SKY_FLEET_SECRET"].get_secret_value() == secret
    pem = launch[2].secrets["VICUNA_SKY_FLEET_TLS"].get_secret_value()
    assert "PRIVATE KEY" in pem and "VICUNA_SKY_FLEET_TLS" not in jobs[0][4]  # the key stays
    assert jobs[0][3]["CONTROLLER_FINGERPRINT"] == fingerprint(pem)
    assert not fleet.controller_reused


def test_the_launcher_waits_for_the_controller_endpoint(fake_sky):
    fake_sky.endpoint_answers = [{}, ValueError("Cluster vic-controller is not UP"), {"8000": ""}]
    controller, worker = fleet_tasks()
    fleet = cloud.launch_fleet(controller, worker, "vic", workers=1, poll_seconds=0)
    # {} twice and an error, then the port; then the fleet port at once
    assert len(fake_sky.named("endpoints")) == 5
    assert fleet.url == "http://203.0.113.10:8000"
    fake_sky.endpoint_answers = [{}] * 100
    with pytest.raises(VicunaSkyError, match=r"vic-controller: port 8000 not exposed after 0 s"):
        cloud.wait_for_endpoint("vic-controller", 8000, wait_seconds=0, poll_seconds=0)


@pytest.fixture
def answering_controller(fake_sky, tmp_path, monkeypatch):
    """The fleet's controller cluster "UP" on 127.0.0.1: a real controller process on a
    free port stands in for its port 8000, with the fleet secret the launcher will use."""
    monkeypatch.setenv("VICUNA_SKY_FLEET_SECRET", "fleet-secret-0123456789")
    with LocalFleet(tmp_path / "controller", "fleet-secret-0123456789") as stand_in:
        stand_in.start_controller()
        fake_sky.host, fake_sky.ports = "127.0.0.1", {8000: stand_in.port}
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


def test_a_dead_controller_on_an_up_cluster_is_relaunched_and_workers_kept(fake_sky):
    """The cluster is UP (after a refresh) but nothing answers on the controller's port: the
    task runs on it again with the fleet's secret and certificate; running workers stay (they
    register with the new process at the same URL)."""
    fake_sky.host, fake_sky.ports = "127.0.0.1", {8000: free_port()}  # nothing listens there
    controller, worker = fleet_tasks()
    first = cloud.launch_fleet(controller, worker, "vic", workers=2, poll_seconds=0)
    pem = fake_sky.named("launch")[0][2].secrets["VICUNA_SKY_FLEET_TLS"].get_secret_value()
    fake_sky.calls.clear()
    controller, worker = fleet_tasks()
    again = cloud.launch_fleet(controller, worker, "vic", workers=2, poll_seconds=0)
    assert again.controller_relaunched and not again.controller_reused
    (relaunch,) = fake_sky.named("launch")
    assert relaunch[1] == "vic-controller"
    assert relaunch[2].secrets["VICUNA_SKY_FLEET_TLS"].get_secret_value() == pem
    assert again.kept == ["vic-worker-0", "vic-worker-1"] and not again.launched
    assert again.url == first.url


def test_a_controller_that_moved_gets_new_workers(fake_sky):
    controller, worker = fleet_tasks()
    cloud.launch_fleet(controller, worker, "vic", workers=1, poll_seconds=0)
    fake_sky.clusters["vic-controller"] = "STOPPED"
    fake_sky.host = "198.51.100.4"
    controller, worker = fleet_tasks()
    moved = cloud.launch_fleet(controller, worker, "vic", workers=1, poll_seconds=0)
    assert not moved.controller_reused and len(fake_sky.named("launch")) == 2
    assert moved.cancelled == ["vic-worker-0"] and moved.launched == ["vic-worker-0"]
    assert fake_sky.named("jobs.launch")[-1][3]["CONTROLLER_URL"] == "https://198.51.100.4:8002"


def test_a_running_controller_whose_secret_is_unknown_is_a_one_line_error(fake_sky):
    fake_sky.clusters["vic-controller"] = "UP"
    controller, worker = fleet_tasks()
    with pytest.raises(VicunaSkyError, match="export VICUNA_SKY_FLEET_SECRET") as e:
        cloud.launch_fleet(controller, worker, "vic", workers=1, poll_seconds=0)
    assert "\n" not in str(e.value) and not fake_sky.named("jobs.launch")


def test_the_fleet_secret_comes_from_the_users_environment(fake_sky, monkeypatch):
    monkeypatch.setenv("VICUNA_SKY_FLEET_SECRET", "mine-0123456789abcdef")
    controller, worker = fleet_tasks()
    cloud.launch_fleet(controller, worker, "vic", workers=1, poll_seconds=0)
    (job,) = fake_sky.named("jobs.launch")
    assert job[4]["VICUNA_SKY_FLEET_SECRET"].get_secret_value() == "mine-0123456789abcdef"


# -- 2. an address the controller can reach ---------------------------------------------------


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


# -- 3. secrets --------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", list(Spec), ids=lambda s: s.value)
def test_secrets_come_from_the_environment_and_never_become_envs(spec, monkeypatch):
    for key, value in SECRET_ENV.items():
        monkeypatch.setenv(key, value)
    extra = {"CONTROLLER_URL": "http://CONTROLLER:8000"} if spec is Spec.WORKER else None
    task = load_task(spec, recipe(), extra)
    printed = resolved_yaml(task)
    for key, value in SECRET_ENV.items():
        assert key not in task.envs
        if value:
            assert value not in printed and value not in str(task.envs)
            if key in task.secrets:
                assert task.secrets[key].get_secret_value() == value
    assert "HF_TOKEN" in task.secrets or spec is Spec.CONTROLLER
    if spec is Spec.EVAL:
        assert task.secrets["OPENAI_API_KEY"].get_secret_value() == SECRET_ENV["OPENAI_API_KEY"]
        assert "OPENAI_API_KEY: <set, redacted>" in printed


def test_a_secret_on_the_command_line_is_refused():
    with pytest.raises(SpecError, match="OPENAI_API_KEY is a secret: export it"):
        load_task(Spec.EVAL, recipe(), {"OPENAI_API_KEY": "sk-on-the-command-line"})


def test_eval_launch_needs_the_judges_key_and_sends_it_as_a_secret(fake_sky, monkeypatch, tmp_path):
    options = dict(dryrun=False, local=False, name=None, runs_dir=tmp_path)
    with pytest.raises(VicunaSkyError, match=r"eval\.yaml needs OPENAI_API_KEY: export it"):
        runner.launch_recipe(Spec.EVAL, "vicuna-7b", (), **options)
    assert not fake_sky.calls  # refused before anything was launched (or paid for)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET_ENV["OPENAI_API_KEY"])
    runner.launch_recipe(Spec.EVAL, "vicuna-7b", (), **options)
    (_, name, _task, envs, secrets) = fake_sky.named("jobs.launch")[0]
    assert name == "vicuna-7b-eval" and "OPENAI_API_KEY" not in envs
    assert secrets["OPENAI_API_KEY"].get_secret_value() == SECRET_ENV["OPENAI_API_KEY"]
    local_judge = load_task(Spec.EVAL, recipe(), {"JUDGE_API_BASE": "local"}, environ={})
    assert missing_secrets(Spec.EVAL, local_judge) == []


def test_the_dry_run_prints_no_secret(cli, monkeypatch):
    for key, value in SECRET_ENV.items():
        monkeypatch.setenv(key, value)
    out = cli("eval", "launch", "vicuna-7b", "--dryrun")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "OPENAI_API_KEY: <set, redacted>" in out.stdout
    for value in filter(None, SECRET_ENV.values()):
        assert value not in out.stdout + out.stderr


# -- 4. serve.spot: false, min_replicas from the recipe -----------------------------------------


def test_an_on_demand_service_validates_without_the_spot_fallback():
    import sky

    task = load_task(Spec.SERVICE, recipe(spot=False, workers=3))  # validate_service_task inside
    sky.serve.validate_service_task(task, pool=False)
    assert all(not r.use_spot for r in task.resources)
    assert not task.service.dynamic_ondemand_fallback
    assert task.service.min_replicas == 3 and task.service.max_replicas == 4
    spot = load_task(Spec.SERVICE, recipe(workers=6))
    assert spot.service.dynamic_ondemand_fallback and all(r.use_spot for r in spot.resources)
    assert spot.service.min_replicas == 6 and spot.service.max_replicas == 6


# -- 5. status, each section on its own ------------------------------------------------------


@pytest.mark.parametrize("down", ["jobs", "serve", "both"])
def test_status_with_a_controller_down(fake_sky, down, capsys):
    fake_sky.jobs = [{"job_name": "vicuna-7b-train", "status": "RUNNING", "recovery_count": 2}]
    fake_sky.clusters = {"vic-controller": "UP"}
    fake_sky.services = [
        {
            "name": "vicuna",
            "status": "READY",
            "endpoint": "http://203.0.113.20:30001",
            "replica_info": [{"replica_id": 3, "status": "READY"}],
        }
    ]
    fake_sky.jobs_controller_up = down == "serve"
    fake_sky.serve_controller_up = down == "jobs"
    jobs, clusters, services = cloud.status()
    assert clusters.rows == [{"name": "vic-controller", "status": "UP"}]
    if down in ("jobs", "both"):
        assert jobs.note == "jobs controller not running" and not jobs.rows
    else:
        assert jobs.rows[0]["recoveries"] == "2" and not jobs.note
    if down in ("serve", "both"):
        assert services.note == "serve controller not running"
    else:
        assert services.rows[0]["replicas"] == "1/1 ready"
    runner.print_status(local=False, runs_dir=Path("runs"))
    printed = capsys.readouterr().out
    assert "controller not running" in printed and "vic-controller" in printed


# -- 6. checkpoints keyed by the run name --------------------------------------------------------


def test_checkpoints_are_keyed_by_the_run_name(fake_sky, tmp_path):
    task = load_task(Spec.TRAIN, recipe())
    assert "SKYPILOT_TASK_ID" not in task.run.split("--checkpoint-url", 1)[1].splitlines()[0]
    assert '--checkpoint-url "$BUCKET_URL/runs/$RUN_NAME/$RUN_TAG"' in task.run
    assert checkpoint_url(task) == "gs://vicuna-sky-bucket/runs/vicuna-7b/main"
    options = dict(
        dryrun=False, local=False, name=None, runs_dir=tmp_path, skip_preflight=NO_BUCKET
    )
    # The data named in the bucket: nothing to upload (there is no bucket server here).
    data = ("DATA_PATH=data/train.json",)
    runner.launch_recipe(Spec.TRAIN, "tiny-cpu", data, **options)
    runner.launch_recipe(Spec.TRAIN, "tiny-cpu", data, fresh=True, **options)
    again, fresh = (call[3]["RUN_TAG"] for call in fake_sky.named("jobs.launch"))
    assert again == "main" and re.fullmatch(r"fresh-\d{8}T\d{6}Z", fresh)


def test_a_second_run_of_a_job_in_progress_is_refused(fake_sky, tmp_path):
    """Both would write under one checkpoint prefix: refused while the first is in progress
    (nothing launched), allowed with --fresh or once the first has ended."""
    options = dict(
        dryrun=False, local=False, name=None, runs_dir=tmp_path, skip_preflight=NO_BUCKET
    )
    data = ("DATA_PATH=data/train.json",)  # in the bucket: nothing to upload
    runner.launch_recipe(Spec.TRAIN, "tiny-cpu", data, **options)
    with pytest.raises(VicunaSkyError, match="vicuna-tiny-train is already running as a managed"):
        runner.launch_recipe(Spec.TRAIN, "tiny-cpu", data, **options)
    assert len(fake_sky.named("jobs.launch")) == 1
    fake_sky.jobs[0]["status"] = "SUCCEEDED"
    runner.launch_recipe(Spec.TRAIN, "tiny-cpu", data, **options)
    assert len(fake_sky.named("jobs.launch")) == 2


# -- 7. logs of a service --------------------------------------------------------------------------


def test_service_logs_pick_a_live_replica_or_the_one_asked_for(fake_sky):
    fake_sky.services = [
        {
            "name": "vicuna",
            "replica_info": [
                {"replica_id": 1, "status": "PREEMPTED"},
                {"replica_id": 4, "status": "READY"},
                {"replica_id": 5, "status": "STARTING"},
            ],
        }
    ]
    cloud.logs("vicuna", "service")
    cloud.logs("vicuna", "service", replica=5)
    ids = [call[2]["replica_id"] for call in fake_sky.named("serve.tail_logs")]
    assert ids == [4, 5]
    fake_sky.services = [{"name": "vicuna", "replica_info": []}]
    with pytest.raises(VicunaSkyError, match="has no replicas"):
        cloud.logs("vicuna", "service")
    fake_sky.serve_controller_up = False
    with pytest.raises(VicunaSkyError, match="serve controller is not running"):
        cloud.logs("vicuna", "service")


# -- 8. the dry run offline -----------------------------------------------------------------------


def test_the_dry_run_prints_the_task_offline(tmp_path):
    """No catalog in HOME and no way out (a proxy on a closed loopback port): the catalog
    download fails at once, the task still prints and the plan says why it is missing."""
    home = tmp_path / "home"
    home.mkdir()
    env = {
        **os.environ,
        "HOME": str(home),
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
        "COLUMNS": "200",
    }
    exe = Path(sys.executable).parent / "vicuna-sky"
    out = subprocess.run(
        [str(exe), "train", "vicuna-7b", "--dryrun"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "RUN_TAG: main" in out.stdout and "A100: 8" in out.stdout
    assert "cost plan: unavailable (cannot read SkyPilot's catalog" in out.stdout
    # Which checkpoint interval the launch would use, and the task says the same.
    assert "checkpoint every 100 steps (the recipe's: no plan to choose by)" in out.stdout
    assert re.search(r"CHECKPOINT_EVERY_STEPS: '?100'?\n", out.stdout)


def test_the_dry_run_names_the_planned_checkpoint_interval_the_launch_uses(tmp_path, capsys):
    """With a catalog (the session's fixture), the plan's interval replaces the recipe's in
    the task, and the dry run says so beside the YAML that shows it."""
    runner.launch_recipe(
        Spec.TRAIN, "vicuna-7b", (), dryrun=True, local=False, name=None, runs_dir=tmp_path
    )
    out = capsys.readouterr().out
    said = re.search(r"checkpoint every (\d+) steps: the plan's Young/Daly interval", out)
    assert said, out[-3000:]
    assert said.group(1) != "100"  # not the recipe's
    assert re.search(rf"CHECKPOINT_EVERY_STEPS: '?{said.group(1)}'?\n", out)


def test_fleet_overrides_go_to_the_task_that_declares_them(fake_sky, tmp_path, capsys):
    options = dict(dryrun=True, local=False, name=None, runs_dir=tmp_path)
    envs = ("SERVE_BACKEND=echo", "SERVED_MODEL_NAME=m", "WEBUI_PORT=7000")
    runner.launch_fleet("vicuna-7b", envs, **options)
    printed = capsys.readouterr().out
    assert "SERVE_BACKEND: echo" in printed and "WEBUI_PORT: '7000'" in printed
    assert printed.count("SERVED_MODEL_NAME: m") == 2  # both tasks declare it
    with pytest.raises(SpecError, match=r"declares no env 'SERVE_BACKNED' \(did you mean"):
        runner.launch_fleet("vicuna-7b", ("SERVE_BACKNED=echo",), **options)
    assert not fake_sky.calls


def test_a_fleet_goes_down_workers_first_then_its_controller(fake_sky):
    controller, worker = fleet_tasks()
    cloud.launch_fleet(controller, worker, "vic", workers=2, poll_seconds=0)
    fake_sky.calls.clear()
    gone = cloud.down("vic", "fleet")
    assert gone == ["vic-worker-0", "vic-worker-1", "vic-controller"]
    assert [c[0] for c in fake_sky.calls] == ["jobs.cancel", "jobs.cancel", "down"]
    assert not cloud.FleetState.path("vic").exists()
    assert cloud.down("vic", "fleet") == []


def test_local_data_goes_to_the_bucket_once_by_content(
    fake_sky, tmp_path, moto_endpoint, new_bucket
):
    """A recipe whose data.path is a file here: `train` uploads it (to a local S3 server) under
    its content key before launching and points the job at that object; the same file is not
    uploaded again; a changed file is a new object, and the next job trains on it."""
    import json

    import boto3
    import yaml

    bucket = new_bucket("s3")
    data = tmp_path / "mine.json"
    conversation = [
        {"from": "human", "value": "Hi there, how are you?"},
        {"from": "gpt", "value": "Well!"},
    ]
    data.write_text(json.dumps([{"id": "a", "conversations": conversation}]))
    raw = yaml.safe_load((ROOT / "recipes" / "tiny-cpu.yaml").read_text())
    raw["data"]["path"], raw["bucket"] = str(data), f"s3://{bucket}"
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(raw))
    options = dict(dryrun=False, local=False, name=None, runs_dir=tmp_path, fresh=True)

    def objects() -> list[str]:
        listed = boto3.client("s3").list_objects_v2(Bucket=bucket).get("Contents", [])
        return sorted(o["Key"] for o in listed)

    runner.launch_recipe(Spec.TRAIN, str(tmp_path / "mine.yaml"), (), dryrun=True,
                         **{k: v for k, v in options.items() if k != "dryrun"})  # fmt: skip
    assert objects() == []  # a dry run uploads nothing
    runner.launch_recipe(Spec.TRAIN, str(tmp_path / "mine.yaml"), (), **options)
    first = fake_sky.named("jobs.launch")[-1][3]["DATA_PATH"]
    assert re.fullmatch(r"data/sha256-[0-9a-f]{16}/mine\.json", first)
    assert objects() == [first]
    body = boto3.client("s3").get_object(Bucket=bucket, Key=first)["Body"].read()
    assert body == data.read_bytes()
    put = boto3.client("s3").head_object(Bucket=bucket, Key=first)["LastModified"]
    runner.launch_recipe(Spec.TRAIN, str(tmp_path / "mine.yaml"), (), **options)
    assert fake_sky.named("jobs.launch")[-1][3]["DATA_PATH"] == first
    assert boto3.client("s3").head_object(Bucket=bucket, Key=first)["LastModified"] == put
    data.write_text(json.dumps([{"id": "b", "conversations": conversation}]))
    runner.launch_recipe(Spec.TRAIN, str(tmp_path / "mine.yaml"), (), **options)
    second = fake_sky.named("jobs.launch")[-1][3]["DATA_PATH"]
    assert second != first and objects() == sorted([first, second])
    # Data that is not ShareGPT is refused before anything is uploaded or launched.
    data.write_text('{"not": "a list"}')
    launched = len(fake_sky.named("jobs.launch"))
    with pytest.raises(VicunaSkyError, match="expected a JSON list of samples"):
        runner.launch_recipe(Spec.TRAIN, str(tmp_path / "mine.yaml"), (), **options)
    assert len(fake_sky.named("jobs.launch")) == launched and len(objects()) == 2


def test_no_public_endpoint_without_keys(fake_sky, monkeypatch, capsys):
    """`serve` and `serve --fleet` on a cloud without VICUNA_SKY_API_KEYS are refused before
    anything launches, unless --public; the dry runs say which it would be."""
    options = dict(dryrun=False, local=False, name=None, runs_dir=Path("runs"))
    with pytest.raises(VicunaSkyError, match="VICUNA_SKY_API_KEYS is not set"):
        runner.launch_recipe(Spec.SERVICE, "vicuna-7b", (), **options)
    with pytest.raises(VicunaSkyError, match="--public to serve without keys"):
        runner.launch_fleet("vicuna-7b", (), **options)
    assert fake_sky.calls == []
    runner.launch_fleet("vicuna-7b", (), **{**options, "dryrun": True})
    printed = capsys.readouterr().out
    assert "endpoint: would be refused" in printed
    assert "controller cluster: vicuna-7b-controller; worker jobs: vicuna-7b-worker-0" in printed
    runner.launch_recipe(Spec.SERVICE, "vicuna-7b", (), public=True, **options)
    assert [c[0] for c in fake_sky.calls] == ["serve.up"]
    assert "endpoint: public (--public)" in capsys.readouterr().out
    monkeypatch.setenv("VICUNA_SKY_API_KEYS", "key-test-1234")
    runner.launch_recipe(Spec.SERVICE, "vicuna-7b", (), **{**options, "name": "vic2"})
    assert "clients need one of the keys" in capsys.readouterr().out


def test_preflight_refuses_before_anything_is_launched(
    fake_sky, tmp_path, moto_endpoint, new_bucket, monkeypatch
):
    """Missing data, a gated model without HF_TOKEN, a bucket that cannot be written and GPUs
    too small for the model: each is one line before any upload, cluster or job."""
    import json

    import yaml

    bucket = new_bucket("s3")
    data = tmp_path / "mine.json"
    turns = [
        {"from": "human", "value": "Hi there, how are you?"},
        {"from": "gpt", "value": "Well!"},
    ]
    data.write_text(json.dumps([{"id": "a", "conversations": turns}]))

    def launch(edit, skip=()):
        raw = yaml.safe_load((ROOT / "recipes" / "tiny-cpu.yaml").read_text())
        raw["bucket"] = f"s3://{bucket}"
        raw["data"]["path"] = str(data)
        edit(raw)
        path = tmp_path / f"r{len(list(tmp_path.glob('r*.yaml')))}.yaml"
        path.write_text(yaml.safe_dump(raw))
        options = dict(dryrun=False, local=False, name=None, runs_dir=tmp_path / "runs")
        runner.launch_recipe(Spec.TRAIN, str(path), (), skip_preflight=skip, **options)

    gated = "meta-llama/Llama-2-7b-hf"
    cases = [
        (
            lambda r: r["data"].update(path="data/nothing.json"),
            "preflight data: data 'data/nothing.json' is not in",
        ),
        (
            lambda r: r["model"].update(path=gated),
            f"preflight hf-token: {gated} is gated on the Hugging Face hub (per known list",
        ),
        (
            lambda r: r.update(bucket="s3://no-such-bucket-here"),
            "preflight bucket: cannot write to s3://no-such-bucket-here",
        ),
        (
            lambda r: (
                r["model"].update(params_b=13),
                r["resources"].update(accelerator="L4", gpus_per_node=8),
                r["train"].update(global_batch_size=16),
            ),
            "preflight memory: 13B parameters need about 27.7 GB per GPU on 8 x L4",
        ),
        (
            lambda r: r["resources"].update(clouds=["azure"], regions=[]),
            "preflight clouds: none of the recipe's clouds (azure) is enabled (enabled: aws, gcp)",
        ),
    ]  # fmt: skip
    for edit, message in cases:
        with pytest.raises(VicunaSkyError, match=re.escape(message)) as refused:
            launch(edit)
        assert "\n" not in str(refused.value) and "nothing was launched" in str(refused.value)
        assert fake_sky.calls == [], message
    assert not (tmp_path / "runs").exists()  # no local run either
    # A named check can be skipped: the gated model launches without a token.
    launch(lambda r: r["model"].update(path="meta-llama/Llama-2-7b-hf"), skip=("hf-token",))
    assert [c[0] for c in fake_sky.calls] == ["jobs.launch"]
    with pytest.raises(VicunaSkyError, match="--skip-preflight 'gpu': the checks are clouds"):
        launch(lambda r: None, skip=("gpu",))
    # `sky check` never ran (or found no credentials): one line saying so.
    from vicuna_sky.plan import clouds

    fake_sky.calls.clear()
    monkeypatch.setattr(clouds, "enabled_clouds", lambda verbose=False: frozenset())
    with pytest.raises(VicunaSkyError, match=re.escape("preflight clouds: no cloud is enabled")):
        launch(lambda r: None)
    assert fake_sky.calls == []
