"""`vicuna-sky serve --fleet`: the controller and its workers, on the cloud (a cluster and
managed jobs, launch/cloud.py) or on this machine (launch/fleet.py), started or repaired."""

from __future__ import annotations

from pathlib import Path

from vicuna_sky.launch import jobs
from vicuna_sky.launch import local as local_lib
from vicuna_sky.launch.report import print_yaml
from vicuna_sky.launch.runner import (
    builtin_models,
    endpoint_access,
    load_recipe,
    refuse_an_open_endpoint,
)
from vicuna_sky.launch.tasks import (
    Spec,
    load_task,
    parse_env_overrides,
    read_spec,
    resolved_yaml,
    serve_tls,
)
from vicuna_sky.serve.tls import CLIENT_TLS_ENV
from vicuna_sky.terminal import make_console

console = make_console()


def launch_fleet(
    recipe_arg: str,
    envs: tuple[str, ...],
    *,
    dryrun: bool,
    local: bool,
    name: str | None,
    runs_dir: Path,
    workdir: Path | None = None,
    public: bool = False,
) -> None:
    """The controller and `serve.workers` worker jobs: on the cloud, or with `local` here on
    the local backend until Ctrl-C (`workdir`: W/runs and W/buckets, as `train --workdir`)."""
    recipe = load_recipe(recipe_arg)
    overrides = parse_env_overrides(envs)
    # Each task takes the overrides it declares (SERVED_MODEL_NAME: both); one that neither
    # declares is refused by the worker's load_task, with the closest name.
    ours = set(read_spec(Spec.CONTROLLER).get("envs") or {})
    controller = load_task(
        Spec.CONTROLLER, recipe, {k: v for k, v in overrides.items() if k in ours}
    )
    if recipe.serve.tls:  # the operator's certificate for the client port and the UI
        controller.update_secrets({CLIENT_TLS_ENV: serve_tls(recipe)[1]})
    theirs = set(read_spec(Spec.WORKER).get("envs") or {})
    # The controller's URL is known only once it is up; the dry run shows a placeholder.
    worker_overrides = {k: v for k, v in overrides.items() if k in theirs or k not in ours}
    worker = load_task(
        Spec.WORKER, recipe, {"CONTROLLER_URL": "https://CONTROLLER:8002", **worker_overrides}
    )
    if dryrun:
        for spec, task in ((Spec.CONTROLLER, controller), (Spec.WORKER, worker)):
            console.rule(f"[bold]{spec.value}[/] with {recipe.source}")
            print_yaml(resolved_yaml(task))
        fleet = name or recipe.name
        workers = ", ".join(f"{fleet}-worker-{i}" for i in range(recipe.serve.workers))
        console.print(f"controller cluster: {fleet}-controller; worker jobs: {workers}")
        if not local:
            console.print(endpoint_access(controller, public)[1])
        return
    if not local:
        refuse_an_open_endpoint(controller, public)
    if local:
        if workdir is not None:
            runs_dir = workdir / "runs"
        config = local_lib.LocalConfig(
            runs_dir=runs_dir, bucket_root=workdir / "buckets" if workdir else None
        )
        run_fleet_locally(controller, worker, name or recipe.name, recipe.serve.workers, config)
        return
    from vicuna_sky.launch import cloud

    fleet = cloud.launch_fleet(controller, worker, name or recipe.name, recipe.serve.workers)
    how = (
        "reused (up, and it answers)"
        if fleet.controller_reused
        else "relaunched (its cluster was up but it did not answer)"
        if fleet.controller_relaunched
        else "launched"
    )
    console.print(f"controller {how} at {fleet.url}")
    if recipe.serve.tls:
        console.print(f"clients and the chat UI: https with {recipe.path_of(recipe.serve.tls)}")
    else:
        console.print(
            f"its certificate: SHA-256 {fleet.fingerprint}, in {fleet.certificate} (clients "
            "trust that certificate alone: README, 'Calling the fleet over TLS')"
        )
    for what, jobs_ in (
        ("worker job(s) launched", fleet.launched),
        ("running worker job(s) kept", fleet.kept),
        ("worker job(s) cancelled (they pointed at the old controller)", fleet.cancelled),
    ):
        if jobs_:
            console.print(f"{what}: {', '.join(jobs_)}")


def run_fleet_locally(
    controller: object, worker: object, name: str, workers: int, config: local_lib.LocalConfig
) -> None:
    """sky/serve-controller.yaml and sky/serve-worker.yaml on this machine until Ctrl-C: a
    worker that dies is relaunched like a preempted managed job. A re-run while the fleet's
    workers run (another terminal) repairs it: a controller that answers is left alone; a
    dead one is started again here, on its port with its secret and certificate, and the
    running workers register with it."""
    import time

    from vicuna_sky.launch.fleet import LocalSkyFleet
    from vicuna_sky.launch.fleet_state import FleetState

    builtin_models(worker, config)
    runs = Path(config.runs_dir)
    live = [j for j in jobs.list_jobs(runs) if j.name.startswith(f"{name}-worker-")]
    live = [j for j in live if jobs.in_progress(j)]
    state = FleetState.load(name, runs) if live else FleetState()
    fleet = LocalSkyFleet(
        controller,
        worker,
        name,
        workers,
        config,
        on_event=lambda m: console.print(f"  {m}"),
        spec_ports=True,
        state=state,
    )
    if live and fleet.registered() is not None:
        console.print(
            f"fleet {name} is up at {fleet.url} ({fleet.healthy_workers()} worker(s) in "
            f"rotation, launcher pid {live[0].pid}): nothing to repair"
        )
        return
    try:
        if live:
            console.print(
                f"fleet {name}: {len(live)} worker job(s) run (pid {live[0].pid}) but the "
                f"controller at {fleet.url} does not answer: relaunching it"
            )
            with console.status("starting the controller; waiting for the workers..."):
                fleet.start_controller()
                fleet.wait_registered(len(live))
            console.print(
                f"[bold]controller relaunched[/]: {fleet.healthy_workers()} worker(s) "
                f"registered again\n  OpenAI API: {fleet.url}/v1; Ctrl-C stops this controller"
            )
        else:
            fleet.state.save(name, runs)  # before the start: a re-run can repair it
            with console.status(f"starting the controller and {workers} worker job(s)..."):
                url = fleet.start()
            ui = controller.secrets.get("VICUNA_SKY_UI_PASSWORD")
            console.print(
                f"[bold]fleet up[/] ({workers} worker(s)); Ctrl-C or `vicuna-sky down {name} "
                f"--local` stops it\n  OpenAI API: {url}/v1\n  chat UI: "
                + (
                    f"http://127.0.0.1:{fleet.webui_port}"
                    if ui and ui.get_secret_value()
                    else "off (export VICUNA_SKY_UI_PASSWORD to serve it)"
                )
            )
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        console.print("stopping the fleet")
    finally:
        fleet.stop()
