"""`vicuna-sky`: one thin command-line app. Parse, call one function, print.

Every user-facing failure is a `VicunaSkyError`, printed as one line with exit status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.console import Console

from vicuna_sky.errors import VicunaSkyError

console = Console()
err_console = Console(stderr=True)

ENV_HELP = "Override an env var of the spec, as `sky launch --env KEY=VALUE` does (repeatable)."
RUNS_HELP = "Where local runs keep their status, attempts and logs."


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="vicuna-sky")
def app() -> None:
    """The Vicuna system on SkyPilot: clean ShareGPT data, fine-tune on spot, serve, judge.

    A RECIPE (a YAML path, or a bundled name such as vicuna-7b) holds what you choose:
    model, data, hyper-parameters, GPUs, clouds, bucket, budget. The task specs in sky/
    say how each part runs; `--local` runs them on this machine instead of a cloud.
    """


def _launch_options(fn: click.decorators.FC) -> click.decorators.FC:
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
                "--name", default=None, help="Job/cluster/service name (default: from the recipe)."
            ),
            click.option(
                "--runs-dir",
                type=click.Path(path_type=Path),
                default=Path("runs"),
                show_default=True,
                help=RUNS_HELP,
            ),
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


@app.command()
@_launch_options
def train(
    recipe: str,
    envs: tuple[str, ...],
    dryrun: bool,
    local: bool,
    name: str | None,
    runs_dir: Path,
    workdir: Path | None,
) -> None:
    """Fine-tune: sky/train.yaml as a managed spot job (torchrun + FSDP, auto-recovery)."""
    from vicuna_sky.launch import runner
    from vicuna_sky.launch.tasks import Spec

    runner.launch_recipe(
        Spec.TRAIN,
        recipe,
        envs,
        dryrun=dryrun,
        local=local,
        name=name,
        runs_dir=runs_dir,
        workdir=workdir,
    )


@app.command()
@_launch_options
@click.option(
    "--fleet", is_flag=True, help="Controller + worker clusters instead of a SkyServe service."
)
def serve(
    recipe: str,
    envs: tuple[str, ...],
    dryrun: bool,
    local: bool,
    name: str | None,
    runs_dir: Path,
    workdir: Path | None,
    fleet: bool,
) -> None:
    """Serve: sky/service.yaml on SkyServe, or with --fleet a controller and spot workers."""
    from vicuna_sky.launch import runner
    from vicuna_sky.launch.tasks import Spec

    if fleet:
        runner.launch_fleet(recipe, envs, dryrun=dryrun, local=local, name=name, runs_dir=runs_dir)
    else:
        runner.launch_recipe(
            Spec.SERVICE,
            recipe,
            envs,
            dryrun=dryrun,
            local=local,
            name=name,
            runs_dir=runs_dir,
            workdir=workdir,
        )


@app.command(name="eval")
@_launch_options
def eval_(
    recipe: str,
    envs: tuple[str, ...],
    dryrun: bool,
    local: bool,
    name: str | None,
    runs_dir: Path,
    workdir: Path | None,
) -> None:
    """Evaluate: sky/eval.yaml answers the benchmark and has an LLM judge the answers."""
    from vicuna_sky.launch import runner
    from vicuna_sky.launch.tasks import Spec

    runner.launch_recipe(
        Spec.EVAL,
        recipe,
        envs,
        dryrun=dryrun,
        local=local,
        name=name,
        runs_dir=runs_dir,
        workdir=workdir,
    )


@app.command()
@click.argument("recipe")
@click.option("--top", default=5, show_default=True, help="Candidates listed per table.")
def plan(recipe: str, top: int) -> None:
    """Cost plan: cheapest spot and on-demand offers and the estimated $ for the run."""
    from vicuna_sky.launch import runner

    runner.print_plan(runner.load_recipe(recipe), top=top)


@app.command()
@click.argument("recipe")
def check(recipe: str) -> None:
    """Validate a recipe against every spec in sky/ (SkyPilot's own checks), offline."""
    from vicuna_sky.launch import runner

    runner.check_recipe(recipe)


@app.command()
@click.option(
    "--local", is_flag=True, help="Local runs instead of SkyPilot's jobs, clusters and services."
)
@click.option(
    "--runs-dir",
    type=click.Path(path_type=Path),
    default=Path("runs"),
    show_default=True,
    help=RUNS_HELP,
)
def status(local: bool, runs_dir: Path) -> None:
    """Status of jobs, clusters and services (SkyPilot's status vocabulary)."""
    from vicuna_sky.launch import runner

    runner.print_status(local=local, runs_dir=runs_dir)


@app.command()
@click.argument("name")
@click.option(
    "--kind", type=click.Choice(["job", "cluster", "service"]), default="job", show_default=True
)
@click.option("--local", is_flag=True, help="A local run (its latest attempt's logs).")
@click.option(
    "--runs-dir",
    type=click.Path(path_type=Path),
    default=Path("runs"),
    show_default=True,
    help=RUNS_HELP,
)
def logs(name: str, kind: str, local: bool, runs_dir: Path) -> None:
    """Show the logs of a job, cluster or service."""
    from vicuna_sky.launch import runner

    runner.show_logs(name, kind=kind, local=local, runs_dir=runs_dir)


@app.command()
@click.argument("name")
@click.option(
    "--kind", type=click.Choice(["job", "cluster", "service"]), default="job", show_default=True
)
def down(name: str, kind: str) -> None:
    """Cancel a managed job, tear down a cluster, or take a service down."""
    from vicuna_sky.launch import cloud

    cloud.down(name, kind)


@app.group()
def chaos() -> None:
    """Prove recovery: run a spec locally through repeated spot preemptions."""


@chaos.command(name="train")
@click.argument("recipe")
@click.option("--preemptions", default=3, show_default=True, help="How many times to preempt.")
@click.option("--seed", default=0, show_default=True, help="Seeds when and how preemptions hit.")
@click.option(
    "--notice-seconds",
    default=5.0,
    show_default=True,
    help="Notice window before the machine is killed (clouds: AWS 120 s, GCP 30 s).",
)
@click.option("--env", "envs", multiple=True, metavar="KEY=VALUE", help=ENV_HELP)
@click.option(
    "--workdir", type=click.Path(path_type=Path), default=Path("runs/chaos"), show_default=True
)
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None)
def chaos_train(
    recipe: str,
    preemptions: int,
    seed: int,
    notice_seconds: float,
    envs: tuple[str, ...],
    workdir: Path,
    json_path: Path | None,
) -> None:
    """sky/train.yaml on the local backend (bucket on a local S3), preempted K times, compared
    with an uninterrupted run of the same recipe."""
    from vicuna_sky.launch.chaos import Chaos, ChaosConfig, render

    config = ChaosConfig(recipe, preemptions, seed, notice_seconds, workdir, envs)
    report = Chaos(config).run()
    for item in render(report):
        console.print(item)
    if json_path:
        json_path.write_text(report.to_json())
    if not (report.identical_to_uninterrupted and report.only_committed_checkpoints_loaded):
        raise VicunaSkyError("recovery was not exact: see the report above")


@app.group()
def data() -> None:
    """Prepare ShareGPT data: clean HTML exports, split to the context, count tokens."""


def _data_io(fn: click.decorators.FC) -> click.decorators.FC:
    fn = click.option(
        "--workers", default=0, show_default=True, help="Worker processes (0 = all cores)."
    )(fn)
    fn = click.option("-o", "--output", type=click.Path(path_type=Path), required=True)(fn)
    return click.argument("input_path", metavar="IN.json", type=click.Path(path_type=Path))(fn)


@data.command(name="clean")
@_data_io
@click.option(
    "--blocked-words",
    default="openai,chatgpt",
    show_default=True,
    help="Comma-separated words; a conversation containing one is dropped ('' = none).",
)
@click.option("--min-chars", default=16, show_default=True, help="Drop shorter conversations.")
@click.option("--lang", default=None, help="Keep one language only (ISO 639-1, e.g. en).")
def data_clean(
    input_path: Path,
    output: Path,
    workers: int,
    blocked_words: str,
    min_chars: int,
    lang: str | None,
) -> None:
    """HTML to markdown, UI residue removed, filters and de-duplication."""
    from vicuna_sky.data.clean import CleanConfig
    from vicuna_sky.data.pipeline import clean_file

    words = tuple(w.strip().lower() for w in blocked_words.split(",") if w.strip())
    config = CleanConfig(blocked_words=words, min_chars=min_chars, lang=lang, workers=workers)
    clean_file(input_path, output, config)


@data.command(name="split")
@_data_io
@click.option("--tokenizer", required=True, help="Tokenizer path or hub id of the model.")
@click.option("--max-length", type=int, required=True, help="Context length in tokens.")
@click.option("--template", default="vicuna_v1.1", show_default=True)
@click.option(
    "--overlong",
    type=click.Choice(["truncate", "drop"]),
    default="truncate",
    show_default=True,
    help="What to do with one round longer than --max-length.",
)
def data_split(
    input_path: Path,
    output: Path,
    workers: int,
    tokenizer: str,
    max_length: int,
    template: str,
    overlong: str,
) -> None:
    """Split conversations on round boundaries to fit the context, as the template renders."""
    from vicuna_sky.data.pipeline import split_file
    from vicuna_sky.data.split import SplitConfig

    config = SplitConfig(tokenizer, max_length, template, overlong, workers)
    split_file(input_path, output, config)


@data.command(name="stats")
@click.argument("input_path", metavar="IN.json", type=click.Path(path_type=Path))
@click.option("--tokenizer", required=True, help="Tokenizer path or hub id of the model.")
@click.option("--max-length", type=int, default=2048, show_default=True)
@click.option("--template", default="vicuna_v1.1", show_default=True)
def data_stats(input_path: Path, tokenizer: str, max_length: int, template: str) -> None:
    """Tokens per epoch as the trainer sees them (the recipe's data.tokens)."""
    from vicuna_sky.data.pipeline import stats_file

    s = stats_file(input_path, tokenizer, template, max_length)
    console.print(
        f"samples {s.samples}  tokens {s.tokens}  trainable tokens {s.trainable_tokens}  "
        f"longest {s.longest}  over max length {s.over_max_length}"
    )


@app.command()
@click.option(
    "--workdir",
    type=click.Path(path_type=Path),
    default=Path("runs/demo"),
    show_default=True,
    help="Where the demo writes its model, data, bucket and logs.",
)
def demo(workdir: Path) -> None:
    """Run the pipeline on the tiny CPU recipe, locally, and summarise what ran."""
    from vicuna_sky import demo as demo_lib

    demo_lib.run(workdir)


def main() -> None:
    try:
        app.main(standalone_mode=False)
    except click.exceptions.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except VicunaSkyError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
