"""The cost plan of a training run, from SkyPilot's own catalog and optimizer, in-process.

Duration comes from the recipe: tokens per epoch x epochs, at a training throughput per GPU
that is either measured (`plan.tokens_per_gpu_second`) or derived from an assumed MFU of the
accelerator's peak dense bf16 FLOPs at ~6 FLOPs per parameter per token (8 with activation
recomputation). The plan says which one it used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vicuna_sky.launch.tasks import one_line
from vicuna_sky.recipe import Recipe

if TYPE_CHECKING:
    import sky

# Peak dense bf16/fp16 tensor FLOP/s per GPU, from the vendors' data sheets.
PEAK_FLOPS = {
    "A100": 312e12,
    "A100-80GB": 312e12,
    "H100": 989e12,
    "H200": 989e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 70e12,
    "A10": 125e12,
    "V100": 125e12,
    "T4": 65e12,
}


@dataclass(frozen=True)
class Candidate:
    cloud: str
    region: str
    instance_type: str
    hourly_usd: float
    """Price of one node per hour."""


@dataclass
class CostPlan:
    recipe: str
    accelerator: str
    nodes: int
    gpus_per_node: int
    tokens: float
    """Tokens processed in the whole run (tokens per epoch x epochs)."""
    tokens_per_gpu_second: float
    throughput_basis: str
    """'measured ...' or 'assumed ...': where the throughput figure came from."""
    spot: list[Candidate] = field(default_factory=list)
    on_demand: list[Candidate] = field(default_factory=list)
    optimizer_choice: str = ""
    optimizer_note: str = ""
    budget_usd: float | None = None

    @property
    def gpu_hours(self) -> float:
        return self.tokens / self.tokens_per_gpu_second / 3600

    @property
    def hours(self) -> float:
        return self.gpu_hours / (self.nodes * self.gpus_per_node)

    def cost(self, candidate: Candidate) -> float:
        return candidate.hourly_usd * self.nodes * self.hours

    @property
    def cheapest(self) -> Candidate | None:
        pool = self.spot or self.on_demand
        return min(pool, key=lambda c: c.hourly_usd) if pool else None

    @property
    def over_budget(self) -> bool:
        best = self.cheapest
        return bool(self.budget_usd and best and self.cost(best) > self.budget_usd)


def throughput(recipe: Recipe) -> tuple[float, str]:
    """Training tokens/s per GPU and a sentence on where it came from."""
    measured = recipe.plan.tokens_per_gpu_second
    if measured > 0:
        return measured, f"measured: {measured:,.0f} tokens/s per GPU (recipe plan section)"
    acc = recipe.resources.accelerator or ""
    peak = PEAK_FLOPS.get(acc)
    if peak is None:
        raise ValueError(
            f"no peak FLOPs known for '{acc}'; set plan.tokens_per_gpu_second in the recipe"
        )
    flops_per_token = (8 if recipe.train.gradient_checkpointing else 6) * recipe.model.params_b
    rate = recipe.plan.mfu * peak / (flops_per_token * 1e9)
    basis = (
        f"assumed: {recipe.plan.mfu:.0%} MFU of {acc} peak {peak / 1e12:.0f} TFLOP/s at "
        f"{flops_per_token:.0f} GFLOP/token = {rate:,.0f} tokens/s per GPU"
    )
    return rate, basis


def make_plan(recipe: Recipe, top: int = 5) -> CostPlan:
    """Cheapest spot and on-demand candidates from the catalog, and the optimizer's pick."""
    r = recipe.resources
    if not r.accelerator:
        raise ValueError(f"{recipe.source}: the cost plan is for GPU recipes (no accelerator)")
    rate, basis = throughput(recipe)
    plan = CostPlan(
        recipe=recipe.name,
        accelerator=r.accelerator,
        nodes=r.nodes,
        gpus_per_node=r.gpus_per_node,
        tokens=recipe.data.tokens * recipe.train.epochs,
        tokens_per_gpu_second=rate,
        throughput_basis=basis,
        budget_usd=recipe.budget_usd,
    )
    plan.spot, plan.on_demand = catalog_candidates(recipe, top)
    plan.optimizer_choice, plan.optimizer_note = optimizer_choice(recipe, plan.hours)
    return plan


def catalog_candidates(recipe: Recipe, top: int) -> tuple[list[Candidate], list[Candidate]]:
    from sky import catalog

    r = recipe.resources
    allowed_regions = {infra.partition("/")[2] for infra in r.regions}
    try:
        offers = catalog.list_accelerators(
            gpus_only=True,
            name_filter=f"^{r.accelerator}$",
            clouds=r.clouds or None,
            quantity_filter=r.gpus_per_node,
            case_sensitive=False,
            all_regions=True,
        )
    except Exception as e:  # first use downloads the catalog; offline that fails
        raise ValueError(f"cannot read SkyPilot's catalog: {one_line(e)}") from None
    spot: dict[tuple[str, str, str], Candidate] = {}
    on_demand: dict[tuple[str, str, str], Candidate] = {}
    for infos in offers.values():
        for info in infos:
            if allowed_regions and info.region not in allowed_regions:
                continue
            key = (str(info.cloud), info.region, info.instance_type)
            for price, table in ((info.spot_price, spot), (info.price, on_demand)):
                if price is None or math.isnan(price) or price <= 0:
                    continue
                cand = Candidate(str(info.cloud), info.region, info.instance_type, float(price))
                if key not in table or cand.hourly_usd < table[key].hourly_usd:
                    table[key] = cand

    def cheapest(table: dict[tuple[str, str, str], Candidate]) -> list[Candidate]:
        return sorted(table.values(), key=lambda c: (c.hourly_usd, c.cloud, c.region))[:top]

    return cheapest(spot), cheapest(on_demand)


def optimizer_choice(recipe: Recipe, hours: float) -> tuple[str, str]:
    """Ask SkyPilot's optimizer (in-process, no API server) what it would launch."""
    import sky
    from sky import optimizer, sky_logging
    from vicuna_sky.launch.tasks import Spec, resources_config

    r = recipe.resources
    base: dict = {"job_recovery": {"strategy": "EAGER_NEXT_REGION"}}
    task = sky.Task(name=f"{recipe.name}-plan", run="true", num_nodes=r.nodes)
    task.set_resources(sky.Resources.from_yaml_config(resources_config(Spec.TRAIN, recipe, base)))
    task.set_time_estimator(lambda _res: hours * 3600)
    try:
        with sky.Dag() as dag:
            dag.add(task)
        with sky_logging.silent():
            optimizer.Optimizer.optimize(dag, quiet=True)
        best: sky.Resources = dag.tasks[0].best_resources
    except Exception as e:  # NoCloudAccessError, ResourcesUnavailableError, ...
        return "", f"SkyPilot optimizer: {one_line(e)}"
    where = f"{best.cloud}/{best.region}" + (f" ({best.zone})" if best.zone else "")
    kind = "spot" if best.use_spot else "on-demand"
    cost = best.get_cost(hours * 3600) * r.nodes
    return f"{where} {best.instance_type} {kind}, ~${cost:,.0f} for the run", ""


def render(plan: CostPlan) -> list[object]:
    """Rich renderables: the duration estimate and the candidate tables."""
    from rich.table import Table
    from rich.text import Text

    lines = [
        Text(
            f"{plan.recipe}: {plan.nodes} x {plan.gpus_per_node} {plan.accelerator}, "
            f"{plan.tokens / 1e6:,.0f}M tokens -> {plan.gpu_hours:,.0f} GPU-hours, "
            f"~{plan.hours:,.1f} h wall clock"
        ),
        Text(f"throughput {plan.throughput_basis}", style="dim"),
    ]
    for title, cands in (("spot", plan.spot), ("on-demand", plan.on_demand)):
        table = Table(title=f"cheapest {title}", title_justify="left")
        for col in ("cloud", "region", "instance", "$/h per node", "est. $ for run"):
            table.add_column(col, justify="right" if "$" in col else "left")
        for c in cands:
            table.add_row(
                c.cloud, c.region, c.instance_type, f"{c.hourly_usd:,.2f}", f"{plan.cost(c):,.0f}"
            )
        if not cands:
            table.add_row("-", "no offer in the catalog", "", "", "")
        lines.append(table)
    if plan.optimizer_choice:
        lines.append(Text(f"SkyPilot optimizer picks: {plan.optimizer_choice}"))
    if plan.optimizer_note:
        lines.append(Text(plan.optimizer_note, style="yellow"))
    best = plan.cheapest
    if plan.budget_usd and best:
        verdict = "OVER BUDGET" if plan.over_budget else "within budget"
        style = "bold red" if plan.over_budget else "green"
        lines.append(
            Text(
                f"budget ${plan.budget_usd:,.0f}: cheapest ${plan.cost(best):,.0f} -> {verdict}",
                style=style,
            )
        )
    return lines
