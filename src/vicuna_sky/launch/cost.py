"""The cost of a run on spot: expected before it, realized after it (what its machines were
billed, what the same work would have cost on demand, and what the preemptions added).

The module has both sides of the same account. Before a run, `SpotRun` is the expected
cost (`vicuna-sky plan`): Young/Daly's checkpoint interval and the billed time a run needs when
each preemption loses work and a relaunch. After a run, `realized` measures: the events are the
run's attempts (one per machine: when it came up, when it went away) and, locally, the trainer's
per-step metrics. Work is "kept" when a later attempt did not redo it: an attempt's steps up to
the checkpoint the next attempt resumed from, and the whole of the last attempt. The on-demand
cost of the same work is the kept time at the on-demand price; the overhead is everything else
(restarts, lost steps) at the spot price. The chaos test holds one against the other.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from vicuna_sky.launch import jobs


def young_daly(checkpoint_seconds: float, mtbp_seconds: float) -> float:
    """The compute time between checkpoints that minimizes expected lost + checkpointing time:
    sqrt(2 x checkpoint cost x mean time between preemptions) (Young 1974, Daly 2006, to first
    order). No preemptions: infinite (checkpoint only at the end); free checkpoints: 0."""
    if mtbp_seconds == math.inf:
        return math.inf
    return math.sqrt(2 * checkpoint_seconds * mtbp_seconds)


@dataclass(frozen=True)
class SpotRun:
    """One run on one offer, in seconds of node wall clock. All inputs, no I/O."""

    work_seconds: float
    """T: training time with no checkpoint and no preemption (tokens / throughput)."""
    interval_seconds: float
    """tau: training time between periodic checkpoints."""
    checkpoint_seconds: float
    """C: how long training waits while a periodic checkpoint is written."""
    commit_lag_seconds: float
    """U: from a checkpoint's write to its commit in the bucket (the background upload). A
    preemption before the commit falls back to the one before: expected loss tau/2 + U."""
    relaunch_seconds: float
    """R: from a preemption to training again (provisioning, setup, download, load)."""
    preemptions_per_hour: float
    """lambda: expected preemptions per hour of this offer (Poisson)."""
    notice_seconds: float = 0.0
    """The cloud's notice window (GCP 30 s, AWS 120 s); 0 = no notice."""
    emergency_seconds: float = math.inf
    """Finishing the step, writing and uploading an emergency checkpoint."""

    @property
    def emergency_fits(self) -> bool:
        return self.emergency_seconds <= self.notice_seconds

    @property
    def lost_seconds(self) -> float:
        """Expected billed time one preemption wastes before the relaunch. The node is billed
        until the cloud takes it at the end of the notice window, and trains no more once it has
        saved: with an emergency checkpoint that fits, no work is lost, the window is (an upper
        bound: the job's exit may release the node sooner). Without one: the work since the
        newest committed checkpoint (tau/2 + U on average, the lag capped at one interval since
        uploads queue) plus the window spent on a save that never commits."""
        if self.emergency_fits:
            return self.notice_seconds
        return (
            self.interval_seconds / 2
            + min(self.commit_lag_seconds, self.interval_seconds)
            + (self.notice_seconds)
        )

    @property
    def per_preemption_seconds(self) -> float:
        return self.lost_seconds + self.relaunch_seconds

    @property
    def checkpoints_seconds(self) -> float:
        """Time spent writing periodic checkpoints over the run's kept work."""
        if self.interval_seconds == math.inf:
            return 0.0
        return self.work_seconds / self.interval_seconds * self.checkpoint_seconds

    @property
    def billed_seconds(self) -> float:
        """W = T (1 + C/tau) + n (L + R) with n = lambda W expected preemptions, so
        W = T (1 + C/tau) / (1 - lambda (L + R)). Infinite when a preemption is expected before
        one interval's work survives it (the run never finishes)."""
        rate = self.preemptions_per_hour / 3600
        waste = rate * self.per_preemption_seconds
        if waste >= 1:
            return math.inf
        return (self.work_seconds + self.checkpoints_seconds) / (1 - waste)

    @property
    def preemptions(self) -> float:
        return self.preemptions_per_hour / 3600 * self.billed_seconds

    @property
    def overhead_seconds(self) -> float:
        """Billed time that is not training: checkpoints, lost work, relaunches."""
        return self.billed_seconds - self.work_seconds

    def cost(self, hourly_usd: float, nodes: int) -> float:
        return self.billed_seconds / 3600 * hourly_usd * nodes

    def on_demand_cost(self, hourly_usd: float, nodes: int) -> float:
        """The same tokens on demand: no preemption, the same periodic checkpoints."""
        return (self.work_seconds + self.checkpoints_seconds) / 3600 * hourly_usd * nodes


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
    from sky.catalog import common

    from sky import catalog

    r = recipe.resources
    for cloud in r.clouds or ["aws"]:
        path = Path(common.get_catalog_path(f"{cloud}/vms.csv"))
        if not path.exists():
            raise ValueError(
                f"no local SkyPilot catalog for {cloud} ({path}); "
                "`vicuna-sky plan` fetches it when online"
            )
    if r.accelerator:
        from vicuna_sky.launch.plan import catalog_candidates

        spot, on_demand = catalog_candidates(recipe, top=50)
        if not spot or not on_demand:
            raise ValueError(f"no catalog offer for {r.accelerator}:{r.gpus_per_node}")
        best = spot[0]
        same = [c for c in on_demand if c.instance_type == best.instance_type] or on_demand
        return Prices(
            best.hourly_usd,
            same[0].hourly_usd,
            r.nodes,
            f"{best.cloud} {best.region} {best.instance_type} (SkyPilot catalog)",
        )
    cloud = (r.clouds or ["aws"])[0]
    instance = catalog.get_default_instance_type(cpus=r.cpus, clouds=cloud)
    if not instance:
        raise ValueError(f"no {cloud} instance type with {r.cpus} CPUs in the catalog")
    spot_price = catalog.get_hourly_cost(instance, True, None, None, clouds=cloud)
    od_price = catalog.get_hourly_cost(instance, False, None, None, clouds=cloud)
    return Prices(spot_price, od_price, r.nodes, f"{cloud} {instance} (SkyPilot catalog)")


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
