"""The realized cost of a run on spot: what its machines were billed, what the same work would
have cost on demand, and what the preemptions added. (The expected side, before a run, is the
planner's: vicuna_sky.plan.spot.SpotRun and `vicuna-sky plan`.)

`realized` measures: the events are the run's attempts (one per machine: when it came up, when it
went away) and, locally, the trainer's per-step metrics. Work is "kept" when a later attempt did not
redo it: an attempt's steps up to the checkpoint the next attempt resumed from, and the whole of the
last attempt. The on-demand cost of the same work is the kept time at the on-demand price; the
overhead is everything else (restarts, lost steps) at the spot price. The chaos test holds one
against the other.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from pathlib import Path

from vicuna_sky.launch import jobs


@dataclass(frozen=True)
class Prices:
    spot_hourly: float
    """One node, per hour."""
    on_demand_hourly: float
    nodes: int
    basis: str
    """Where the prices come from (cloud, instance type, catalog)."""


@dataclass(frozen=True)
class RealizedCost:
    attempts: int
    preemptions: int
    billed_hours: float
    kept_hours: float
    spot_usd: float
    on_demand_usd: float
    overhead_usd: float
    basis: str

    @property
    def saving(self) -> float:
        return 1 - self.spot_usd / self.on_demand_usd if self.on_demand_usd else 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def prices_for(recipe: object) -> Prices:
    """The cheapest spot offer for the recipe's resources and the on-demand price of the same
    instance type, from SkyPilot's catalog as it is on this machine: a missing catalog is an
    error here, never a download (local runs, tests and the demo stay off the network)."""
    r = recipe.resources
    return offer(r.accelerator, r.gpus_per_node, r.cpus, r.clouds or ["aws"], r.nodes)


def local_catalog(cloud: str) -> Path:
    """SkyPilot's catalog of `cloud` on this machine; ValueError when it has none (SkyPilot
    would download it: local runs, tests and the demo stay off the network)."""
    from sky.catalog import common

    path = Path(common.get_catalog_path(f"{cloud}/vms.csv"))
    if not path.exists():
        raise ValueError(
            f"no local SkyPilot catalog for {cloud} ({path}); `vicuna-sky plan` fetches it when "
            "online"
        )
    return path


def offer(
    accelerator: str | None, count: int, cpus: str | None, clouds: list[str], nodes: int = 1
) -> Prices:
    """One node's prices: with an accelerator, the region whose zones' median spot price is
    lowest (on-demand: the same instance type there); without, SkyPilot's default instance
    type for `cpus` and its cheapest region."""
    from sky.catalog import common

    from sky import catalog

    for cloud in clouds:
        local_catalog(cloud)
    if accelerator:
        from vicuna_sky.plan import catalog as plan_catalog
        from vicuna_sky.plan import offers

        zones = []
        for cloud in clouds:
            df = plan_catalog.read(Path(common.get_catalog_path(f"{cloud}/vms.csv")))
            zones += plan_catalog.zone_prices(cloud, df, count)
        regions = [
            p
            for p in offers.regions(zones)
            if p.gpu.lower() == accelerator.lower() and p.spot and p.on_demand
        ]
        if not regions:
            raise ValueError(f"no catalog offer for {accelerator}:{count}")
        best = min(regions, key=lambda p: (p.spot, p.cloud, p.region))
        return Prices(
            best.spot,
            best.on_demand,
            nodes,
            f"{best.cloud} {best.region} {best.instance_type} (SkyPilot catalog, median of "
            f"{best.zones} zones)",
        )
    cloud = clouds[0]
    instance = catalog.get_default_instance_type(cpus=cpus, clouds=cloud)
    if not instance:
        raise ValueError(f"no {cloud} instance type with {cpus} CPUs in the catalog")
    spot_price = catalog.get_hourly_cost(instance, True, None, None, clouds=cloud)
    od_price = catalog.get_hourly_cost(instance, False, None, None, clouds=cloud)
    return Prices(spot_price, od_price, nodes, f"{cloud} {instance} (SkyPilot catalog)")


def kept_seconds(job: jobs.LocalJob) -> float:
    """Time of the work no later attempt redid (see the module docstring)."""
    attempts = [a for a in job.attempts if a.ended_at]
    if not attempts:
        return 0.0
    kept = attempts[-1].ended_at - attempts[-1].started_at
    for attempt, following in itertools.pairwise(attempts):
        resumed = jobs.resumed_from(following) or 0
        kept += sum(
            m.get("seconds", 0.0) for m in jobs.attempt_metrics(attempt) if m["step"] <= resumed
        )
    return kept


def realized(job: jobs.LocalJob, prices: Prices) -> RealizedCost:
    """The realized cost of a local run, with the given (catalog) prices."""
    billed = sum(a.ended_at - a.started_at for a in job.attempts if a.ended_at)
    kept = min(kept_seconds(job), billed)
    nodes = prices.nodes
    billed_h, kept_h = billed / 3600 * nodes, kept / 3600 * nodes
    return RealizedCost(
        attempts=len(job.attempts),
        preemptions=sum(a.status == "PREEMPTED" for a in job.attempts),
        billed_hours=billed_h,
        kept_hours=kept_h,
        spot_usd=billed_h * prices.spot_hourly,
        on_demand_usd=kept_h * prices.on_demand_hourly,
        overhead_usd=(billed_h - kept_h) * prices.spot_hourly,
        basis=prices.basis,
    )


def realized_from_managed_job(record: dict, prices: Prices) -> RealizedCost:
    """A managed job from `sky.jobs.queue`: SkyPilot records the run's total duration and how
    often it recovered, not per-step progress, so the overhead is not separated (0 here)."""
    hours = float(record.get("job_duration") or 0.0) / 3600 * prices.nodes
    recoveries = int(record.get("recovery_count") or 0)
    return RealizedCost(
        attempts=recoveries + 1,
        preemptions=recoveries,
        billed_hours=hours,
        kept_hours=hours,
        spot_usd=hours * prices.spot_hourly,
        on_demand_usd=hours * prices.on_demand_hourly,
        overhead_usd=0.0,
        basis=prices.basis,
    )


@dataclass(frozen=True)
class Machine:
    """One kind of machine a fleet keeps up, and what one of them costs an hour."""

    role: str
    count: int
    spot: bool
    hourly: float
    basis: str
    ports: str


JOBS_CONTROLLER = ("4+", "4x")
"""SkyPilot's managed-jobs controller, on demand, which the worker jobs keep up (0.14.1
jobs/constants.py:57-68: cpus 4+, memory 4x, autostop after 10 idle minutes)."""


def fleet_machines(controller: object, worker: object, workers: int) -> list[Machine]:
    """The machines `serve --fleet` keeps up while it runs: its controller, its workers, and
    SkyPilot's jobs controller, priced from the local catalog (ValueError without one)."""
    import sky

    def clouds(task: object) -> list[str]:
        found = sorted({str(r.cloud).lower() for r in task.resources if r.cloud is not None})
        return found or ["aws", "gcp"]

    def ports(task: object) -> str:
        return ", ".join(sorted({str(p) for r in task.resources for p in r.ports or []}))

    def cpu_machine(task: object) -> tuple[str, float]:
        local_catalog(clouds(task)[0])
        res = next(iter(task.resources))
        instance = sky.catalog.get_default_instance_type(
            cpus=res.cpus, memory=res.memory, clouds=clouds(task)[0]
        )
        if not instance:
            raise ValueError(f"no {clouds(task)[0]} instance type with {res.cpus} CPUs")
        cost = sky.catalog.get_hourly_cost(instance, False, None, None, clouds=clouds(task)[0])
        return f"{clouds(task)[0]} {instance} (SkyPilot catalog)", cost

    basis, hourly = cpu_machine(controller)
    machines = [Machine("fleet controller", 1, False, hourly, basis, ports(controller))]
    res = next(iter(worker.resources))
    ((gpu, count),) = (res.accelerators or {"": 0}).items()
    spot = bool(res.use_spot)
    if gpu:
        prices = offer(gpu, int(count), None, clouds(worker))
        machines.append(
            Machine(
                "worker",
                workers,
                spot,
                prices.spot_hourly if spot else prices.on_demand_hourly,
                prices.basis,
                ports(worker),
            )
        )
    else:
        basis, hourly = cpu_machine(worker)
        machines.append(Machine("worker", workers, False, hourly, basis, ports(worker)))
    cloud = clouds(worker)[0]
    local_catalog(cloud)
    cpus, memory = JOBS_CONTROLLER
    instance = sky.catalog.get_default_instance_type(cpus=cpus, memory=memory, clouds=cloud)
    if instance:
        cost = sky.catalog.get_hourly_cost(instance, False, None, None, clouds=cloud)
        basis = f"{cloud} {instance} (SkyPilot catalog)"
        machines.append(Machine("SkyPilot jobs controller", 1, False, cost, basis, ""))
    return machines
