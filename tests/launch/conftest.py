"""What the cloud-path tests share: SkyPilot's SDK faked at its boundary (`FakeSky`, the
`fake_sky` fixture), the recipes they launch and the secrets they set."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from vicuna_sky.launch import cloud
from vicuna_sky.recipe import Recipe

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
        self.run_controller = None
        """When set (the `controller_vms` fixture): a fleet controller cluster's task really
        runs, as a controller process on loopback; called with the task and the ports it had
        (a relaunch on an UP cluster keeps them), it returns the process and its ports."""
        self.running: dict[str, object] = {}  # cluster -> what runs its task (has .close())

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
            "cancel": self.cancel,
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
            if self.run_controller and cluster_name.endswith("-controller"):
                same_host = self.clusters.get(cluster_name) == "UP" and self.ports
                running, self.ports = self.run_controller(task, self.ports if same_host else None)
                self.host, self.running[cluster_name] = "127.0.0.1", running
            self.clusters[cluster_name] = "UP"
            return 1, None

        return run

    def down(self, cluster_name, purge=False):
        def run():
            self.calls.append(("down", cluster_name))
            self.clusters.pop(cluster_name, None)
            self.stop(cluster_name)

        return run

    def cancel(self, cluster_name, all=False):  # SkyPilot's own keyword
        def run():
            import sky

            if self.clusters.get(cluster_name) != "UP":  # as sky.cancel documents it
                raise sky.exceptions.ClusterNotUpError(f"{cluster_name} is not up")
            self.calls.append(("cancel", cluster_name, all))
            self.stop(cluster_name)  # its job's processes end; the cluster stays UP

        return run

    def stop(self, cluster_name: str) -> None:
        running = self.running.pop(cluster_name, None)
        if running is not None:
            running.close()

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
            self.jobs.append(
                {
                    "job_id": len(self.jobs) + 1,
                    "job_name": name,
                    "task_name": task.name,
                    "status": "RUNNING",
                }
            )
            return [len(self.jobs)], None

        return run

    def queue_v2(self, refresh, skip_finished=False, **kwargs):
        def run():
            self._jobs_controller()
            done = {"SUCCEEDED", "FAILED", "FAILED_SETUP", "CANCELLED"}
            records = [j for j in self.jobs if not (skip_finished and j["status"] in done)]
            # As the API server sends them: JSON, so no string is the launcher's own object.
            records = json.loads(json.dumps(records))
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


@pytest.fixture
def controller_vms(fake_sky, tmp_path):
    """Fleet controller clusters that run their task: the controller SkyPilot would start, as a
    process on loopback with the task's own fleet secret and certificate (its fleet port TLS),
    so the launcher's checks of it are real. Yields the fleets started, in order."""
    from vicuna_sky.serve.local_fleet import LocalFleet

    started: list[LocalFleet] = []

    def run(task, ports: dict[int, int] | None):
        secrets = {k: v.get_secret_value() for k, v in task.secrets.items()}
        folder = tmp_path / f"controller-{len(started)}"
        fleet = LocalFleet(folder, secrets["VICUNA_SKY_FLEET_SECRET"], tls=True)
        fleet.tls_pem = secrets["VICUNA_SKY_FLEET_TLS"]
        if ports:  # the same machine: the same ports
            fleet.port, fleet.fleet_port = ports[8000], ports[8002]
            fleet.url = f"http://127.0.0.1:{fleet.port}"
        fleet.start_controller()
        started.append(fleet)
        return fleet, {8000: fleet.port, 8002: fleet.fleet_port}

    fake_sky.run_controller = run
    yield started
    for fleet in started:
        fleet.close()
