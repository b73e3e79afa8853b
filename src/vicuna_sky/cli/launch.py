"""Commands that launch or inspect SkyPilot tasks (or their local runs)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import click

from vicuna_sky.cli.app import ENV_HELP, RUNS_HELP, Finite, app, console
from vicuna_sky.errors import VicunaSkyError
from vicuna_sky.output import OVERWRITE_HELP, check_output_file, write_text

if TYPE_CHECKING:
    from vicuna_sky.launch.backend import Backend

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
RUNS_DIR = click.option(
    "--runs-dir",
    type=click.Path(path_type=Path),
    default=Path("runs"),
    show_default=True,
    help=RUNS_HELP,
)


def _one_segment(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A name becomes a directory (runs/<name>-<time>) and a cloud resource name: letters,
    digits, '-', '_' and '.' only, so it can never climb out of the runs directory."""
    if value is not None and not NAME.fullmatch(value):
        raise click.BadParameter(
            f"{value!r} must be letters, digits, '-', '_' or '.', starting with a letter or digit"
        )
    return value


def launch_options(fn: click.decorators.FC) -> click.decorators.FC:
    for option in reversed(
        [
            click.argument("recipe"),
            click.option("--env", "envs", multiple=True, metavar="KEY=VALUE", help=ENV_HELP),
            click.option(
                "--dryrun",
                is_flag=True,
                help="Print the resolved task (and cost plan); launch nothing.",
            ),
            click.option(
                "--local", is_flag=True, help="Run the spec on this machine (the local backend)."
            ),
            click.option(
                "--hosts",
                is_flag=True,
                help="With --local: each node a host of its own, as on a cloud (its own "
                "address, only its spec's ports open to other clusters); needs root, iproute2 "
                "and nftables, else the run stays on loopback and says so.",
            ),
            click.option(
                "--name",
                default=None,
                callback=_one_segment,
                help="Job/cluster/service name (default: from the recipe).",
            ),
            RUNS_DIR,
            click.option(
                "--workdir",
                type=click.Path(path_type=Path),
                default=None,
                help="With --local: one directory for runs, buckets and the exported model "
                "(W/runs, W/buckets, W/export).",
            ),
        ]
    ):
        fn = option(fn)
    return fn


ANY_CLOUD = click.option(
    "--any-cloud",
    is_flag=True,
    help="Let the machines run on any cloud the recipe allows, not only the bucket's (they "
    "then read the model across clouds, paying egress at every launch).",
)


def launch(spec: str, recipe: str, envs: tuple[str, ...], **options: object) -> None:
    """Launch the spec `spec` (a `Spec` name) for a recipe, with the `launch_options`."""
    from vicuna_sky.launch import runner
    from vicuna_sky.launch.tasks import Spec

    runner.launch_recipe(Spec[spec], recipe, envs, backend=backend_of(options), **options)


def backend_of(options: dict) -> Backend:
    """The backend the launch options choose (taking --local, --hosts, --runs-dir and
    --workdir)."""
    from vicuna_sky.cli.backends import choose_backend

    local, hosts = options.pop("local"), options.pop("hosts")
    if hosts and not local:
        raise click.UsageError("--hosts is for the local backend: add --local")
    return choose_backend(local, options.pop("runs_dir"), options.pop("workdir"), hosts=hosts)


@app.command()
@launch_options
@click.option(
    "--over-budget",
    is_flag=True,
    help="Launch even when the cheapest plan costs more than the recipe's budget_usd.",
)
@click.option(
    "--skip-preflight",
    "skip_preflight",
    multiple=True,
    metavar="CHECK",
    help="Launch without one preflight check (repeatable): data, bucket, hf-token, memory.",
)
@click.option(
    "--fresh",
    is_flag=True,
    help="Start from step 0 under a new RUN_TAG instead of resuming from the newest committed "
    "checkpoint of the run name.",
)
def train(skip_preflight: tuple[str, ...], **options: object) -> None:
    """Fine-tune: sky/train.yaml as a managed spot job (torchrun + FSDP, auto-recovery).
    On a cloud, preflight checks run first (data, bucket, HF_TOKEN, GPU memory, budget) and
    nothing is provisioned unless they pass."""
    launch("TRAIN", skip_preflight=skip_preflight, **options)


@app.command()
@launch_options
@click.option(
    "--fleet",
    is_flag=True,
    help="An on-demand controller and managed spot worker jobs instead of a SkyServe service "
    "(with --local: the same specs on this machine, until Ctrl-C).",
)
@click.option(
    "--public",
    is_flag=True,
    help="On a cloud, serve without API keys: anyone who finds the address can use the GPUs.",
)
@ANY_CLOUD
def serve(fleet: bool, **options: object) -> None:
    """Serve: sky/service.yaml on SkyServe, or with --fleet a controller and spot workers.
    On a cloud the API needs keys (export VICUNA_SKY_API_KEYS=key1,key2) unless --public."""
    if fleet:
        from vicuna_sky.launch import serve_fleet

        recipe, envs = options.pop("recipe"), options.pop("envs")
        serve_fleet.launch_fleet(recipe, envs, backend=backend_of(options), **options)
    else:
        launch("SERVICE", **options)


@app.command()
@click.argument("recipe")
@click.option(
    "--top", type=click.IntRange(min=1), default=5, show_default=True, help="Candidates per table."
)
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON instead of tables.")
@click.option(
    "--catalog",
    "catalog_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Price from a saved copy of SkyPilot's catalogs (DIR/<cloud>/vms.csv), never fetched.",
)
@click.option(
    "--any-cloud",
    is_flag=True,
    help="Offers on every cloud, not only the bucket's; cross-cloud checkpoint traffic is priced.",
)
@click.option(
    "--local-zones",
    "special_zones",
    is_flag=True,
    help="Count AWS Local/Wavelength Zones and GCP's special zones in a region's price.",
)
@click.option("--verbose", is_flag=True, help="Show SkyPilot's own messages (catalog fetches).")
def plan(
    recipe: str,
    top: int,
    as_json: bool,
    catalog_dir: Path | None,
    any_cloud: bool,
    special_zones: bool,
    verbose: bool,
) -> None:
    """Cost plan: every GPU type that fits, region offers at typical zone prices, spot or
    on-demand per offer, ranked by expected $ (enabled clouds first)."""
    from vicuna_sky.launch import report, runner

    report.print_plan(
        runner.load_recipe(recipe),
        top=top,
        as_json=as_json,
        catalog_dir=catalog_dir,
        any_cloud=any_cloud,
        special_zones=special_zones,
        verbose=verbose,
    )


@app.command()
@click.argument("recipe")
def check(recipe: str) -> None:
    """Validate a recipe against every spec in sky/ (SkyPilot's own checks), offline."""
    from vicuna_sky.launch import runner

    runner.check_recipe(recipe)


RUN_RECIPE = click.option(
    "--recipe",
    default=None,
    help="With NAME, a training run on a cloud: the recipe it was launched from (its bucket "
    "holds the metrics).",
)
RUN_TAG = click.option(
    "--tag", default="main", show_default=True, help="With --recipe: the run's RUN_TAG."
)


@app.command()
@click.argument("name", required=False)
@click.option("--local", is_flag=True, help="Local runs only.")
@click.option(
    "--cloud",
    is_flag=True,
    help="Ask SkyPilot even when no API server is up (starting one takes about 30 s).",
)
@RUN_RECIPE
@RUN_TAG
@RUNS_DIR
def status(
    name: str | None, local: bool, cloud: bool, recipe: str | None, tag: str, runs_dir: Path
) -> None:
    """Local runs, then SkyPilot's jobs, clusters and services (SkyPilot's status vocabulary).
    SkyPilot is asked only when its API server is up or --cloud says so. With NAME, a training
    run's latest step, train and eval loss, tokens/s, MFU, ETA, preemptions and dollars so far,
    from the metrics in its bucket."""
    if name is not None:
        from vicuna_sky.launch import live

        live.show(name, runs_dir, recipe, tag)
        return
    from vicuna_sky.launch import report

    report.print_status(local=local, runs_dir=runs_dir, cloud=cloud)


@app.command()
@click.argument("name")
@click.option(
    "--kind", type=click.Choice(["job", "cluster", "service"]), default="job", show_default=True
)
@click.option("--local", is_flag=True, help="A local run (its latest attempt's logs).")
@click.option(
    "--run",
    "run_id",
    default=None,
    help="With --local: which run of the job (its directory name, as `status --local` lists "
    "it; default: the newest).",
)
@click.option(
    "--follow", "-f", is_flag=True, help="With --local: keep printing until the run ends."
)
@click.option(
    "--replica",
    type=click.IntRange(min=1),
    default=None,
    help="A service's replica id (default: the newest ready one).",
)
@click.option(
    "--metrics", is_flag=True, help="A training run's live numbers instead (as `status NAME`)."
)
@RUN_RECIPE
@RUN_TAG
@RUNS_DIR
def logs(
    name: str,
    kind: str,
    local: bool,
    run_id: str | None,
    follow: bool,
    replica: int | None,
    metrics: bool,
    recipe: str | None,
    tag: str,
    runs_dir: Path,
) -> None:
    """Show the logs of a job, cluster or service."""
    if metrics:
        from vicuna_sky.launch import live

        live.show(name, runs_dir, recipe, tag)
        return

    if (run_id or follow) and not local:
        raise click.UsageError("--run and --follow are for local runs (--local)")
    from vicuna_sky.cli.backends import choose_backend

    backend = choose_backend(local, runs_dir)
    backend.logs(name, kind, replica=replica, run_id=run_id, follow=follow)


@app.command()
@click.argument("name")
@click.option(
    "--kind",
    type=click.Choice(["job", "cluster", "service", "fleet"]),
    default="job",
    show_default=True,
    help="fleet: a `serve --fleet` fleet by its name (worker jobs, then the controller).",
)
@click.option(
    "--local",
    is_flag=True,
    help="Stop a local run (or a local fleet) in progress, as Ctrl-C in its terminal would.",
)
@RUNS_DIR
def down(name: str, kind: str, local: bool, runs_dir: Path) -> None:
    """Cancel a managed job, tear down a cluster, take a service or a fleet down."""
    from vicuna_sky.cli.backends import choose_backend

    gone = choose_backend(local, runs_dir).down(name, kind)
    if local:
        console.print(
            f"stopped: {', '.join(gone)}" if gone else f"no local run named {name} is in progress"
        )
    else:
        console.print(f"taken down: {', '.join(gone)}" if gone else f"nothing named {name} is up")


@app.group()
def chaos() -> None:
    """Prove recovery: run a spec locally through repeated spot preemptions."""


@chaos.command(name="train")
@click.argument("recipe")
@click.option(
    "--preemptions",
    type=click.IntRange(min=0),
    default=3,
    show_default=True,
    help="How many times to preempt.",
)
@click.option("--seed", default=0, show_default=True, help="Seeds when and how preemptions hit.")
@click.option(
    "--notice-seconds",
    type=Finite(0),
    default=5.0,
    show_default=True,
    help="Notice window before the machine is killed (clouds: AWS 120 s, GCP 30 s).",
)
@click.option("--env", "envs", multiple=True, metavar="KEY=VALUE", help=ENV_HELP)
@click.option(
    "--workdir", type=click.Path(path_type=Path), default=Path("runs/chaos"), show_default=True
)
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None)
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
def chaos_train(
    recipe: str,
    preemptions: int,
    seed: int,
    notice_seconds: float,
    envs: tuple[str, ...],
    workdir: Path,
    json_path: Path | None,
    overwrite: bool,
) -> None:
    """sky/train.yaml on the local backend (bucket on a local S3), preempted K times, compared
    with an uninterrupted run of the same recipe."""
    from vicuna_sky.localcloud.chaos import Chaos, ChaosConfig, render

    if json_path:  # checked before the long run, not after
        check_output_file(json_path, [recipe], overwrite=overwrite)
    config = ChaosConfig(recipe, preemptions, seed, notice_seconds, workdir, envs)
    report = Chaos(config).run()
    for item in render(report):
        console.print(item)
    if json_path:
        write_text(json_path, report.to_json())
    if not (report.identical_to_uninterrupted and report.only_committed_checkpoints_loaded):
        raise VicunaSkyError("recovery was not exact: see the report above")
