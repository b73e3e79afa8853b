"""What a plan says: the GPU types considered, each region's offer priced as a run, and the whole
plan ranked, as tables (plan/render.py) or JSON (`to_dict`). make_plan (plan/planner.py) builds it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from vicuna_sky.plan import memory, offers
from vicuna_sky.plan.checkpoint import Checkpointing
from vicuna_sky.plan.spot import SpotRun
from vicuna_sky.plan.throughput import Throughput
from vicuna_sky.plan.tokens import TokenCount
from vicuna_sky.spot import NOTICE_WINDOW_SECONDS

SKYPILOT_RULE = (
    "SkyPilot's optimizer, with no time estimate, ranks by hourly price (a 1-hour estimate, "
    "sky/optimizer.py) at the cheapest zone of each region, Local Zones and outliers included"
)


@dataclass(frozen=True)
class GpuOption:
    """One GPU type the recipe accepts."""

    gpu: str
    count: int
    memory: memory.MemoryFit | None
    throughput: Throughput | None
    """None when no peak FLOP/s is known for it (nothing to price it by)."""
    offered: bool = True
    """The catalog has an offer for it (on the clouds and regions planned for)."""

    @property
    def fits(self) -> bool:
        return self.memory is None or self.memory.fits

    @property
    def status(self) -> str:
        if not self.offered:
            return "no offer in the catalog"
        if self.throughput is None:
            return "throughput unknown"
        return "fits" if self.fits else "does not fit"


@dataclass(frozen=True)
class Offer:
    price: offers.RegionPrice
    option: GpuOption
    nodes: int
    work_seconds: float
    checkpointing: Checkpointing
    preemptions_per_hour: float
    every_steps: int
    run: SpotRun
    enabled: bool
    spot_egress_usd: float
    on_demand_egress_usd: float

    @property
    def cloud(self) -> str:
        return self.price.cloud

    @property
    def region(self) -> str:
        return self.price.region

    @property
    def spot_usd(self) -> float | None:
        """Expected on spot, preemptions included; None: no spot price, or a run that is
        expected never to finish (preempted before an interval's work survives)."""
        if self.price.spot is None or self.run.billed_seconds == math.inf:
            return None
        return self.run.cost(self.price.spot, self.nodes) + self.spot_egress_usd

    @property
    def on_demand_usd(self) -> float | None:
        if self.price.on_demand is None:
            return None
        return self.run.on_demand_cost(self.price.on_demand, self.nodes) + self.on_demand_egress_usd

    @property
    def recommended(self) -> str:
        spot, on_demand = self.spot_usd, self.on_demand_usd
        if spot is None:
            return "on-demand"
        if on_demand is None or spot <= on_demand:
            return "spot"
        return "on-demand"

    @property
    def usd(self) -> float:
        return self.spot_usd if self.recommended == "spot" else self.on_demand_usd

    @property
    def why(self) -> str:
        if self.price.spot is None:
            return "no spot price in the catalog"
        if self.spot_usd is None:
            return (
                f"at {self.preemptions_per_hour:g} preemptions/h spot never finishes (each "
                "preemption costs more time than survives it): on demand"
            )
        if self.recommended == "on-demand":
            return "spot's expected cost (lost work and relaunches) exceeds on demand"
        return ""

    def to_dict(self, tokens: float) -> dict:
        run = self.run
        return {
            **self.price.to_dict(),
            "enabled": self.enabled,
            "tokens_per_gpu_second": round(self.option.throughput.per_gpu, 1),
            "training_hours": self.work_seconds / 3600,
            "preemptions_per_hour": self.preemptions_per_hour,
            "checkpoint_every_steps": self.every_steps,
            "emergency_checkpoint_fits": run.emergency_fits,
            "expected_preemptions": _finite(run.preemptions),
            "billed_hours": _finite(run.billed_seconds / 3600),
            "expected_spot_usd": self.spot_usd,
            "on_demand_usd": self.on_demand_usd,
            "egress_usd": self.spot_egress_usd
            if self.recommended == "spot"
            else self.on_demand_egress_usd,
            "recommended": self.recommended,
            "recommended_usd": self.usd,
            "usd_per_million_tokens": self.usd / (tokens / 1e6),
            "why": self.why,
        }


@dataclass
class Plan:
    recipe: str
    nodes: int
    gpus_per_node: int
    token_count: TokenCount
    tokens: float
    """Tokens processed in the whole run (tokens per epoch x epochs)."""
    options: list[GpuOption]
    offers: list[Offer]
    """Every offer, ranked: enabled clouds first, then by recommended cost."""
    enabled_clouds: frozenset[str]
    clouds: list[str]
    egress: dict
    catalog: str
    budget_usd: float | None = None
    recipe_every_steps: int = 0
    skypilot_choice: Offer | None = None
    skypilot_price: float | None = None
    seed: dict = field(default_factory=dict)
    top: int = 5

    @property
    def best(self) -> Offer | None:
        return self.offers[0] if self.offers else None

    @property
    def launch_set(self) -> list[str]:
        """The GPU types that fit, as SkyPilot's accelerator strings, best first."""
        ranked = []
        for o in self.offers:
            name = f"{o.option.gpu}:{o.option.count}"
            if name not in ranked:
                ranked.append(name)
        return ranked

    @property
    def expected_usd(self) -> float | None:
        """The best offer's recommended (spot or on-demand) cost."""
        return self.best.usd if self.best else None

    @property
    def over_budget(self) -> bool:
        usd = self.expected_usd
        return bool(self.budget_usd and usd is not None and usd > self.budget_usd)

    def emergency(self) -> dict[str, dict]:
        """Per cloud with a notice: does an emergency checkpoint commit within the window (for
        the best offer's checkpoint and step time)."""
        ck = self.best.checkpointing if self.best else None
        out = {}
        for cloud in ("aws", "gcp"):
            window = NOTICE_WINDOW_SECONDS[cloud]
            if ck is None:  # nothing to checkpoint on: the same keys, no figures
                out[cloud] = {"window_seconds": window, "needs_seconds": None, "fits": None}
                out[cloud]["then"] = None
                continue
            fits = ck.emergency_seconds <= window
            out[cloud] = {
                "window_seconds": window,
                "needs_seconds": round(ck.emergency_seconds, 1),
                "fits": fits,
                "then": "no work lost: the run resumes from the emergency checkpoint"
                if fits
                else "the save cannot commit before the machine goes: the run resumes from the "
                "newest periodic checkpoint (half an interval + the upload lag lost on average)",
            }
        return out

    def to_dict(self) -> dict:
        """The plan as JSON: the same keys for every plan, null where a figure does not exist."""
        tc, best = self.token_count, self.best
        ck = best.checkpointing if best else None
        run = best.run if best else None
        sky = self.skypilot_choice
        return {
            "recipe": self.recipe,
            "nodes": self.nodes,
            "gpus_per_node": self.gpus_per_node,
            "catalog": self.catalog,
            "clouds": self.clouds,
            "enabled_clouds": sorted(self.enabled_clouds),
            "egress": self.egress,
            "tokens": {
                "per_epoch": tc.per_epoch,
                "total": self.tokens,
                "sequences_per_epoch": tc.sequences,
                "source": "measured" if tc.measured else "estimate",
                "basis": tc.basis,
            },
            "gpus": [
                {
                    "gpu": o.gpu,
                    "gpus_per_node": o.count,
                    "status": o.status,
                    "fits": o.fits,
                    "offered": o.offered,
                    "memory": o.memory.to_dict() if o.memory else memory.EMPTY,
                    "tokens_per_gpu_second": round(o.throughput.per_gpu, 1)
                    if o.throughput
                    else None,
                    "throughput_source": o.throughput.source if o.throughput else None,
                    "throughput_basis": o.throughput.basis if o.throughput else None,
                }
                for o in self.options
            ],
            "best": _best_dict(best),
            "checkpoint": {
                "size_gb": ck.size_bytes / 1e9 if ck else None,
                "stall_seconds": ck.stall_seconds if ck else None,
                "write_seconds": ck.write_seconds if ck else None,
                "upload_seconds": ck.upload_seconds if ck else None,
                "commit_seconds": ck.commit_seconds if ck else None,
                "step_seconds": ck.step_seconds if ck else None,
                "total_steps": ck.total_steps if ck else None,
                "steps_basis": ck.steps_basis if ck else None,
                "every_steps": best.every_steps if best else None,
                "interval_minutes": _finite(run.interval_seconds / 60) if run else None,
                "recipe_every_steps": self.recipe_every_steps,
                "relaunch_minutes": run.relaunch_seconds / 60 if run else None,
                "rule": "Young/Daly: interval = sqrt(2 x stall seconds x mean seconds between "
                "preemptions) for the best offer's preemption rate, at least commit seconds",
            },
            "emergency_checkpoint": self.emergency(),
            "offers": [o.to_dict(self.tokens) for o in self.offers[: self.top]],
            "expected_usd": self.expected_usd,
            "recommended": best.recommended if best else None,
            "expected_spot_usd": best.spot_usd if best else None,
            "on_demand_usd": best.on_demand_usd if best else None,
            "launch_accelerators": self.launch_set,
            "skypilot_choice": {
                "rule": SKYPILOT_RULE,
                "cloud": sky.cloud if sky else None,
                "region": sky.region if sky else None,
                "gpu": sky.option.gpu if sky else None,
                "spot_hourly": self.skypilot_price,
                "recommended_usd": sky.usd if sky else None,
                "differs": bool(sky and best and sky is not best),
            },
            "seed": self.seed,
            "budget_usd": self.budget_usd,
            "over_budget": self.over_budget,
        }


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _best_dict(best: Offer | None) -> dict:
    keys = ("cloud", "region", "instance_type", "gpu", "recommended", "recommended_usd")
    if best is None:
        return dict.fromkeys(keys)
    return {
        "cloud": best.cloud,
        "region": best.region,
        "instance_type": best.price.instance_type,
        "gpu": best.option.gpu,
        "recommended": best.recommended,
        "recommended_usd": best.usd,
    }
