"""The local cloud as a `Backend`: each task runs on this machine the way SkyPilot runs it on a
cluster (localcloud/cluster.py), its buckets are folders, and a fleet runs until Ctrl-C
(localcloud/fleet.py)."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from vicuna_sky.errors import VicunaSkyError
from vicuna_sky.launch import cost, jobs
from vicuna_sky.launch.backend import Launch
from vicuna_sky.launch.preflight import UPLOADED, Finding
from vicuna_sky.launch.report import summarize
from vicuna_sky.launch.tasks import Spec, checkpoint_url, one_line
from vicuna_sky.localcloud import cluster
from vicuna_sky.localcloud.report import print_local_places, show_local_logs
from vicuna_sky.output import check_output_dir, writing_dir
from vicuna_sky.recipe import Recipe
from vicuna_sky.terminal import make_console

console = make_console()

MODEL_ENVS = ("MODEL_PATH", "SERVE_MODEL_PATH", "BASELINE_PATH")
"""The task envs that name a model: the trained base, the served model, the eval's baseline."""


class LocalBackend:
    """Runs on this machine: `workdir` (when given) holds the runs, the buckets and, after
    training, the exported model in `export/`; else `runs_dir` holds the runs."""

    local = True
    bills = False

    def __init__(
        self,
        runs_dir: Path,
        workdir: Path | None = None,
        config: cluster.LocalConfig | None = None,
        hosts: bool = False,
    ) -> None:
        """`hosts`: each node a host of its own for the launch's length (a network made for
        it, removed after); where hosts cannot be made, loopback, said in one line."""
        self.hosts = hosts
        self.workdir = workdir
        self.runs_dir = workdir / "runs" if workdir is not None else runs_dir
        self.config = config or cluster.LocalConfig(
            runs_dir=self.runs_dir, bucket_root=workdir / "buckets" if workdir else None
        )

    def data_bucket(self, launch: Launch) -> str:
        return str(self.config.bucket_dir(launch.recipe.bucket))

    def workspace(self) -> Path:
        return Path(self.config.runs_dir)

    def preflight(self, launch: Launch, needs: str) -> list[Finding]:
        if needs == UPLOADED and launch.spec is Spec.TRAIN:
            check_local_data(launch.recipe, launch.task, self.config)
        return []

    def describe(self, launch: Launch) -> None:
        print_local_places(launch.spec, launch.recipe, launch.task, self.config)

    def admit(self, launch: Launch) -> None:
        """Nothing here faces the internet: every port is on loopback."""

    def in_progress(self, launch: Launch) -> str:
        live = jobs.running(self.runs_dir, launch.name)
        if not live and launch.spec is Spec.TRAIN:
            # Another name, the same checkpoints: the run's metrics live beside them.
            ours = _checkpoints_here(launch.task, self.config)
            live = [
                j
                for j in jobs.list_jobs(self.runs_dir)
                if j.metrics_url and j.metrics_url in ours and jobs.in_progress(j)
            ]
        if not live:
            return "", ""
        return live[-1].name, f"locally ({live[-1].run_dir}, pid {live[-1].pid})"

    def launch(self, launch: Launch) -> jobs.LocalJob:
        task, recipe = launch.task, launch.recipe
        builtin_models(task, self.config)
        training = launch.spec is Spec.TRAIN
        with self._network():
            job = run_locally(task, self.config, _prices(recipe) if training else None)
        export = None
        if training and self.workdir is not None:
            run_name = task.envs.get("RUN_NAME", recipe.name)
            bucket = self.config.bucket_dir(recipe.bucket)
            export = fetch_export(bucket, run_name, self.workdir / "export")
        summarize(launch.spec, task, job, self.config.bucket_dir(recipe.bucket), export)
        return job

    def launch_fleet(self, recipe: Recipe, controller: object, worker: object, name: str) -> None:
        with self._network():
            run_fleet_locally(controller, worker, name, recipe.serve.workers, self.config)

    @contextlib.contextmanager
    def _network(self) -> Iterator[None]:
        if not self.hosts:
            yield
            return
        from vicuna_sky.localcloud.network import HostsUnavailable, Network

        try:
            network = Network.make()
        except HostsUnavailable as e:
            console.print(f"[yellow]{e}[/]")
            yield
            return
        console.print(
            f"hosts: each node its own address on {network.bridge} ({network.gateway}/24)"
        )
        self.config.network = network
        try:
            yield
        finally:
            self.config.network = None
            network.close()

    def down(self, name: str, kind: str) -> list[str]:
        return stop_local(name, self.runs_dir)

    def logs(self, name: str, kind: str, **options: object) -> None:
        job = jobs.find_job(self.runs_dir, name, options.get("run_id"))
        show_local_logs(job, follow=bool(options.get("follow")))


def _checkpoints_here(task: object, config: cluster.LocalConfig) -> set[str]:
    """The spellings a local run of `task` records for its checkpoint URL (LocalJob.metrics_url):
    the bucket URL itself (a local S3 or GCS server), or the folder standing in for it."""
    url = checkpoint_url(task)
    bucket = task.envs["BUCKET_URL"].rstrip("/")
    return {url, f"file://{config.bucket_dir(bucket)}{url[len(bucket) :]}"}


def builtin_models(task: object, config: cluster.LocalConfig) -> None:
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


def check_local_data(recipe: Recipe, task: object, config: cluster.LocalConfig) -> None:
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


def run_locally(
    task: object, config: cluster.LocalConfig, prices: cost.Prices | None = None
) -> jobs.LocalJob:
    runner = cluster.LocalRunner(task, config, on_event=lambda m: console.print(f"  {m}"))
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


def run_fleet_locally(
    controller: object, worker: object, name: str, workers: int, config: cluster.LocalConfig
) -> None:
    """sky/serve-controller.yaml and sky/serve-worker.yaml on this machine until Ctrl-C: a
    worker that dies is relaunched like a preempted managed job. A re-run while the fleet's
    workers run (another terminal) repairs it: a controller that answers is left alone; a
    dead one is started again here, on its port with its secret and certificate, and the
    running workers register with it."""
    import time

    from vicuna_sky.launch.fleet_state import FleetState
    from vicuna_sky.localcloud.fleet import LocalSkyFleet

    builtin_models(worker, config)
    runs = Path(config.runs_dir)
    live = [j for j in jobs.list_jobs(runs) if j.name.startswith(f"{name}-worker-")]
    live = [j for j in live if jobs.in_progress(j)]
    if config.network is not None:
        keys = controller.secrets.get("VICUNA_SKY_API_KEYS")
        if not (keys and keys.get_secret_value()):
            raise VicunaSkyError(
                "on hosts the controller faces other machines and needs an API key: export "
                "VICUNA_SKY_API_KEYS=<key>[,<key>...]"
            )
        if live:
            # Its workers are on another run's network, which this run cannot reach.
            raise VicunaSkyError(
                f"fleet {name} runs on hosts of another run (launcher pid {live[0].pid}): stop "
                f"it (vicuna-sky down {name} --local), then launch again"
            )
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
                    f"{fleet.url.rsplit(':', 1)[0]}:{fleet.webui_port}"
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


def _prices(recipe: Recipe) -> cost.Prices | None:
    """Catalog prices to cost a run at; None (and the run goes uncosted) when the catalog
    cannot say."""
    try:
        return cost.prices_for(recipe)
    except Exception as e:
        console.print(f"  [dim]run not costed: {one_line(e)}[/]")
        return None
