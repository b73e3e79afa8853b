"""The cloud runner: the SkyPilot SDK calls behind `vicuna-sky train|serve|eval|status|logs|down`.

Managed jobs (training, evaluation, fleet workers) go to `sky.jobs.launch`, the SkyServe service
to `sky.serve.up`, and the fleet's controller to a `sky.launch` cluster (on-demand, it must
outlive the workers). Everything here goes through SkyPilot's API server, which starts itself on
first use; tests replace the SDK functions at this boundary.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vicuna_sky.errors import VicunaSkyError
from vicuna_sky.launch.fleet_state import (
    FleetState,
    forget_certificate,
    keep_certificate,
    recover_certificate,
)
from vicuna_sky.launch.tasks import Spec, one_line
from vicuna_sky.serve.tls import FLEET_TLS_ENV, trusting

if TYPE_CHECKING:
    import sky

CONTROLLER_PORT = 8000
FLEET_PORT = 8002
"""The controller's TLS port for workers (sky/serve-controller.yaml)."""
ENDPOINT_WAIT_SECONDS = 900.0
"""How long a fleet launch waits for the controller's port to be exposed."""


def launch(spec: Spec, task: sky.Task, name: str) -> Any:
    """Launch one task the way its spec is meant to run; returns SkyPilot's result."""
    import sky

    if spec in (Spec.TRAIN, Spec.EVAL, Spec.WORKER):
        # Fleet workers too: a managed job is relaunched after a preemption (job_recovery in
        # sky/serve-worker.yaml) and torn down when its setup fails, where a plain spot cluster
        # would stay down, or stay up billing.
        request = sky.jobs.launch(task, name=name)
    elif spec is Spec.SERVICE:
        request = sky.serve.up(task, service_name=name)
    else:
        request = sky.launch(task, cluster_name=name)
    return sky.stream_and_get(request)


@dataclass
class FleetLaunch:
    """What `launch_fleet` did."""

    url: str
    controller_reused: bool
    controller_relaunched: bool = False
    """Its cluster was up but the controller did not answer: the task ran on it again."""
    launched: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    fingerprint: str = ""
    """SHA-256 of the certificate the controller's ports (clients, UI, fleet) show."""
    certificate: Path | None = None
    """That certificate (public), for clients to trust it and nothing else (tls.trusting)."""


def launch_fleet(
    controller: sky.Task,
    worker: sky.Task,
    name: str,
    workers: int,
    wait_seconds: float = ENDPOINT_WAIT_SECONDS,
    poll_seconds: float = 5.0,
) -> FleetLaunch:
    """An on-demand controller (reused when it is up and answers, relaunched when its cluster
    is up but it does not), then managed spot jobs `<name>-worker-<i>` up to `workers`,
    registering with it over TLS on its fleet port.

    The fleet secret is the one this fleet was launched with, else VICUNA_SKY_FLEET_SECRET from
    the user's environment, else a new one; it reaches both tasks as a SkyPilot secret, as does
    the controller's certificate (made once per fleet, its fingerprint pinned by the workers).
    A relaunched controller has the same URL, secret and certificate: running workers register
    with it again by themselves."""
    import sky

    cluster = f"{name}-controller"
    state = FleetState.load(name)
    # Refreshed from the cloud: a cluster the cloud has lost must not read as UP.
    up = _cluster_status(cluster, refresh=True) == "UP"
    secret = state.secret or controller.secrets.get("VICUNA_SKY_FLEET_SECRET")
    secret = secret.get_secret_value() if hasattr(secret, "get_secret_value") else secret
    if up and not secret:
        raise VicunaSkyError(
            f"{cluster} is running but its fleet secret is not known here: export "
            "VICUNA_SKY_FLEET_SECRET=<its secret>, or take it down "
            f"(vicuna-sky down {cluster} --kind cluster)"
        )
    state.secret = secret or secrets.token_urlsafe(24)
    bucket = worker.envs.get("BUCKET_URL", "")
    if not state.tls and secret and bucket:
        # Another machine's fleet (no state here, its secret exported): its certificate, so
        # the running controller is recognised and new workers pin what it shows. One sealed
        # with another secret matters only while its controller runs: else a new fleet of
        # the old name starts afresh.
        try:
            state.tls = recover_certificate(bucket, name, secret)
        except VicunaSkyError:
            if up:
                raise
    pem, fingerprint = state.certificate(name)
    if bucket:
        keep_certificate(bucket, name, state.secret, pem)
        state.bucket = bucket
    state.save(name)  # before the launch: an interrupted launch can still be re-run
    for task in (controller, worker):
        task.update_secrets({"VICUNA_SKY_FLEET_SECRET": state.secret})
    controller.update_secrets({FLEET_TLS_ENV: pem})

    def fleet_port_url() -> str:
        return https(wait_for_endpoint(cluster, FLEET_PORT, wait_seconds, poll_seconds))

    # Asked on the fleet port, over TLS with the fleet's certificate pinned: the secret never
    # crosses the network in clear, nor reaches whoever else might hold the address.
    reused = up and controller_answers(fleet_port_url(), state.secret, pem)
    if up and not reused:
        # sky.launch on an UP cluster submits a job beside the old one (SkyPilot 0.14.1,
        # execution.py:905-919): a hung controller would keep its ports and the new one could
        # not bind them. Its jobs are cancelled first.
        sky.stream_and_get(sky.cancel(cluster, all=True))
    if not reused:  # no cluster, or one whose controller is dead: (re)run the task on it
        launch(Spec.CONTROLLER, controller, cluster)
    url = https(wait_for_endpoint(cluster, CONTROLLER_PORT, wait_seconds, poll_seconds))
    fleet_url = fleet_port_url()
    if not reused:
        # sky.launch returns once the job is submitted, its setup still running: GPU workers
        # launched now would bill against a controller that may never start, and spin.
        deadline = time.monotonic() + wait_seconds
        while not controller_answers(fleet_url, state.secret, pem, tries=1):
            if time.monotonic() >= deadline:
                raise VicunaSkyError(
                    f"{cluster}: the controller does not answer on {fleet_url} after "
                    f"{wait_seconds:.0f} s, so no worker was launched: see `vicuna-sky logs "
                    f"{cluster} --kind cluster`, then re-run (or `vicuna-sky down {name} "
                    "--kind fleet`)"
                )
            time.sleep(poll_seconds)
    result = FleetLaunch(
        url=url,
        controller_reused=reused,
        controller_relaunched=up and not reused,
        fingerprint=fingerprint,
        certificate=state.write_certificate(name),
    )
    live = _live_jobs(f"{name}-worker-")
    if state.controller_url and state.controller_url != url:
        # Workers keep the CONTROLLER_URL they were launched with: after the controller moved
        # they would register with nobody.
        for job in sorted(live):
            sky.stream_and_get(sky.jobs.cancel(name=job))
            result.cancelled.append(job)
        live = set()
    state.controller_url = url
    state.save(name)
    worker.update_envs({"CONTROLLER_URL": fleet_url, "CONTROLLER_FINGERPRINT": fingerprint})
    for i in range(workers):
        job = f"{name}-worker-{i}"
        if job in live:
            result.kept.append(job)
            continue
        launch(Spec.WORKER, worker, job)
        result.launched.append(job)
    return result


def service_tls(task: sky.Task, name: str) -> tuple[str, Path]:
    """SkyServe's load balancer ends TLS for the service's clients (`service.tls`): with the
    recipe's certificate when it has one, else with one made for this service once and kept
    with its state (a key file, 0600, that SkyServe uploads to its controller). Returns the
    fingerprint clients pin and the certificate they trust (tls.trusting)."""
    from sky.serve import serve_utils

    from vicuna_sky.serve.tls import certificate_pem, fingerprint

    credential = task.service.tls_credential
    state = FleetState.load(name)
    if credential is None:
        pem, _ = state.certificate(name)
        state.save(name)
        keyfile = FleetState.path(name).with_suffix(".pem")
        fd = os.open(keyfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(pem)
        task.service.tls_credential = serve_utils.TLSCredential(str(keyfile), str(keyfile))
    else:
        pem = Path(credential.certfile).read_text()
    crt = FleetState.path(name).with_suffix(".crt")
    crt.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    crt.write_text(certificate_pem(pem))
    return fingerprint(pem), crt


def https(endpoint: str) -> str:
    """An endpoint's URL (wait_for_endpoint's) as https: the controller's ports are https off
    loopback (serve/controller.py), whatever scheme SkyPilot names."""
    return urllib.parse.urlsplit(endpoint)._replace(scheme="https").geturl()


def controller_answers(
    fleet_url: str, secret: str, pem: str, tries: int = 3, timeout: float = 5.0
) -> bool:
    """Whether the controller at `fleet_url` (its fleet port) answers its admin route with the
    fleet secret, showing the fleet's certificate (`pem`): a cluster SkyPilot calls UP may
    hold a controller process that died. Another certificate gets no secret."""
    import httpx

    for attempt in range(tries):
        try:
            r = httpx.get(
                f"{fleet_url}/workers",
                headers={"Authorization": f"Bearer {secret}"},
                timeout=timeout,
                follow_redirects=False,
                verify=trusting(pem),
            )
            if r.status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        if attempt + 1 < tries:
            time.sleep(1.0)
    return False


def wait_for_endpoint(
    cluster: str,
    port: int,
    wait_seconds: float = ENDPOINT_WAIT_SECONDS,
    poll_seconds: float = 5.0,
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """The URL of `port` on `cluster`, once SkyPilot has exposed it: `sky.endpoints` answers
    {} (or raises) until the cloud's firewall rule is in place."""
    import sky

    deadline = time.monotonic() + wait_seconds
    why = "no endpoint yet"
    while True:
        try:
            endpoints = sky.get(sky.endpoints(cluster, port=port)) or {}
        except (ValueError, RuntimeError, sky.exceptions.ClusterNotUpError) as e:
            endpoints, why = {}, one_line(e)
        url = endpoints.get(port) or endpoints.get(str(port))
        if url:
            return url if url.startswith(("http://", "https://")) else f"http://{url}"
        if time.monotonic() >= deadline:
            raise VicunaSkyError(
                f"{cluster}: port {port} not exposed after {wait_seconds:.0f} s ({why})"
            )
        sleep(poll_seconds)


def _cluster_status(cluster: str, refresh: bool = False) -> str | None:
    """SkyPilot's status of one cluster (UP, INIT, STOPPED), None when there is none;
    `refresh` asks the cloud instead of SkyPilot's records."""
    from sky.utils.common import StatusRefreshMode

    import sky

    mode = StatusRefreshMode.FORCE if refresh else StatusRefreshMode.NONE
    for record in _or_none(lambda: sky.status(cluster_names=[cluster], refresh=mode)):
        record = record if isinstance(record, dict) else record.model_dump()
        if record.get("name") == cluster:
            return _name(record.get("status"))
    return None


def job_in_progress(name: str, task_name: str = "") -> str:
    """The managed job, pending, running or recovering, named `name` or whose task is named
    `task_name` (a training run's checkpoints, tasks.run_key); '' when there is none."""
    with _api_server_for_this_call():
        for r in _job_records(skip_finished=True):
            if r.get("job_name") == name or (task_name and r.get("task_name") == task_name):
                return str(r.get("job_name"))
    return ""


def _live_jobs(prefix: str) -> set[str]:
    """Names of managed jobs starting with `prefix` that are not finished."""
    return {
        str(r.get("job_name"))
        for r in _job_records(skip_finished=True)
        if str(r.get("job_name", "")).startswith(prefix)
    }


def _job_records(skip_finished: bool = False) -> list[dict]:
    import sky

    answer = _or_none(lambda: sky.jobs.queue_v2(refresh=False, skip_finished=skip_finished))
    # queue_v2 answers (records, total, status counts, total unfiltered).
    records = answer[0] if isinstance(answer, tuple) else answer
    return [r if isinstance(r, dict) else r.model_dump() for r in records or []]


def _or_none(request: Callable[[], Any]) -> list:
    """A listing whose controller was never started is empty, not an error."""
    import sky

    try:
        return sky.get(request())
    except sky.exceptions.ClusterNotUpError:
        return []


@contextlib.contextmanager
def _api_server_for_this_call() -> Iterator[None]:
    """SkyPilot's SDK starts a local API server on first use and leaves it running; one that a
    look at the status started is stopped again (a launch's is left: its jobs need it)."""
    from sky.server import common

    local = common.is_api_server_local()
    was_up = local and common.get_api_server_status().status == common.ApiServerStatus.HEALTHY
    try:
        yield
    finally:
        if local and not was_up:
            import sky

            with contextlib.suppress(Exception):
                sky.api_stop()


def api_server_up() -> bool:
    """Whether SkyPilot's API server answers now (a remote one counts as up): asking a local
    server that is down would start one."""
    from sky.server import common

    if not common.is_api_server_local():
        return True
    try:
        return common.get_api_server_status().status == common.ApiServerStatus.HEALTHY
    except Exception:
        return False


@dataclass
class Section:
    """One part of `vicuna-sky status`: its rows, or why it has none."""

    title: str
    rows: list[dict[str, str]] = field(default_factory=list)
    note: str = ""


def status() -> list[Section]:
    """Managed jobs, clusters and services, each section on its own: a controller that is not
    running (a user who only trained has no serve controller) says so in its own section."""
    with _api_server_for_this_call():
        return [
            _section("managed jobs", "jobs controller", _job_rows),
            _section("clusters", "", _cluster_rows),
            _section("services", "serve controller", _service_rows),
        ]


def _section(title: str, controller: str, rows: Callable[[], list[dict[str, str]]]) -> Section:
    import sky

    try:
        return Section(title, rows())
    except sky.exceptions.ClusterNotUpError:
        return Section(title, note=f"{controller} not running")
    except Exception as e:  # the API server, the network: this section only
        return Section(title, note=f"unavailable: {one_line(e)}")


def _job_rows() -> list[dict[str, str]]:
    import sky

    answer = sky.get(sky.jobs.queue_v2(refresh=False))
    records = answer[0] if isinstance(answer, tuple) else answer
    rows = []
    for job in records or []:
        record = job if isinstance(job, dict) else job.model_dump()
        duration = float(record.get("job_duration") or 0.0)
        rows.append(
            {
                "name": str(record.get("job_name")),
                "status": _name(record.get("status")),
                # Realized cost needs prices: cost.realized_from_managed_job(record, prices).
                "recoveries": str(record.get("recovery_count", "-")),
                "hours": f"{duration / 3600:.2f}",
            }
        )
    return rows


def _cluster_rows() -> list[dict[str, str]]:
    import sky

    rows = []
    for cluster in sky.get(sky.status()) or []:
        record = cluster if isinstance(cluster, dict) else cluster.model_dump()
        rows.append({"name": str(record.get("name")), "status": _name(record.get("status"))})
    return rows


def _service_rows() -> list[dict[str, str]]:
    import sky

    rows = []
    for service in sky.get(sky.serve.status(None)) or []:
        replicas = service.get("replica_info") or []
        ready = sum(1 for r in replicas if _name(r.get("status")) == "READY")
        rows.append(
            {
                "name": str(service.get("name")),
                "status": _name(service.get("status")),
                "replicas": f"{ready}/{len(replicas)} ready",
                "endpoint": str(service.get("endpoint") or "-"),
            }
        )
    return rows


def logs(name: str, kind: str, replica: int | None = None) -> None:
    import sky

    if kind == "job":
        sky.jobs.tail_logs(name=name, follow=True)
    elif kind == "service":
        replica_id = replica if replica is not None else pick_replica(name)
        sky.serve.tail_logs(name, target="replica", replica_id=replica_id, follow=True)
    else:
        sky.tail_logs(name, job_id=None, follow=True)


def pick_replica(service: str) -> int:
    """A live replica of `service`: the newest READY one, else the newest of any status.
    Replica ids are not stable: a preempted replica is replaced under a new id."""
    import sky

    try:
        records = sky.get(sky.serve.status(service)) or []
    except sky.exceptions.ClusterNotUpError:
        raise VicunaSkyError(
            f"no service {service!r}: the serve controller is not running"
        ) from None
    replicas = [r for record in records for r in record.get("replica_info") or []]
    if not replicas:
        raise VicunaSkyError(f"service {service!r} has no replicas (yet): see `vicuna-sky status`")
    ready = [r for r in replicas if _name(r.get("status")) == "READY"]
    return int(max(ready or replicas, key=lambda r: int(r["replica_id"]))["replica_id"])


def down(name: str, kind: str) -> list[str]:
    """Cancel a managed job, take a service down, tear a cluster down, or (kind "fleet") all of
    a fleet: its worker jobs first (they would re-register with nothing), then its controller,
    then the launcher's record of its secret. Returns what was taken down."""
    import sky

    if kind == "fleet":
        gone = []
        for job in sorted(_live_jobs(f"{name}-worker-")):
            sky.stream_and_get(sky.jobs.cancel(name=job))
            gone.append(job)
        if _cluster_status(f"{name}-controller") is not None:
            sky.stream_and_get(sky.down(f"{name}-controller"))
            gone.append(f"{name}-controller")
        state = FleetState.load(name)
        if state.bucket:  # the sealed certificate goes with the fleet
            forget_certificate(state.bucket, name)
        FleetState.path(name).unlink(missing_ok=True)
        return gone
    if kind == "job":
        sky.stream_and_get(sky.jobs.cancel(name=name))
    elif kind == "service":
        sky.stream_and_get(sky.serve.down(name))
    else:
        sky.stream_and_get(sky.down(name))
    return [name]


def _name(status: Any) -> str:
    return str(getattr(status, "value", status))
