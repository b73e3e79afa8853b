"""The `vicuna-sky` click group and what its command modules share."""

from __future__ import annotations

import click
from rich.console import Console

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
