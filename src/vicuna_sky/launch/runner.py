"""What each `vicuna-sky` command does: recipe -> task -> dry run, local run or cloud launch."""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import asdict
from pathlib import Path

from rich.table import Table

from vicuna_sky.errors import VicunaSkyError
from vicuna_sky.launch import cost, jobs, preflight
from vicuna_sky.launch import local as local_lib
from vicuna_sky.launch.report import print_local_places, print_plan, print_yaml, summarize
from vicuna_sky.launch.tasks import (
    Spec,
    checkpoint_url,
    load_task,
    missing_secrets,
    one_line,
    parse_env_overrides,
    resolve_recipe,
    resolved_yaml,
    set_accelerators,
)
from vicuna_sky.output import check_output_dir, writing_dir
from vicuna_sky.recipe import Recipe
from vicuna_sky.terminal import make_console

console = make_console()


def load_recipe(arg: str) -> Recipe:
    return Recipe.from_yaml(resolve_recipe(arg))


def launch_recipe(
    spec: Spec,
    recipe_arg: str,
    envs: tuple[str, ...],
    *,
    dryrun: bool,
    local: bool,
    name: str | None,
    runs_dir: Path,
    local_config: local_lib.LocalConfig | None = None,
    workdir: Path | None = None,
    over_budget: bool = False,
    fresh: bool = False,
    public: bool = False,
    skip_preflight: tuple[str, ...] = (),
) -> jobs.LocalJob | None:
    """Launch a spec for a recipe: on the cloud, or with `local` on this machine (`workdir`
    then holds the runs, the buckets and, after training, the exported model in `export/`).
    `fresh` gives a training run a new RUN_TAG, so it starts from step 0 instead of resuming
    from the checkpoints of the run name."""
    recipe = load_recipe(recipe_arg)
    overrides = parse_env_overrides(envs)
    if fresh:
        overrides.setdefault("RUN_TAG", fresh_tag())
    task = load_task(spec, recipe, overrides)
    name = name or f"{recipe.name}-{spec.name.lower()}"
    task.name = name
    plan, no_plan = None, ""
    if spec is Spec.TRAIN and recipe.resources.accelerator:
        plan, no_plan = train_plan(recipe, task, overrides)
    if local and workdir is not None:
        runs_dir = workdir / "runs"
    config = None
    if local:
        config = local_config or local_lib.LocalConfig(
            runs_dir=runs_dir, bucket_root=workdir / "buckets" if workdir else None
        )
    cloud_train = spec is Spec.TRAIN and not local
    if cloud_train:  # before anything is uploaded (a dry run writes nothing, not even a probe)
        bucket = task.envs["BUCKET_URL"]
        early = preflight.run(
            recipe, task, bucket, skip_preflight, ("clouds", "memory", "hf-token")
        )
        if dryrun:
            for finding in early:
                mark = "" if finding.ok else "[yellow]would be refused:[/] "
                console.print(mark + finding.line)
        else:
            preflight.refuse(early)
            check_budget(recipe, over_budget, plan)
            preflight.refuse(preflight.run(recipe, task, bucket, skip_preflight, ("bucket",)))
    if spec is Spec.TRAIN:
        push_local_data(recipe, task, config, dryrun, overrides)
    if dryrun:
        console.rule(f"[bold]{spec.value}[/] with {recipe.source}")
        print_yaml(resolved_yaml(task))
        for key in missing_secrets(spec, task):
            console.print(f"[yellow]warning:[/] {key} is not set in your environment")
        if config is not None:
            print_local_places(spec, recipe, task, config)
        if spec is Spec.SERVICE and not local:
            console.print(endpoint_access(task, public)[1])
        if plan is not None:
            print_plan(recipe, plan=plan)
        elif no_plan:  # offline, no catalog: the task above still stands
            console.print(f"cost plan: unavailable ({no_plan})")
        return None
    if spec is Spec.SERVICE and not local:
        refuse_an_open_endpoint(task, public)
    missing = missing_secrets(spec, task)
    if missing:
        raise VicunaSkyError(
            f"{spec.value} needs {', '.join(missing)}: export it in your environment "
            "(it travels as a SkyPilot secret)"
        )
    if spec is Spec.TRAIN and "RUN_TAG" in task.envs:
        console.print(f"checkpoints: {checkpoint_url(task)} (resumes from the newest there)")
    if cloud_train:  # the data is in the bucket now, uploaded above or there before
        preflight.refuse(preflight.run(recipe, task, bucket, skip_preflight, ("data",)))
    if spec is Spec.TRAIN and not fresh:
        refuse_a_second_run(name, local, runs_dir)
    if config is not None:
        if spec is Spec.TRAIN:
            check_local_data(recipe, task, config)  # before a model is made: not a minute after
            builtin_models(task, config)
        else:
            builtin_models(task, config)
        job = run_locally(task, config, _prices(recipe) if spec is Spec.TRAIN else None)
        run_name = task.envs.get("RUN_NAME", recipe.name)
        export = None
        if spec is Spec.TRAIN and workdir is not None:
            export = fetch_export(config.bucket_dir(recipe.bucket), run_name, workdir / "export")
        summarize(spec, task, job, config.bucket_dir(recipe.bucket), export)
        return job
    from vicuna_sky.launch import cloud

    if spec is Spec.SERVICE:
        sha, crt = cloud.service_tls(task, name)
        console.print(
            f"endpoint TLS: certificate SHA-256 {sha}, in {crt} (clients trust that certificate "
            "alone: README, 'Calling the fleet over TLS')"
        )
    cloud.launch(spec, task, name)
    return None


API_KEYS = "VICUNA_SKY_API_KEYS"


def endpoint_access(task: object, public: bool) -> tuple[bool, str]:
    """Whether a cloud endpoint of `task` (its OpenAI API) may open, and the line that says
    how it will be reached."""
    key = task.secrets.get(API_KEYS)
    if key is not None and key.get_secret_value():
        return True, f"endpoint: clients need one of the keys in {API_KEYS}"
    if public:
        return True, "endpoint: [bold]public[/] (--public): no API key, anyone can use it"
    return False, (
        f"endpoint: would be refused: {API_KEYS} is not set (clients present one as their API "
        "key); export it, or pass --public to serve without keys"
    )


def refuse_an_open_endpoint(task: object, public: bool) -> None:
    ok, line = endpoint_access(task, public)
    if not ok:
        raise VicunaSkyError(
            f"serving on a cloud opens the API to the internet, and {API_KEYS} is not set: "
            "export it (comma-separated keys), or pass --public to serve without keys"
        )
    console.print(line)


def refuse_a_second_run(name: str, local: bool, runs_dir: Path) -> None:
    """Two runs of one training job would write checkpoints under the same bucket prefix, each
    resuming from the other's: a second one is refused while the first is in progress."""
    if local:
        live = jobs.running(runs_dir, name)
        where = f"locally ({live[-1].run_dir}, pid {live[-1].pid})" if live else ""
    else:
        from vicuna_sky.launch import cloud

        where = "as a managed job" if cloud.job_in_progress(name) else ""
    if where:
        down = f"vicuna-sky down {name}" + (" --local" if local else "")
        raise VicunaSkyError(
            f"{name} is already running {where}: wait for it, stop it with `{down}`, or start "
            "a separate run from step 0 with --fresh"
        )


def stop_local(name: str, runs_dir: Path, timeout: float = 60.0) -> list[str]:
    """Stop the local runs named `name` (a fleet: its controller and workers too) as Ctrl-C
    would: their launcher gets SIGTERM and takes each run's processes down (CANCELLED). Returns
    the runs stopped."""
    import os
    import signal
    import time

    live = [
        j
        for j in jobs.list_jobs(runs_dir)
        if (j.name == name or j.name.startswith(f"{name}-")) and jobs.in_progress(j)
    ]
    for pid in {j.pid for j in live}:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for job in live:
        while jobs.in_progress(jobs.LocalJob.load(Path(job.run_dir))):
            if time.monotonic() > deadline:
                raise VicunaSkyError(f"{job.name} (pid {job.pid}) did not stop in {timeout:.0f} s")
            time.sleep(0.2)
    return [Path(j.run_dir).name for j in live]


def fresh_tag() -> str:
    """A RUN_TAG no earlier run has used: the UTC time to the second."""
    import time

    return "fresh-" + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


MODEL_ENVS = ("MODEL_PATH", "SERVE_MODEL_PATH", "BASELINE_PATH")
"""The task envs that name a model: the trained base, the served model, the eval's baseline."""


def builtin_models(task: object, config: local_lib.LocalConfig) -> None:
    """A built-in model (tiny-llama, smollm2-135m) named by any of MODEL_ENVS is made once per
    runs directory and the task points at it, instead of every attempt's fresh directory making
    its own (or a served model's path being read as one in the bucket)."""
    from vicuna_sky.models import BUILTIN, resolve_model_path

    for key in MODEL_ENVS:
        name = task.envs.get(key)
        if name in BUILTIN:
            with console.status(f"making the built-in model {name}..."):
                # Absolute: each attempt runs in its own working directory.
                path = resolve_model_path(name, Path(config.runs_dir).resolve() / "models")
            task.update_envs({key: path})


def builtin_data(
    recipe: Recipe, task: object, config: local_lib.LocalConfig | None, dryrun: bool = False
) -> dict:
    """data.path `demo-sample` (the packaged sample, tiny.BUILTIN_DATA): made on this machine
    for the recipe's tokenizer, length, template and held-out share, once (RUNS/data); returns
    the files for DATA_PATH and EVAL_PATH, which are then uploaded like a user's own."""
    from vicuna_sky.models import BUILTIN, default_cache, resolve_model_path
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
    runs = Path(config.runs_dir) if config else default_cache().parent
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
    config: local_lib.LocalConfig | None,
    dryrun: bool,
    overrides: dict[str, str] | None = None,
) -> None:
    """A recipe whose `data.path` (or `data.eval_path`) is a file on this machine: checked,
    uploaded to the run's bucket under its content key (once), and the task pointed at that
    object. An `--env DATA_PATH`/`EVAL_PATH` names an object already there."""
    from vicuna_sky.launch import data_push

    paths = {"DATA_PATH": recipe.data.path, "EVAL_PATH": recipe.data.eval_path}
    if "DATA_PATH" not in (overrides or {}):
        paths.update(builtin_data(recipe, task, config, dryrun))
    for env, path in paths.items():
        source = data_push.local_data(path) if path and env not in (overrides or {}) else None
        if source is None:
            continue
        data_push.check_format(source)
        bucket = str(config.bucket_dir(recipe.bucket)) if config else task.envs["BUCKET_URL"]
        pushed = data_push.push(source, bucket, dry_run=dryrun)
        task.update_envs({env: pushed.key})
        console.print(data_push.describe(pushed, task.envs["BUCKET_URL"], dry_run=dryrun))


def check_local_data(recipe: Recipe, task: object, config: local_lib.LocalConfig) -> None:
    """The training (and held-out) data must be in the (local) bucket: a file here or
    demo-sample was uploaded by then, so a mistyped path fails here, before a model is made."""
    data_path = task.envs.get("DATA_PATH", recipe.data.path)
    target = config.bucket_dir(recipe.bucket) / data_path
    if not target.exists():
        raise VicunaSkyError(
            f"{recipe.source}: data.path {data_path!r} is neither a file here nor in the "
            f"bucket ({target}): fix the path, or upload it with `vicuna-sky data push`"
        )
    eval_path = task.envs.get("EVAL_PATH", recipe.data.eval_path)
    held_out = config.bucket_dir(recipe.bucket) / eval_path
    if eval_path and not held_out.exists():
        raise VicunaSkyError(
            f"{recipe.source}: data.eval_path {eval_path!r} is neither a file here nor in the "
            "bucket: fix the path, or upload it with `vicuna-sky data push`"
        )


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


def fetch_export(bucket_dir: Path, run_name: str, destination: Path) -> Path:
    """The trained model, from where sky/train.yaml exports it ($BUCKET_URL/models/$RUN_NAME)."""
    source = bucket_dir / "models" / run_name
    if not (source / "config.json").exists():
        raise VicunaSkyError(f"the run succeeded but left no exported model in {source}")
    # Replaced only when it is an earlier export (a model directory): never a user's files.
    earlier = (destination / "config.json").is_file()
    check_output_dir(destination, [source], overwrite=earlier)
    with writing_dir(destination, overwrite=earlier) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
    return destination


def _prices(recipe: Recipe) -> cost.Prices | None:
    """Catalog prices to cost a run at; None (and the run goes uncosted) when the catalog
    cannot say."""
    try:
        return cost.prices_for(recipe)
    except Exception as e:
        console.print(f"  [dim]run not costed: {one_line(e)}[/]")
        return None


def run_locally(
    task: object, config: local_lib.LocalConfig, prices: cost.Prices | None = None
) -> jobs.LocalJob:
    runner = local_lib.LocalRunner(task, config, on_event=lambda m: console.print(f"  {m}"))
    if prices:
        runner.job.prices = asdict(prices)
        runner.job.save()
    console.print(f"[bold]{runner.job.name}[/] running locally in {runner.run_dir}")
    job = runner.run()
    logs = ", ".join(p.name for p in jobs.latest_logs(job))
    console.print(f"[bold]{job.status}[/] after {len(job.attempts)} attempt(s); logs: {logs}")
    if job.status != jobs.JobStatus.SUCCEEDED.value:
        raise VicunaSkyError(
            f"local job {job.name} ended {job.status}: see {job.run_dir} "
            f"({job.attempts[-1].reason if job.attempts else 'no attempt'})"
        )
    return job


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
