"""The plan: every GPU type the recipe accepts, whether the model fits it, and each region's offer
priced as a run, spot or on demand, whichever is cheaper; ranked enabled clouds first.

Per offer: training hours at that GPU's throughput; Young/Daly's checkpoint interval at the
offer's preemption rate; the expected billed time on spot (lost work and relaunches included)
against the same work on demand; cross-cloud traffic when the bucket is elsewhere. When spot is
expected to cost more than on demand (or never to finish), the offer recommends on demand, and
the budget check uses the recommended figure: a plan never says infinity.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vicuna_sky.plan import catalog, egress, hardware, memory, offers
from vicuna_sky.plan.checkpoint import Checkpointing, checkpointing
from vicuna_sky.plan.clouds import enabled_clouds
from vicuna_sky.plan.errors import PlanError
from vicuna_sky.plan.spot import SpotRun, base_model_seconds, preemption_rate, relaunch_minutes
from vicuna_sky.plan.throughput import Throughput, throughput
from vicuna_sky.plan.tokens import TokenCount, token_count
from vicuna_sky.recipe import Recipe
from vicuna_sky.spot import NOTICE_WINDOW_SECONDS

SEED_FIGURES = {7.0: 140.0, 13.0: 300.0}
"""The seed's cost of a Vicuna run by model size (billions of parameters -> USD): "training the
7B model from $500 to around $140 and the 13B model from around $1K to $300" with SkyPilot
managed spot (the Vicuna blog, lmsys.org, 2023-03-30)."""
SEED_SOURCE = "Vicuna blog (2023-03-30): SkyPilot managed spot, 8 x A100-80GB, 2023 prices"
SEED_GPU = "A100-80GB"
"""The seed trained on 8 x A100 80GB, on padded rows (no packing)."""

SEED_KEYS = (
    "gpu",
    "packing",
    "tokens_per_gpu_second",
    "spot_usd",
    "spot_where",
    "on_demand_usd",
    "on_demand_where",
)

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


def seed_figure(params_b: float) -> float | None:
    """The seed's $ for a model of about this size (within 25 %), else None."""
    size = min(SEED_FIGURES, key=lambda b: abs(math.log(params_b / b)))
    return SEED_FIGURES[size] if abs(params_b / size - 1) <= 0.25 else None


def _wanted(recipe: Recipe) -> list[str] | None:
    """GPU names the recipe accepts, as written; None for `any`."""
    r = recipe.resources
    if [a.lower() for a in r.accelerators] == ["any"]:
        return None
    return [a.partition(":")[0] for a in r.accelerators] or [r.accelerator]


def _clouds(recipe: Recipe, any_cloud: bool) -> tuple[list[str], dict]:
    """The clouds to price and what was done about egress."""
    candidates = [c.lower() for c in recipe.resources.clouds] or list(catalog.DEFAULT_CLOUDS)
    store = egress.bucket_cloud(recipe.bucket)
    if store is None:
        note = f"the bucket ({recipe.bucket}) is on no compute cloud: no egress counted"
        return candidates, {"mode": "none", "bucket_cloud": None, "note": note}
    if not any_cloud and store in candidates:
        note = (
            f"offers restricted to {store}, the bucket's cloud (checkpoints never cross clouds); "
            "--any-cloud widens them and prices the traffic"
        )
        return [store], {"mode": "restricted", "bucket_cloud": store, "note": note}
    note = (
        f"offers off {store} (the bucket's cloud) pay egress for checkpoints, relaunch downloads "
        f"and the export: {egress.SOURCE}"
    )
    return candidates, {"mode": "priced", "bucket_cloud": store, "note": note}


def make_plan(
    recipe: Recipe,
    top: int = 5,
    catalog_dir: Path | None = None,
    enabled: frozenset[str] | None = None,
    any_cloud: bool = False,
    special_zones: bool = False,
    verbose: bool = False,
) -> Plan:
    """The plan for a GPU recipe (see the module docstring). `catalog_dir`: a saved copy of
    SkyPilot's catalogs (<dir>/<cloud>/vms.csv) instead of SkyPilot's own; `enabled`: the
    enabled clouds instead of SkyPilot's record of `sky check`."""
    r = recipe.resources
    if not r.accelerator:
        raise PlanError(f"{recipe.source}: the cost plan is for GPU recipes (no accelerator)")
    clouds, egress_note = _clouds(recipe, any_cloud)
    zones: list[catalog.ZonePrice] = []
    for cloud in clouds:
        df = catalog.read(catalog.catalog_path(cloud, catalog_dir, verbose))
        zones += catalog.zone_prices(cloud, df, r.gpus_per_node)
    zones = _in_regions(recipe, zones, clouds)
    names = _gpu_names(recipe, zones, clouds)
    tokens = token_count(recipe)
    total_tokens = tokens.per_epoch * recipe.train.epochs
    enabled = enabled_clouds(verbose) if enabled is None else frozenset(enabled)
    store = egress_note["bucket_cloud"]
    regions = offers.regions([z for z in zones if z.gpu in names], special_zones)

    def option(gpu: str, packing: bool | None = None) -> GpuOption:
        known = hardware.lookup(gpu) is not None or gpu.lower() == r.accelerator.lower()
        return GpuOption(
            gpu,
            r.gpus_per_node,
            memory.fit(recipe, gpu),
            throughput(recipe, gpu, packing=packing) if known else None,
            offered=any(p.gpu == gpu for p in regions),
        )

    def priced(
        opt: GpuOption, packing: bool | None = None, pool: list | None = None
    ) -> list[Offer]:
        ck = checkpointing(recipe, tokens, opt.throughput.per_gpu, packing)
        work = total_tokens / (opt.throughput.per_gpu * r.gpus_per_node * r.nodes)
        out = []
        for price in (p for p in (regions if pool is None else pool) if p.gpu == opt.gpu):
            rate = preemption_rate(recipe, price.cloud, price.region)
            steps = ck.planned_steps(rate)
            run = SpotRun(
                work_seconds=work,
                interval_seconds=steps * ck.step_seconds,
                checkpoint_seconds=ck.stall_seconds,
                commit_lag_seconds=ck.commit_seconds,
                relaunch_seconds=relaunch_minutes(recipe) * 60
                + base_model_seconds(recipe)
                + ck.download_seconds,
                preemptions_per_hour=rate,
                notice_seconds=NOTICE_WINDOW_SECONDS.get(price.cloud, 0.0),
                emergency_seconds=ck.emergency_seconds,
            )
            size_gb = ck.size_bytes / 1e9
            saves = 0.0 if run.interval_seconds == math.inf else work / run.interval_seconds
            export_gb = recipe.model.params_b * 2  # bf16 safetensors
            relaunches = run.preemptions if math.isfinite(run.preemptions) else 0.0
            out.append(
                Offer(
                    price=price,
                    option=opt,
                    nodes=r.nodes,
                    work_seconds=work,
                    checkpointing=ck,
                    preemptions_per_hour=rate,
                    every_steps=steps,
                    run=run,
                    enabled=price.cloud in enabled,
                    spot_egress_usd=egress.cost(
                        price.cloud, store, size_gb, saves, relaunches, export_gb
                    ),
                    on_demand_egress_usd=egress.cost(
                        price.cloud, store, size_gb, saves, 0, export_gb
                    ),
                )
            )
        return out

    options = [option(gpu) for gpu in names]
    priceable = (o for opt in options if opt.fits and opt.throughput for o in priced(opt))
    ranked = sorted(
        (o for o in priceable if o.usd is not None),  # no price at all: nothing to rank
        key=lambda o: (not o.enabled, o.usd, o.cloud, o.region),
    )
    plan = Plan(
        recipe=recipe.name,
        nodes=r.nodes,
        gpus_per_node=r.gpus_per_node,
        token_count=tokens,
        tokens=total_tokens,
        options=options,
        offers=ranked,
        enabled_clouds=enabled,
        clouds=clouds,
        egress=egress_note,
        catalog=str(catalog_dir) if catalog_dir else "SkyPilot's catalog (~/.sky/catalogs/v8)",
        budget_usd=recipe.budget_usd,
        recipe_every_steps=recipe.train.checkpoint_every_steps,
        top=top,
    )
    plan.skypilot_choice, plan.skypilot_price = _skypilot_choice(recipe, ranked)
    seed_regions = offers.regions([z for z in zones if z.gpu == SEED_GPU], special_zones)
    plan.seed = _seed(recipe, seed_regions, option, priced)
    return plan


def _in_regions(
    recipe: Recipe, zones: list[catalog.ZonePrice], clouds: list[str]
) -> list[catalog.ZonePrice]:
    wanted = [infra.lower().partition("/")[::2] for infra in recipe.resources.regions]
    wanted = [(c, reg) for c, reg in wanted if c in clouds]
    if not wanted:
        return zones
    known = {(z.cloud, z.region) for z in zones}
    for cloud, region in wanted:
        if (cloud, region) not in known:
            have = sorted({reg for c, reg in known if c == cloud})
            raise PlanError(
                f"{recipe.source}: resources.regions '{cloud}/{region}' has no "
                f"{recipe.resources.gpus_per_node}-GPU offer in the {cloud} catalog (regions "
                f"with one: {', '.join(have) or 'none'})"
            )
    return [z for z in zones if (z.cloud, z.region) in set(wanted)]


def _gpu_names(recipe: Recipe, zones: list[catalog.ZonePrice], clouds: list[str]) -> list[str]:
    """The GPU types to price, in the recipe's order, by the catalog's names (matched whatever
    their case, as SkyPilot's catalog query is). A type the catalog does not offer here is kept
    (and shown as such) when it is a GPU the planner knows; a name that is neither, or a list
    of which nothing is offered, is an error."""
    offered = {z.gpu.lower(): z.gpu for z in zones}
    wanted = _wanted(recipe)
    if wanted is None:
        return sorted(set(offered.values()))
    have = ", ".join(sorted(set(offered.values()))) or "none"
    where = f"{'/'.join(clouds)} catalog"
    names = []
    for name in wanted:
        known = hardware.lookup(name)
        if name.lower() not in offered and known is None:
            raise PlanError(
                f"{recipe.source}: unknown GPU '{name}': no {where} offers it with "
                f"{recipe.resources.gpus_per_node} per node (it offers: {have})"
            )
        canonical = offered.get(name.lower()) or known.name
        if canonical not in names:
            names.append(canonical)
    if not any(n.lower() in offered for n in names):
        raise PlanError(
            f"{recipe.source}: no {where} offers {' or '.join(names)} with "
            f"{recipe.resources.gpus_per_node} per node (it offers: {have})"
        )
    return names


def _skypilot_choice(recipe: Recipe, ranked: list[Offer]) -> tuple[Offer | None, float | None]:
    """The offer SkyPilot's optimizer would launch from the same set (SKYPILOT_RULE)."""
    spot = recipe.resources.spot
    pool = [o for o in ranked if o.enabled]

    def hourly(o: Offer) -> float | None:
        return o.price.cheapest_spot if spot else o.price.on_demand

    pool = [o for o in pool if hourly(o) is not None]
    if not pool:
        return None, None
    choice = min(pool, key=lambda o: (hourly(o), o.cloud, o.region))
    return choice, hourly(choice)


def _seed(
    recipe: Recipe,
    regions: list[offers.RegionPrice],
    option: Callable[..., GpuOption],
    priced: Callable[..., list[Offer]],
) -> dict:
    """The seed's figure, and this recipe priced at the seed's settings (SEED_GPU, unpacked
    rows) on the same catalog, so a reader can see what packing, prices and hardware change."""
    usd = seed_figure(recipe.model.params_b)
    empty = dict.fromkeys(SEED_KEYS)
    out = {"usd": usd, "source": SEED_SOURCE, "at_seed_settings": empty, "packed_same_gpu": empty}
    if usd is None or not any(p.gpu == SEED_GPU for p in regions):
        return out

    def cheapest(offers_: list[Offer]) -> dict:
        if not offers_:
            return empty
        spot = min(
            (o for o in offers_ if o.spot_usd is not None), key=lambda o: o.spot_usd, default=None
        )
        od = min(
            (o for o in offers_ if o.on_demand_usd is not None),
            key=lambda o: o.on_demand_usd,
            default=None,
        )
        return {
            "gpu": SEED_GPU,
            "packing": None,
            "tokens_per_gpu_second": None,
            "spot_usd": spot.spot_usd if spot else None,
            "spot_where": f"{spot.cloud} {spot.region}" if spot else None,
            "on_demand_usd": od.on_demand_usd if od else None,
            "on_demand_where": f"{od.cloud} {od.region}" if od else None,
        }

    unpacked = option(SEED_GPU, packing=False)
    at = cheapest(priced(unpacked, packing=False, pool=regions))
    out["at_seed_settings"] = at | {
        "packing": False,
        "tokens_per_gpu_second": round(unpacked.throughput.per_gpu, 1),
    }
    if recipe.train.packing:
        packed = option(SEED_GPU)
        out["packed_same_gpu"] = cheapest(priced(packed, pool=regions)) | {
            "packing": True,
            "tokens_per_gpu_second": round(packed.throughput.per_gpu, 1),
        }
    return out
