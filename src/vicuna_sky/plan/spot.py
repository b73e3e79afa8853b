"""The spot model: what a run on one offer is expected to bill, preemptions included.

The billed time of a run whose every preemption loses work and waits for a relaunch, at a
given checkpoint interval (checkpoint.py chooses it). All inputs, no I/O; the planner feeds it
each offer's figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from vicuna_sky.recipe import Recipe

# From a preemption to training again, in parts: what this project measured, and the one part
# only a cloud run can measure. The planner adds the two downloads a relaunch makes from the
# bucket (the base model, hub-cache/, and the checkpoint) from their sizes.
PROVISION_MINUTES = 5.0
"""Assumed, not measured (no cloud here): SkyPilot's managed-job controller noticing the
preemption and provisioning a spot GPU node in the next region, up to the start of its setup."""
INSTALL_SECONDS = 41.0
"""Measured: sky/install.sh's uv install of the node set (torch included) into an empty Python,
cold cache (`bash benchmarks/node_install.sh`, 2026-12-02, this project's 2-core machine
under load: pip took 693 s). Zero with an image that has the package."""
START_SECONDS = 9.1
"""Measured: a relaunched attempt's start to its first resumed step on the local backend, the
trainer's own start-up (`benchmarks/chaos_recovery.py --preemptions 4`, tiny recipe: 9.1 s for
the first attempt and 9.1-9.2 s per relaunch). A real model's read from disk is in the
downloads' time."""
RELAUNCH_MINUTES = PROVISION_MINUTES + (INSTALL_SECONDS + START_SECONDS) / 60
"""From a preemption to training again, before the downloads from the bucket; a recipe's
plan.relaunch_minutes overrides it."""


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


def relaunch_minutes(recipe: Recipe) -> float:
    """The recipe's plan.relaunch_minutes, else RELAUNCH_MINUTES."""
    own = recipe.plan.relaunch_minutes
    return RELAUNCH_MINUTES if own is None else own


def base_model_seconds(recipe: Recipe) -> float:
    """A relaunched node reads the base model (bf16 safetensors) from the bucket's hub-cache/
    (vicuna_sky.train.model_cache), each node all of it, at the recipe's bucket bandwidth."""
    return recipe.model.params_b * 2e9 / (recipe.plan.upload_gb_per_second * 1e9)


def preemption_rate(recipe: Recipe, cloud: str, region: str) -> float:
    """The offer's preemptions per hour: 'cloud/region', then 'cloud', then the default."""
    rates = {k.lower(): v for k, v in recipe.plan.preemption_rates.items()}
    for key in (f"{cloud}/{region}".lower(), cloud.lower()):
        if key in rates:
            return rates[key]
    return recipe.plan.preemptions_per_hour
