"""The cloud runner: the SkyPilot SDK calls behind `vicuna-sky train|serve|eval|status|logs|down`.

Managed jobs (training, evaluation) go to `sky.jobs.launch`, the SkyServe service to
`sky.serve.up`, and the controller/worker fleet to `sky.launch` clusters. Everything here
goes through SkyPilot's API server, which starts itself on first use.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from vicuna_sky.launch.tasks import Spec

if TYPE_CHECKING:
    import sky

CONTROLLER_PORT = 8000


def launch(spec: Spec, task: sky.Task, name: str) -> Any:
    """Launch one task the way its spec is meant to run; returns SkyPilot's result."""
    import sky

    if spec in (Spec.TRAIN, Spec.EVAL):
        request = sky.jobs.launch(task, name=name)
    elif spec is Spec.SERVICE:
        request = sky.serve.up(task, service_name=name)
    else:
        request = sky.launch(task, cluster_name=name)
    return sky.stream_and_get(request)


def launch_fleet(controller: sky.Task, worker: sky.Task, name: str, workers: int) -> str:
    """Controller on an on-demand CPU node, then `workers` spot workers registering with it."""
    import secrets

    import sky

    secret = secrets.token_urlsafe(24)
    for task in (controller, worker):
        task.update_secrets({"FLEET_SECRET": secret})
    launch(Spec.CONTROLLER, controller, f"{name}-controller")
    endpoints = sky.get(sky.endpoints(f"{name}-controller", port=CONTROLLER_PORT))
    url = (
        endpoints[CONTROLLER_PORT]
        if CONTROLLER_PORT in endpoints
        else endpoints[str(CONTROLLER_PORT)]
    )
    url = url if url.startswith("http") else f"http://{url}"
    worker.update_envs({"CONTROLLER_URL": url})
    for i in range(workers):
        launch(Spec.WORKER, worker, f"{name}-worker-{i}")
    return url


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


def status() -> list[dict[str, str]]:
    """Managed jobs, clusters and services, in one list of rows."""
    with _api_server_for_this_call():
        return _status()


def _status() -> list[dict[str, str]]:
    import sky

    rows = []
    for job in _or_none(lambda: sky.jobs.queue(refresh=False)):
        record = job if isinstance(job, dict) else job.model_dump()
        duration = float(record.get("job_duration") or 0.0)
        rows.append(
            {
                "kind": "job",
                "name": str(record.get("job_name")),
                "status": _name(record.get("status")),
                # Realized cost needs prices: cost.realized_from_managed_job(record, prices).
                "recoveries": str(record.get("recovery_count", "-")),
                "hours": f"{duration / 3600:.2f}",
            }
        )
    for cluster in _or_none(sky.status):
        record = cluster if isinstance(cluster, dict) else cluster.model_dump()
        rows.append(
            {
                "kind": "cluster",
                "name": str(record.get("name")),
                "status": _name(record.get("status")),
            }
        )
    for service in _or_none(lambda: sky.serve.status(None)):
        rows.append(
            {
                "kind": "service",
                "name": str(service.get("name")),
                "status": _name(service.get("status")),
            }
        )
    return rows


def logs(name: str, kind: str) -> None:
    import sky

    if kind == "job":
        sky.jobs.tail_logs(name=name, follow=True)
    elif kind == "service":
        sky.serve.tail_logs(name, target="replica", replica_id=1, follow=True)
    else:
        sky.tail_logs(name, job_id=None, follow=True)


def down(name: str, kind: str) -> None:
    import sky

    if kind == "job":
        sky.stream_and_get(sky.jobs.cancel(name=name))
    elif kind == "service":
        sky.stream_and_get(sky.serve.down(name))
    else:
        sky.stream_and_get(sky.down(name))


def _name(status: Any) -> str:
    return str(getattr(status, "value", status))
