"""What each `vicuna-sky` command does, as a sequence of named steps over one `Backend`:
recipe -> task -> cost plan -> checks -> staged data -> dry run, or the backend's launch."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rich.table import Table

from vicuna_sky.errors import VicunaSkyError
from vicuna_sky.launch import jobs, preflight
from vicuna_sky.launch.backend import Backend, Launch
from vicuna_sky.launch.report import print_plan, print_yaml
from vicuna_sky.launch.tasks import (
    Spec,
    checkpoint_url,
    load_task,
    missing_secrets,
    one_line,
    parse_env_overrides,
    read_spec,
    resolve_recipe,
    resolved_yaml,
    set_accelerators,
)
from vicuna_sky.recipe import Recipe
from vicuna_sky.terminal import make_console

if TYPE_CHECKING:
    from vicuna_sky.launch.preflight import Finding

console = make_console()


def load_recipe(arg: str) -> Recipe:
    return Recipe.from_yaml(resolve_recipe(arg))


def launch_recipe(
    spec: Spec,
    recipe_arg: str,
    envs: tuple[str, ...],
    *,
    backend: Backend,
    dryrun: bool,
    name: str | None,
    over_budget: bool = False,
    fresh: bool = False,
    public: bool = False,
    skip_preflight: tuple[str, ...] = (),
    any_cloud: bool = False,
) -> jobs.LocalJob | None:
    """Launch a spec for a recipe on `backend` (SkyPilot's clouds, or the local cloud on this
    machine: the command line chooses, cli/backends.py). `fresh` gives a training run a new
    RUN_TAG, so it starts from step 0 instead of resuming from the checkpoints of the run name.

    The steps, in order: build the task, plan its cost, check what needs nothing, check the
    bucket, stage the data; then a dry run shows what they decided, and a launch admits the
    task (keys, secrets, the uploaded data, no second run) and hands it to the backend."""
    launch = build(spec, recipe_arg, envs, name, fresh=fresh, public=public, any_cloud=any_cloud)
    launch.over_budget, launch.skip_preflight = over_budget, skip_preflight
    plan_cost(launch)
    findings = check(launch, backend, preflight.NOTHING, dryrun)
    if not dryrun:  # a dry run writes nothing, not even the bucket's probe
        check(launch, backend, preflight.BUCKET, dryrun)
    stage_data(launch, backend, dryrun)
    if dryrun:
        show(launch, backend, findings)
        return None
    admit(launch, backend)
    return backend.launch(launch)


def build(
    spec: Spec,
    recipe_arg: str,
    envs: tuple[str, ...],
    name: str | None,
    fresh: bool = False,
    public: bool = False,
    any_cloud: bool = False,
) -> Launch:
    """The task of `spec` for the recipe, with the `--env` overrides (a fresh RUN_TAG with
    `fresh`; with `public`, the spec's switch that opens its API without keys; `any_cloud`:
    off the bucket's cloud too), named `name` or after the recipe and the spec."""
    recipe = load_recipe(recipe_arg)
    overrides = parse_env_overrides(envs)
    if fresh:
        overrides.setdefault("RUN_TAG", fresh_tag())
    if public:
        overrides.update(public_switch(spec))
    if "LAUNCH_ID" in (read_spec(spec).get("envs") or {}):
        overrides.setdefault("LAUNCH_ID", launch_id())  # restarts after failures count per launch
    task = load_task(spec, recipe, overrides, any_cloud=any_cloud)
    task.name = name or f"{recipe.name}-{spec.name.lower()}"
    return Launch(spec, recipe, task, task.name, overrides, fresh=fresh, public=public)


def public_switch(spec: Spec) -> dict[str, str]:
    """`--public` as the spec's process reads it: the env its controller takes it from (the
    flag alone would stop at the launcher, and the controller refuse to start without keys)."""
    from vicuna_sky.serve.auth import PUBLIC_ENV

    return {PUBLIC_ENV: "1"} if PUBLIC_ENV in (read_spec(spec).get("envs") or {}) else {}


def plan_cost(launch: Launch) -> None:
    """A GPU training run's cost plan: the GPU types offered to SkyPilot and, when the recipe
    asks, the checkpoint interval (train_plan)."""
    if launch.spec is Spec.TRAIN and launch.recipe.resources.accelerator:
        launch.plan, launch.no_plan = train_plan(launch.recipe, launch.task, launch.overrides)


def check(launch: Launch, backend: Backend, needs: str, dryrun: bool) -> list[Finding]:
    """The backend's checks that need `needs`: refused at the first that fails (a dry run
    only reports them). What needs nothing comes with the budget of a run that bills."""
    findings = backend.preflight(launch, needs)
    if not dryrun:
        preflight.refuse(findings)
        if needs == preflight.NOTHING and backend.bills and launch.spec is Spec.TRAIN:
            check_budget(launch.recipe, launch.over_budget, launch.plan)
    return findings


def stage_data(launch: Launch, backend: Backend, dryrun: bool) -> None:
    """A training run's local data (or the packaged sample) uploaded to where the backend
    reads it; a dry run says what it would upload."""
    if launch.spec is Spec.TRAIN:
        push_local_data(
            launch.recipe,
            launch.task,
            backend.data_bucket(launch),
            backend.workspace(),
            dryrun,
            launch.overrides,
        )


def show(launch: Launch, backend: Backend, findings: list[Finding]) -> None:
    """What the steps decided, for a dry run: the checks, the task, the secrets it lacks, the
    backend's places and the cost plan."""
    for finding in findings:
        mark = "" if finding.ok else "[yellow]would be refused:[/] "
        console.print(mark + finding.line)
    console.rule(f"[bold]{launch.spec.value}[/] with {launch.recipe.source}")
    print_yaml(resolved_yaml(launch.task))
    for key in missing_secrets(launch.spec, launch.task):
        console.print(f"[yellow]warning:[/] {key} is not set in your environment")
    backend.describe(launch)
    if launch.plan is not None:
        print_plan(launch.recipe, plan=launch.plan)
    elif launch.no_plan:  # offline, no catalog: the task above still stands
        console.print(f"cost plan: unavailable ({launch.no_plan})")


def admit(launch: Launch, backend: Backend) -> None:
    """The last checks before the backend gets the task: an endpoint's keys, the task's
    secrets, the data now in the bucket, and no second run of the same training job."""
    spec, task = launch.spec, launch.task
    backend.admit(launch)
    missing = missing_secrets(spec, task)
    if missing:
        raise VicunaSkyError(
            f"{spec.value} needs {', '.join(missing)}: export it in your environment "
            "(it travels as a SkyPilot secret)"
        )
    if spec is Spec.TRAIN and "RUN_TAG" in task.envs:
        console.print(f"checkpoints: {checkpoint_url(task)} (resumes from the newest there)")
    preflight.refuse(backend.preflight(launch, preflight.UPLOADED))
    if spec is Spec.TRAIN and not launch.fresh:
        refuse_a_second_run(launch, backend)


def refuse_a_second_run(launch: Launch, backend: Backend) -> None:
    """Two runs of one training job would write checkpoints under the same bucket prefix, each
    resuming from the other's: a second one is refused while the first is in progress, under
    its name or under another (`--name`) with the same RUN_NAME and RUN_TAG."""
    live, where = backend.in_progress(launch)
    if live:
        down = f"vicuna-sky down {live}" + (" --local" if backend.local else "")
        what = launch.name if live == launch.name else f"{live}, writing the same checkpoints,"
        raise VicunaSkyError(
            f"{what} is already running {where}: wait for it, stop it with `{down}`, or start "
            "a separate run from step 0 with --fresh"
        )


def launch_id() -> str:
    """A name for this launch, new each time: the UTC time and a random suffix."""
    import secrets
    import time

    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


def fresh_tag() -> str:
    """A RUN_TAG no earlier run has used: the UTC time to the second."""
    import time

    return "fresh-" + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def builtin_data(recipe: Recipe, task: object, workspace: Path, dryrun: bool = False) -> dict:
    """data.path `demo-sample` (the packaged sample, tiny.BUILTIN_DATA): made on this machine
    for the recipe's tokenizer, length, template and held-out share, once (WORKSPACE/data);
    returns the files for DATA_PATH and EVAL_PATH, which are then uploaded like a user's own."""
    from vicuna_sky.models import BUILTIN, resolve_model_path
    from vicuna_sky.tiny import BUILTIN_DATA
    from vicuna_sky.tiny import builtin_data as make

    if recipe.data.path != BUILTIN_DATA:
        return {}
    if dryrun:  # a dry run makes nothing: no model, no data
        console.print(
            f"data: {BUILTIN_DATA}, the packaged sample: cleaned and split for "
            f"{task.envs['MODEL_PATH']} here, then uploaded by content (at launch)"
        )
        return {}
    runs = Path(workspace)
    model = task.envs["MODEL_PATH"]
    if model in BUILTIN:  # the tokenizer to split with; the task keeps the name
        with console.status(f"making the built-in model {model}..."):
            model = resolve_model_path(model, (runs / "models").resolve())
    with console.status("preparing the packaged sample (demo-sample)..."):
        d = recipe.data
        train, held, _ = make(
            runs.resolve() / "data", d.max_length, recipe.model.template, model, d.eval_fraction
        )
    return {"DATA_PATH": str(train), **({"EVAL_PATH": str(held)} if held else {})}


def push_local_data(
    recipe: Recipe,
    task: object,
    bucket: str,
    workspace: Path,
    dryrun: bool,
    overrides: dict[str, str] | None = None,
) -> None:
    """A recipe whose `data.path` (or `data.eval_path`) is a file on this machine: checked,
    uploaded to `bucket` (the run's, or the folder standing in for it) under its content key
    (once), and the task pointed at that object. An `--env DATA_PATH`/`EVAL_PATH` names an
    object already there; the packaged sample is prepared in `workspace` first."""
    from vicuna_sky.launch import data_push

    paths = {"DATA_PATH": recipe.data.path, "EVAL_PATH": recipe.data.eval_path}
    if "DATA_PATH" not in (overrides or {}):
        paths.update(builtin_data(recipe, task, workspace, dryrun))
    for env, path in paths.items():
        source = data_push.local_data(path) if path and env not in (overrides or {}) else None
        if source is None:
            continue
        data_push.check_format(source)
        pushed = data_push.push(source, bucket, dry_run=dryrun)
        task.update_envs({env: pushed.key})
        console.print(data_push.describe(pushed, task.envs["BUCKET_URL"], dry_run=dryrun))


def train_plan(recipe: Recipe, task: object, overrides: dict[str, str]) -> tuple[object, str]:
    """The cost plan of a GPU training run (None and why, when there is none: offline, no
    catalog), and with `plan.use_planned_interval` its Young/Daly checkpoint interval applied
    to the task, unless `--env CHECKPOINT_EVERY_STEPS` chose one."""
    from vicuna_sky.plan import make_plan

    try:
        plan = make_plan(recipe)
    except Exception as e:  # the launch decides whether a missing plan matters
        if recipe.plan.use_planned_interval and "CHECKPOINT_EVERY_STEPS" not in overrides:
            console.print(
                f"checkpoint every {recipe.train.checkpoint_every_steps} steps (the recipe's: "
                "no plan to choose by)"
            )
        return None, one_line(e)
    if plan.launch_set:  # SkyPilot may move between them; on the bucket's cloud when planned so
        clouds = plan.clouds if plan.egress["mode"] == "restricted" else None
        set_accelerators(task, recipe, plan.launch_set, clouds)
        where = f" on {', '.join(clouds)} (the bucket's cloud)" if clouds else ""
        console.print(f"GPU types offered to SkyPilot: {', '.join(plan.launch_set)}{where}")
    if recipe.plan.use_planned_interval and plan.best and "CHECKPOINT_EVERY_STEPS" not in overrides:
        steps = plan.best.every_steps
        task.update_envs({"CHECKPOINT_EVERY_STEPS": str(steps)})
        console.print(
            f"checkpoint every {steps} steps: the plan's Young/Daly interval for "
            f"{plan.best.cloud} {plan.best.region} (recipe: {recipe.train.checkpoint_every_steps}; "
            "plan.use_planned_interval: false keeps the recipe's)"
        )
    return plan, ""


def check_budget(recipe: Recipe, over_budget: bool, plan: object = None) -> None:
    """Refuse a cloud training run whose best expected cost is over the recipe's budget."""
    if recipe.budget_usd is None or not recipe.resources.accelerator:
        return
    from vicuna_sky.plan import make_plan

    if plan is None:
        try:
            plan = make_plan(recipe, top=1)
        except ValueError as e:
            raise VicunaSkyError(str(e)) from None
    if plan.over_budget and plan.expected_usd is not None:
        message = (
            f"{recipe.source}: the best plan's expected cost is ${plan.expected_usd:,.0f}, over "
            f"the budget of ${recipe.budget_usd:,.0f} (see `vicuna-sky plan`)"
        )
        if not over_budget:
            raise VicunaSkyError(message + "; pass --over-budget to launch anyway")
        console.print(f"[yellow]warning:[/] {message}; launching (--over-budget)")


def check_recipe(recipe_arg: str) -> None:
    recipe = load_recipe(recipe_arg)
    table = Table(title=f"{recipe.source}: specs resolved and validated", title_justify="left")
    for col in ("spec", "resources", "nodes", "envs set"):
        table.add_column(col)
    for spec in Spec:
        extra = {"CONTROLLER_URL": "http://127.0.0.1:8000"} if spec is Spec.WORKER else {}
        task = load_task(spec, recipe, extra)
        resources = ", ".join(sorted({str(r) for r in task.resources}))
        table.add_row(spec.value, resources, str(task.num_nodes), str(len(task.envs)))
    console.print(table)
