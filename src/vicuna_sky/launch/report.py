"""What the launcher's commands print: where a local run works, its summary, plans, status
and logs."""

from __future__ import annotations

import math
from pathlib import Path

from rich.syntax import Syntax
from rich.table import Table

from vicuna_sky.errors import VicunaSkyError
from vicuna_sky.launch import cost, jobs
from vicuna_sky.launch.tasks import (
    Spec,
)
from vicuna_sky.recipe import Recipe
from vicuna_sky.terminal import make_console

console = make_console()


def print_yaml(text: str) -> None:
    """Highlighted on a terminal; as plain text elsewhere (a file or a pipe gets the YAML
    itself, not lines padded to the console's width)."""
    if console.is_terminal:
        console.print(Syntax(text, "yaml", word_wrap=True))
    else:
        print(text, end="")


def summarize(
    spec: Spec, task: object, job: jobs.LocalJob, bucket_dir: Path, export: Path | None
) -> None:
    """What a finished local run made and where it is: the exported model (training) or the
    report (evaluation), with steps, final loss, time and cost."""
    envs = task.envs
    seconds = sum(max(0.0, a.ended_at - a.started_at) for a in job.attempts)
    said = [f"{len(job.attempts)} attempt(s), {seconds / 60:.1f} min"]
    if spec is Spec.TRAIN:
        metrics = [m for a in job.attempts for m in jobs.attempt_metrics(a)]
        if metrics:
            said.append(f"{metrics[-1]['step']} steps, final loss {metrics[-1]['loss']:.4f}")
        if job.prices:
            said.append(_cost_cell(job))
        model = Path(export or bucket_dir / "models" / envs.get("RUN_NAME", "")).resolve()
        console.print(f"[bold]trained[/]: {'; '.join(said)}\n  model: {model}")
    elif spec is Spec.EVAL:
        bench = Path(envs.get("BENCH", "")).name.removesuffix(".jsonl")
        report = bucket_dir / "eval" / envs.get("RUN_NAME", "") / bench / "report"
        console.print(
            f"[bold]evaluated[/]: {'; '.join(said)}\n  report: {report / 'report.json'} "
            f"(plots: {report})"
        )


def print_plan(
    recipe: Recipe, top: int = 5, as_json: bool = False, plan: object = None, **options: object
) -> None:
    """The cost plan as tables, or as JSON (only JSON on stdout). `options` go to make_plan
    (catalog_dir, any_cloud, special_zones, verbose)."""
    from vicuna_sky.plan import make_plan
    from vicuna_sky.plan.render import render

    if plan is None:
        try:
            plan = make_plan(recipe, top=top, **options)
        except ValueError as e:
            raise VicunaSkyError(str(e)) from None
    if as_json:
        import json

        # Plain print: rich would wrap and colour it; a pipe wants exact JSON.
        print(json.dumps(_finite(plan.to_dict()), indent=2, allow_nan=False))
        return
    for part in render(plan):
        console.print(part)


def _finite(value: object) -> object:
    """JSON has no infinity: a run that never finishes (or a missing price) is null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def print_status(local: bool, runs_dir: Path, cloud: bool = False) -> None:
    """Local runs (with their cost), then SkyPilot's sections. SkyPilot is asked only when its
    API server is up (or `cloud`): starting one to find nothing takes half a minute."""
    rows = [
        jobs.describe(j) | {"where": "local", "cost": _cost_cell(j)}
        for j in jobs.list_jobs(runs_dir)
    ]
    _print_rows(f"local runs in {runs_dir}", rows)
    if local:
        return
    from vicuna_sky.launch import cloud as cloud_lib

    if not cloud and not cloud_lib.api_server_up():
        console.print(
            "SkyPilot: no API server is up, so nothing was launched from here since it last "
            "stopped (`vicuna-sky status --cloud` starts one and asks)"
        )
        return
    for section in cloud_lib.status():
        if section.note:
            console.print(f"{section.title}: {section.note}")
        else:
            _print_rows(f"SkyPilot {section.title}", section.rows)


def _print_rows(title: str, rows: list[dict[str, str]]) -> None:
    table = Table(title=title, title_justify="left")
    columns = list(dict.fromkeys(c for row in rows for c in row)) or ["status"]
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*[str(row.get(c, "-")) for c in columns])
    console.print(table if rows else f"{title}: none")


def _cost_cell(job: jobs.LocalJob) -> str:
    if not job.prices:
        return "-"
    c = cost.realized(job, cost.Prices(**job.prices))
    return (
        f"${c.spot_usd:.4f} spot ({c.billed_hours * 60:.1f} node-min) vs "
        f"${c.on_demand_usd:.4f} on-demand; preemption overhead ${c.overhead_usd:.4f}"
    )


def print_fleet_machines(machines: list) -> None:
    """What each machine of a fleet costs an hour while the fleet is up (cost.Machine rows)."""
    table = Table(title="while the fleet is up", title_justify="left")
    for column in ("machine", "count", "market", "where", "ports", "$/h each", "$/h"):
        table.add_column(column)
    for m in machines:
        market = "spot" if m.spot else "on-demand"
        row = (m.role, str(m.count), market, m.basis, m.ports or "-")
        table.add_row(*row, f"{m.hourly:.4f}", f"{m.hourly * m.count:.4f}")
    total = sum(m.hourly * m.count for m in machines)
    table.add_row("all", "", "", "", "", "", f"{total:.4f}")
    console.print(table)
