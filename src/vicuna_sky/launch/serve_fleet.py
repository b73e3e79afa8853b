"""`vicuna-sky serve --fleet`: the controller and its workers, on the cloud (a cluster and
managed jobs, launch/cloud.py) or on this machine (localcloud/fleet.py), started or
repaired."""

from __future__ import annotations

from vicuna_sky.launch.backend import Backend, Launch
from vicuna_sky.launch.cost import fleet_machines
from vicuna_sky.launch.report import print_fleet_machines, print_yaml
from vicuna_sky.launch.runner import load_recipe, public_switch
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
    backend: Backend,
    dryrun: bool,
    name: str | None,
    public: bool = False,
    any_cloud: bool = False,
) -> None:
    """The controller and `serve.workers` worker jobs on `backend`: the cloud's, or the local
    cloud's until Ctrl-C."""
    recipe = load_recipe(recipe_arg)
    overrides = parse_env_overrides(envs)
    # Each task takes the overrides it declares (SERVED_MODEL_NAME: both); one that neither
    # declares is refused by the worker's load_task, with the closest name.
    ours = set(read_spec(Spec.CONTROLLER).get("envs") or {})
    switch = public_switch(Spec.CONTROLLER) if public else {}
    mine = {**{k: v for k, v in overrides.items() if k in ours}, **switch}
    controller = load_task(Spec.CONTROLLER, recipe, mine, any_cloud=any_cloud)
    if recipe.serve.tls:  # the operator's certificate for the client port and the UI
        controller.update_secrets({CLIENT_TLS_ENV: serve_tls(recipe)[1]})
    theirs = set(read_spec(Spec.WORKER).get("envs") or {})
    # The controller's URL is known only once it is up; the dry run shows a placeholder.
    worker_overrides = {k: v for k, v in overrides.items() if k in theirs or k not in ours}
    worker = load_task(
        Spec.WORKER,
        recipe,
        {"CONTROLLER_URL": "https://CONTROLLER:8002", **worker_overrides},
        any_cloud=any_cloud,
    )
    fleet = name or recipe.name
    # The controller is what faces clients: the backend admits (or describes) it.
    launch = Launch(Spec.CONTROLLER, recipe, controller, fleet, overrides, public=public)
    if dryrun:
        for spec, task in ((Spec.CONTROLLER, controller), (Spec.WORKER, worker)):
            console.rule(f"[bold]{spec.value}[/] with {recipe.source}")
            print_yaml(resolved_yaml(task))
        workers = ", ".join(f"{fleet}-worker-{i}" for i in range(recipe.serve.workers))
        console.print(f"controller cluster: {fleet}-controller; worker jobs: {workers}")
        if not backend.local:
            backend.describe(launch)
            try:
                print_fleet_machines(fleet_machines(controller, worker, recipe.serve.workers))
            except ValueError as e:
                console.print(f"cost per machine: unavailable ({e})")
            console.print(f"take it all down: vicuna-sky down {fleet} --kind fleet")
        return
    backend.admit(launch)
    backend.launch_fleet(recipe, controller, worker, fleet)
