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
from pathlib import Path

from vicuna_sky.plan import catalog, egress, hardware, memory, offers
from vicuna_sky.plan.checkpoint import checkpointing
from vicuna_sky.plan.clouds import enabled_clouds
from vicuna_sky.plan.errors import PlanError
from vicuna_sky.plan.result import GpuOption, Offer, Plan
from vicuna_sky.plan.spot import SpotRun, base_model_seconds, preemption_rate, relaunch_minutes
from vicuna_sky.plan.throughput import throughput
from vicuna_sky.plan.tokens import token_count
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
