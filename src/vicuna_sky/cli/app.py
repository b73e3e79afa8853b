"""The `vicuna-sky` click group and what its command modules share."""

from __future__ import annotations

import math

import click

from vicuna_sky.terminal import make_console

console = make_console()
err_console = make_console(stderr=True)

ENV_HELP = "Override an env var of the spec, as `sky launch --env KEY=VALUE` does (repeatable)."
RUNS_HELP = "Where local runs keep their status, attempts and logs."


class Finite(click.ParamType):
    """A finite number in [low, high]: click's FloatRange lets nan and inf through."""

    name = "number"

    def __init__(self, low: float | None = None, high: float | None = None) -> None:
        self.low, self.high = low, high

    def convert(self, value: object, param: click.Parameter | None, ctx: object) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        low = -math.inf if self.low is None else self.low
        high = math.inf if self.high is None else self.high
        if not (math.isfinite(number) and low <= number <= high):
            bounds = f" in [{self.low}, {self.high}]" if self.high is not None else ""
            bounds = bounds or (f" >= {self.low}" if self.low is not None else "")
            self.fail(f"{value} is not a finite number{bounds}", param, ctx)
        return number


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="vicuna-sky")
def app() -> None:
    """The Vicuna system on SkyPilot: clean ShareGPT data, fine-tune on spot, serve, judge.

    A RECIPE (a YAML path, or a bundled name such as vicuna-7b) holds what you choose:
    model, data, hyper-parameters, GPUs, clouds, bucket, budget. The task specs in sky/
    say how each part runs; `--local` runs them on this machine instead of a cloud.
    """
