"""`vicuna-sky status NAME` and `logs NAME --metrics`: how a training run is doing, now.

The numbers come from the metrics the trainer keeps beside its checkpoints in the bucket
(`vicuna_sky.train.metrics`), so they are the same for a managed job on a cloud as for a local
run (whose bucket is a local folder): latest step, train and eval loss, tokens/s, MFU, the time
left at the recent pace, preemptions so far and dollars so far at the offer's price.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from vicuna_sky.errors import VicunaSkyError
from vicuna_sky.launch import cost, jobs
from vicuna_sky.train.metrics import History, history

PACE_STEPS = 20
"""The ETA assumes the pace of this many latest steps."""


@dataclass
class Live:
    name: str
    status: str
    url: str
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    eval_loss: float | None = None
    eval_step: int | None = None
    base_eval_loss: float | None = None
    tokens_per_second: float | None = None
    mfu: float | None = None
    tokens_seen: int = 0
    eta_seconds: float | None = None
    preemptions: int = 0
    dollars: float | None = None
    price_basis: str = ""
    updated: float | None = None
    """Wall-clock time of the newest record."""


def summarize(name: str, status: str, url: str, runs: History) -> Live:
    live = Live(name, status, url, preemptions=runs.preemptions)
    records = runs.records
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if r.get("eval_loss") is not None]
    if records:
        live.updated = records[-1].get("time")
        live.total_steps = int(records[-1].get("total_steps") or 0)
    if train:
        last = train[-1]
        live.step, live.loss = int(last["step"]), last["loss"]
        live.tokens_per_second, live.mfu = last.get("tokens_per_second"), last.get("mfu")
        live.tokens_seen = int(last.get("tokens_seen") or 0)
        pace = [r["seconds"] for r in train[-PACE_STEPS:] if r.get("seconds")]
        if pace and live.total_steps:
            live.eta_seconds = max(0, live.total_steps - live.step) * sum(pace) / len(pace)
    if evals:
        live.eval_loss, live.eval_step = evals[-1]["eval_loss"], int(evals[-1]["step"])
        base = [r for r in evals if r["step"] == 0]
        live.base_eval_loss = base[0]["eval_loss"] if base else None
    return live


def for_local_job(job: jobs.LocalJob) -> Live:
    if not job.metrics_url:
        raise VicunaSkyError(f"{job.name} is no training run: it keeps no training metrics")
    live = summarize(job.name, job.status, job.metrics_url, history(job.metrics_url))
    # The attempts the launcher recorded are the truth here, the metrics' count a lower bound.
    live.preemptions = max(live.preemptions, sum(a.status == "PREEMPTED" for a in job.attempts))
    if job.prices:
        prices = cost.Prices(**job.prices)
        now = time.time()
        seconds = sum(
            (a.ended_at or (now if jobs.in_progress(job) else a.started_at)) - a.started_at
            for a in job.attempts
            if a.started_at
        )
        live.dollars = seconds / 3600 * prices.spot_hourly * prices.nodes
        live.price_basis = f"spot price of {prices.basis}"
    return live


def for_cloud_run(name: str, recipe: object, tag: str) -> Live:
    """A managed job: its metrics in the recipe's bucket; the time billed is each attempt's
    span in its records (from its first step's start to its newest record), at the cheapest
    offer's price for the recipe (SkyPilot's catalog on this machine)."""
    url = f"{recipe.bucket.rstrip('/')}/runs/{recipe.name}/{tag}"
    try:
        runs = history(url)
    except Exception as e:
        raise VicunaSkyError(f"cannot read the metrics at {url}: {e}") from None
    if not runs.records:
        raise VicunaSkyError(f"no training metrics at {url} yet")
    live = summarize(name, "see `vicuna-sky status`", url, runs)
    try:
        prices = cost.prices_for(recipe)
    except Exception:
        return live
    seconds = 0.0
    for attempt in runs.attempts:
        if attempt:
            first = attempt[0]
            seconds += attempt[-1]["time"] - first["time"] + float(first.get("seconds") or 0)
    price = prices.spot_hourly if recipe.resources.spot else prices.on_demand_hourly
    live.dollars = seconds / 3600 * price * prices.nodes
    kind = "spot" if recipe.resources.spot else "on-demand"
    live.price_basis = f"{kind} price of {prices.basis}"
    return live


def _minutes(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.1f} h"


def lines(live: Live) -> list[str]:
    """What `status NAME` prints: one fact per line, each line a label and its numbers."""
    f = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
    of = f"/{live.total_steps}" if live.total_steps else ""
    evaluated = "-"
    if live.eval_loss is not None:
        evaluated = f"{live.eval_loss:.4f} (step {live.eval_step})"
        if live.base_eval_loss is not None:
            evaluated += f", base model {live.base_eval_loss:.4f}"
    ago = f" ({time.time() - live.updated:.0f} s ago)" if live.updated else ""
    dollars = f"${live.dollars:.4f} at the {live.price_basis}" if live.dollars is not None else "-"
    return [
        f"{live.name}: {live.status}",
        f"  step         {live.step}{of}",
        f"  train loss   {f(live.loss, '.4f')}",
        f"  eval loss    {evaluated}",
        f"  tokens/s     {f(live.tokens_per_second, ',.0f')}  (tokens seen {live.tokens_seen:,})",
        f"  MFU          {f(None if live.mfu is None else 100 * live.mfu, '.1f')}"
        + ("%" if live.mfu is not None else ""),
        f"  ETA          {_minutes(live.eta_seconds)}",
        f"  preemptions  {live.preemptions}",
        f"  spent        {dollars}",
        f"  metrics      {live.url}{ago}",
    ]


def show(name: str, runs_dir: object, recipe: str | None = None, tag: str = "main") -> None:
    """Print a run's live status: a local run by its name (or run directory), or with `recipe`
    a managed job whose recipe says where its bucket is."""
    from pathlib import Path

    from vicuna_sky.terminal import make_console

    if recipe is not None:
        from vicuna_sky.launch.tasks import resolve_recipe
        from vicuna_sky.recipe import Recipe

        live = for_cloud_run(name, Recipe.from_yaml(resolve_recipe(recipe)), tag)
    else:
        try:
            job = jobs.find_job(Path(runs_dir), name)
        except VicunaSkyError as e:
            raise VicunaSkyError(
                f"{e}; for a managed job on a cloud, add --recipe (the recipe it was launched "
                "from: its bucket holds the metrics)"
            ) from None
        live = for_local_job(job)
    console = make_console()
    for line in lines(live):
        console.print(line, highlight=False, soft_wrap=True, markup=False)
