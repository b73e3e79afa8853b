"""The cost plan of a training run, from SkyPilot's own catalog and optimizer, in-process.

Every figure says where it came from:
- tokens: the data's stats file (`vicuna-sky data stats --write`), or counted when the data and
  the tokenizer are on this machine; the recipe's `data.tokens` only as a labelled estimate;
- throughput: the recipe's measured `plan.tokens_per_gpu_second`, else the packaged benchmark
  table (assets/train_throughput.json): the same GPU and packing mode scaled to this model by
  FLOPs per token (6 x params), or another GPU's measured MFU applied to this GPU's peak; the
  recipe's `plan.mfu` only where nothing of the kind was measured;
- checkpoints: their size (params x `plan.checkpoint_bytes_per_param`), the node's write and
  bucket bandwidth and each offer's preemption rate give Young/Daly's interval, in steps;
- cost: each spot offer's expected billed time (`cost.SpotRun`: checkpoints, lost work,
  relaunches) x its price, ranked by that, against the same tokens on demand.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from vicuna_sky.launch.cost import SpotRun, young_daly
from vicuna_sky.launch.tasks import one_line
from vicuna_sky.recipe import Recipe
from vicuna_sky.spot import NOTICE_WINDOW_SECONDS

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


SEED_FIGURES = {7.0: 140.0, 13.0: 300.0}
"""The seed's cost of a Vicuna run by model size (billions of parameters -> USD): "training the
7B model from $500 to around $140 and the 13B model from around $1K to $300" with SkyPilot
managed spot on 8 x A100 (the Vicuna blog, lmsys.org, 2023-03-30)."""
SEED_SOURCE = "Vicuna blog (2023-03-30), SkyPilot managed spot, 8 x A100"

BENCHMARKS = "train_throughput.json"
"""The packaged table of measured training throughput (vicuna_sky/assets)."""


@dataclass(frozen=True)
class TokenCount:
    per_epoch: int
    sequences: int
    """Sequences per epoch as the trainer batches them (packs with packing); 0 = unknown."""
    measured: bool
    basis: str


def _measured(stats: object, packing: bool, where: str) -> TokenCount:
    """A count from the data's own stats (a stats file, or the data counted here)."""
    return TokenCount(
        stats.tokens,
        stats.packs if packing else stats.samples,
        True,
        f"measured: {stats.tokens:,} tokens in {stats.samples:,} samples {where}",
    )


@dataclass(frozen=True)
class Throughput:
    per_gpu: float
    """Training tokens per second per GPU."""
    source: str
    """recipe, measured, measured-mfu or assumed-mfu."""
    basis: str


@dataclass(frozen=True)
class Checkpointing:
    size_bytes: float
    write_seconds: float
    """Writing it to the nodes' disks (shards in parallel)."""
    upload_seconds: float
    """The background upload to the bucket, until it is committed."""
    download_seconds: float
    stall_seconds: float
    """C: how long training waits for a periodic checkpoint. One node: the trainer's DCP
    `async_save` holds training only while the state is copied to host memory, and writes in the
    background; several nodes save synchronously (their commit is a collective): the write."""
    step_seconds: float
    tokens_per_step: float
    steps_basis: str
    total_steps: int

    @property
    def emergency_seconds(self) -> float:
        """On a notice: finish the step, write, upload (the checkpoint counts once committed)."""
        return self.step_seconds + self.write_seconds + self.upload_seconds

    @property
    def commit_seconds(self) -> float:
        """U: from the periodic save to its commit in the bucket (what a preemption can lose on
        top of the interval): the background write, if any, then the upload."""
        background = self.write_seconds if self.stall_seconds < self.write_seconds else 0.0
        return background + self.upload_seconds

    def steps(self, interval_seconds: float) -> int:
        if interval_seconds == math.inf:
            return self.total_steps  # no preemption expected: only the final checkpoint
        return max(1, min(self.total_steps, round(interval_seconds / self.step_seconds)))


@dataclass(frozen=True)
class Offer:
    """A spot offer with its expected run (at its own Young/Daly interval)."""

    cloud: str
    region: str
    instance_type: str
    spot_hourly: float
    on_demand_hourly: float
    """The same instance type on demand (the cheapest on-demand offer when it has none)."""
    preemptions_per_hour: float
    every_steps: int
    run: SpotRun
    nodes: int

    @property
    def expected_usd(self) -> float:
        return self.run.cost(self.spot_hourly, self.nodes)

    @property
    def on_demand_usd(self) -> float:
        return self.run.on_demand_cost(self.on_demand_hourly, self.nodes)

    @property
    def list_usd(self) -> float:
        """List price x training hours: what a plan that ignores preemptions would say."""
        return self.run.work_seconds / 3600 * self.spot_hourly * self.nodes


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
    token_count: TokenCount | None = None
    throughput: Throughput | None = None
    checkpointing: Checkpointing | None = None
    offers: list[Offer] = field(default_factory=list)
    """Spot offers ranked by expected cost (not list price)."""
    recipe_every_steps: int = 0
    recipe_interval_run: SpotRun | None = None
    """The best offer's run at the recipe's checkpoint_every_steps, for comparison."""
    seed_usd: float | None = None

    @property
    def gpu_hours(self) -> float:
        return self.tokens / self.tokens_per_gpu_second / 3600

    @property
    def hours(self) -> float:
        return self.gpu_hours / (self.nodes * self.gpus_per_node)

    def cost(self, candidate: Candidate) -> float:
        """List price x training hours (no checkpoint, no preemption)."""
        return candidate.hourly_usd * self.nodes * self.hours

    def on_demand_cost(self, candidate: Candidate) -> float:
        """The run on demand: training + the best offer's periodic checkpoints (no preemption)."""
        if self.best is None:
            return self.cost(candidate)
        return self.best.run.on_demand_cost(candidate.hourly_usd, self.nodes)

    @property
    def best(self) -> Offer | None:
        return self.offers[0] if self.offers else None

    @property
    def cheapest(self) -> Candidate | None:
        pool = self.spot or self.on_demand
        return min(pool, key=lambda c: c.hourly_usd) if pool else None

    @property
    def expected_usd(self) -> float | None:
        """The best offer's expected spot cost; on demand when the catalog has no spot offer."""
        if self.best:
            return self.best.expected_usd
        best = self.cheapest
        return self.cost(best) if best else None

    @property
    def over_budget(self) -> bool:
        usd = self.expected_usd
        return bool(self.budget_usd and usd is not None and usd > self.budget_usd)

    def emergency(self) -> dict[str, dict]:
        """Per cloud with a notice: does an emergency checkpoint commit within the window."""
        ck = self.checkpointing
        out = {}
        for cloud in ("aws", "gcp"):
            window = NOTICE_WINDOW_SECONDS[cloud]
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
        tc, tp, ck, best = self.token_count, self.throughput, self.checkpointing, self.best
        out: dict = {
            "recipe": self.recipe,
            "accelerator": self.accelerator,
            "nodes": self.nodes,
            "gpus_per_node": self.gpus_per_node,
            "tokens": {
                "per_epoch": tc.per_epoch,
                "total": self.tokens,
                "sequences_per_epoch": tc.sequences,
                "source": "measured" if tc.measured else "estimate",
                "basis": tc.basis,
            },
            "tokens_per_gpu_second": {
                "value": round(tp.per_gpu, 1),
                "source": tp.source,
                "basis": tp.basis,
            },
            "hours": {"training": self.hours, "gpu_hours": self.gpu_hours},
            "checkpoint": {
                "size_gb": ck.size_bytes / 1e9,
                "stall_seconds": ck.stall_seconds,
                "write_seconds": ck.write_seconds,
                "upload_seconds": ck.upload_seconds,
                "commit_seconds": ck.commit_seconds,
                "step_seconds": ck.step_seconds,
                "tokens_per_step": ck.tokens_per_step,
                "total_steps": ck.total_steps,
                "steps_basis": ck.steps_basis,
                "every_steps": best.every_steps if best else None,
                "recipe_every_steps": self.recipe_every_steps,
                "rule": "Young/Daly: interval = sqrt(2 x stall seconds x mean seconds between "
                "preemptions) for the best offer's preemption rate, at least commit seconds",
            },
            "emergency_checkpoint": self.emergency(),
            "offers": [_offer_dict(o, self.tokens) for o in self.offers],
            "on_demand": [vars(c) | {"usd": self.on_demand_cost(c)} for c in self.on_demand],
            "optimizer": {"choice": self.optimizer_choice, "note": self.optimizer_note},
            "seed": {"usd": self.seed_usd, "source": SEED_SOURCE},
            "budget_usd": self.budget_usd,
            "over_budget": self.over_budget,
        }
        if best:
            run = best.run
            out["checkpoint"]["interval_minutes"] = run.interval_seconds / 60
            out["checkpoint"]["expected_overhead"] = _overhead_dict(run)
            if self.recipe_interval_run:
                out["checkpoint"]["recipe_interval_overhead"] = _overhead_dict(
                    self.recipe_interval_run
                )
                out["checkpoint"]["recipe_interval_spot_usd"] = self.recipe_interval_run.cost(
                    best.spot_hourly, self.nodes
                )
            out["expected_spot_usd"] = best.expected_usd
            out["on_demand_usd"] = best.on_demand_usd
            out["usd_per_million_tokens"] = best.expected_usd / (self.tokens / 1e6)
            out["billed_hours"] = run.billed_seconds / 3600
        return out


def _overhead_dict(run: SpotRun) -> dict:
    return {
        "fraction": run.overhead_seconds / run.work_seconds,
        "checkpoint_hours": run.checkpoints_seconds / 3600,
        "expected_preemptions": run.preemptions,
        "lost_hours_per_preemption": run.lost_seconds / 3600,
        "relaunch_hours_per_preemption": run.relaunch_seconds / 3600,
    }


def _offer_dict(o: Offer, tokens: float) -> dict:
    return {
        "cloud": o.cloud,
        "region": o.region,
        "instance_type": o.instance_type,
        "spot_hourly": o.spot_hourly,
        "on_demand_hourly": o.on_demand_hourly,
        "preemptions_per_hour": o.preemptions_per_hour,
        "emergency_checkpoint_fits": o.run.emergency_fits,
        "checkpoint_every_steps": o.every_steps,
        "expected_preemptions": o.run.preemptions,
        "billed_hours": o.run.billed_seconds / 3600,
        "list_price_usd": o.list_usd,
        "expected_spot_usd": o.expected_usd,
        "on_demand_usd": o.on_demand_usd,
        "usd_per_million_tokens": o.expected_usd / (tokens / 1e6),
        "on_demand_usd_per_million_tokens": o.on_demand_usd / (tokens / 1e6),
    }


def token_count(recipe: Recipe) -> TokenCount:
    """Tokens per epoch: the data's stats file, else counted when data and tokenizer are here,
    else the recipe's `data.tokens` as an estimate."""
    from vicuna_sky.data import pipeline
    from vicuna_sky.errors import VicunaSkyError

    packing, max_length = recipe.train.packing, recipe.data.max_length
    notes = []
    data = _local_data(recipe)
    explicit = recipe.plan.data_stats
    candidates = [_near_recipe(recipe, explicit)] if explicit else []
    if data and not explicit:
        candidates.append(pipeline.stats_path(data))
    for path in candidates:
        if not path.exists():
            if explicit:
                raise ValueError(f"{recipe.source}: plan.data_stats {explicit} does not exist")
            continue
        stats = pipeline.read_stats(path)
        if stats.max_length != max_length:
            notes.append(f"{path} counts at max length {stats.max_length}, not {max_length}")
            continue
        if data and stats.data_bytes and data.stat().st_size != stats.data_bytes:
            notes.append(f"{path} is older than {data} (its size changed)")
            continue
        where = f"({stats.tokenizer}, {stats.template}, max length {max_length}) from {path}"
        return _measured(stats, packing, where)
    if data and Path(recipe.model.path).is_dir():
        try:
            stats = pipeline.stats_file(data, recipe.model.path, recipe.model.template, max_length)
        except VicunaSkyError as e:
            notes.append(f"counting {data} failed: {e}")
        else:
            return _measured(stats, packing, f"counted in {data}")
    if recipe.data.tokens <= 0:
        raise ValueError(
            f"{recipe.source}: no token count: run `vicuna-sky data stats DATA --tokenizer "
            "MODEL --write` (or set plan.data_stats, or data.tokens as an estimate)"
        )
    why = "; ".join(notes) or "no stats file beside the data (`vicuna-sky data stats --write`)"
    return TokenCount(
        recipe.data.tokens,
        0,
        False,
        f"estimate: data.tokens of the recipe ({why})",
    )


def _near_recipe(recipe: Recipe, path: str) -> Path:
    """A path as written, else relative to the recipe's directory."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    near = Path(recipe.source).parent / p
    return near if near.exists() else p


def _local_data(recipe: Recipe) -> Path | None:
    """The training data on this machine: an absolute path, a file:// bucket's file, or the
    bucket-relative path under this directory or the recipe's (where `data split` wrote it)."""
    rel = Path(recipe.data.path)
    places = [rel] if rel.is_absolute() else []
    if recipe.bucket.startswith("file://") and not rel.is_absolute():
        places.append(Path(recipe.bucket.removeprefix("file://")) / rel)
    if not rel.is_absolute():
        places += [rel, Path(recipe.source).parent / rel]
    return next((p for p in places if p.is_file()), None)


def load_benchmarks() -> list[dict]:
    text = resources.files("vicuna_sky.assets").joinpath(BENCHMARKS).read_text()
    return json.loads(text)["rows"]


def throughput(recipe: Recipe, rows: list[dict] | None = None) -> Throughput:
    """Training tokens/s per GPU and where it came from (see the module docstring)."""
    measured = recipe.plan.tokens_per_gpu_second
    if measured > 0:
        return Throughput(
            measured,
            "recipe",
            f"measured: {measured:,.0f} tokens/s per GPU (the recipe's plan.tokens_per_gpu_second)",
        )
    acc = recipe.resources.accelerator or ""
    params = recipe.model.params_b * 1e9
    flops_per_token = 6 * params
    packing, ac = recipe.train.packing, recipe.train.gradient_checkpointing
    kind = [
        r
        for r in (load_benchmarks() if rows is None else rows)
        if r["packing"] == packing and r["activation_checkpointing"] == ac
    ]
    mode = f"{'packed' if packing else 'unpacked'}{', activation checkpointing' if ac else ''}"

    def nearest(pool: list[dict]) -> dict:
        return min(pool, key=lambda r: abs(math.log(r["params"] / params)))

    same = [r for r in kind if r["gpu"].lower() == acc.lower()]
    if same:
        row = nearest(same)
        rate = row["tokens_per_second"] * row["params"] / params
        return Throughput(
            rate,
            "measured",
            (
                f"measured on {row['gpu']}: {row['tokens_per_second']:,.0f} tokens/s for "
                f"{row['model']} ({row['params'] / 1e9:.2f}B, {mode}, length {row['seq_len']}, "
                f"{row['software'].split(',')[0]}; {row['source']}), scaled by FLOPs per token to "
                f"{recipe.model.params_b:g}B = {rate:,.0f} tokens/s per GPU"
            ),
        )
    peak = PEAK_FLOPS.get(acc)
    if peak is None:
        raise ValueError(
            f"no peak FLOPs known for '{acc}'; set plan.tokens_per_gpu_second in the recipe"
        )
    other = [r for r in kind if r["gpu"] in PEAK_FLOPS]
    if other:
        row = nearest(other)
        mfu = 6 * row["params"] * row["tokens_per_second"] / PEAK_FLOPS[row["gpu"]]
        rate = mfu * peak / flops_per_token
        return Throughput(
            rate,
            "measured-mfu",
            (
                f"measured MFU {mfu:.1%} on {row['gpu']} ({row['model']}, {mode}; {row['source']}) "
                f"applied to {acc}'s peak {peak / 1e12:.0f} TFLOP/s at {flops_per_token / 1e9:.0f} "
                f"GFLOP/token = {rate:,.0f} tokens/s per GPU (nothing measured on {acc})"
            ),
        )
    rate = recipe.plan.mfu * peak / flops_per_token
    return Throughput(
        rate,
        "assumed-mfu",
        (
            f"assumed: {recipe.plan.mfu:.0%} MFU (plan.mfu; nothing measured {mode}) of {acc} peak "
            f"{peak / 1e12:.0f} TFLOP/s at {flops_per_token / 1e9:.0f} GFLOP/token = "
            f"{rate:,.0f} tokens/s per GPU"
        ),
    )


def preemption_rate(recipe: Recipe, cloud: str, region: str) -> float:
    """The offer's preemptions per hour: 'cloud/region', then 'cloud', then the default."""
    rates = {k.lower(): v for k, v in recipe.plan.preemption_rates.items()}
    for key in (f"{cloud}/{region}".lower(), cloud.lower()):
        if key in rates:
            return rates[key]
    return recipe.plan.preemptions_per_hour


def checkpointing(recipe: Recipe, tokens: TokenCount, per_gpu: float) -> Checkpointing:
    """What a checkpoint costs in time, and how long an optimizer step takes."""
    r, p, t = recipe.resources, recipe.plan, recipe.train
    size = recipe.model.params_b * 1e9 * p.checkpoint_bytes_per_param
    if tokens.sequences:
        steps_per_epoch = max(1, tokens.sequences // t.global_batch_size)
        tokens_per_step = tokens.per_epoch / steps_per_epoch
        basis = f"{tokens.sequences:,} sequences per epoch / global batch {t.global_batch_size}"
    else:  # no stats: assume full sequences (packed rows are nearly full; unpacked, an upper bound)
        tokens_per_step = t.global_batch_size * recipe.data.max_length
        steps_per_epoch = max(1, round(tokens.per_epoch / tokens_per_step))
        basis = (
            f"estimate: global batch {t.global_batch_size} x max length {recipe.data.max_length} "
            "tokens per step"
        )
    gpus = r.nodes * r.gpus_per_node
    return Checkpointing(
        size_bytes=size,
        # FSDP shards the state: every node writes and uploads its own share in parallel.
        write_seconds=size / (r.nodes * p.write_gb_per_second * 1e9),
        upload_seconds=size / (r.nodes * p.upload_gb_per_second * 1e9),
        download_seconds=size / (r.nodes * p.upload_gb_per_second * 1e9),
        stall_seconds=size / (p.stage_gb_per_second * 1e9)
        if r.nodes == 1
        else size / (r.nodes * p.write_gb_per_second * 1e9),
        step_seconds=tokens_per_step / (per_gpu * gpus),
        tokens_per_step=tokens_per_step,
        steps_basis=basis,
        total_steps=max(1, math.ceil(steps_per_epoch * t.epochs)),
    )


def spot_run(
    recipe: Recipe,
    work_seconds: float,
    ck: Checkpointing,
    rate: float,
    cloud: str,
    every_steps: int | None = None,
) -> tuple[SpotRun, int]:
    """The expected run on one offer: at Young/Daly's interval, or at `every_steps`."""
    mtbp = 3600 / rate if rate > 0 else math.inf
    # Never shorter than a checkpoint takes to commit: one save is in flight at a time, and
    # checkpoints made faster than they reach the bucket only queue up.
    steps = every_steps or ck.steps(max(young_daly(ck.stall_seconds, mtbp), ck.commit_seconds))
    run = SpotRun(
        work_seconds=work_seconds,
        interval_seconds=steps * ck.step_seconds,
        checkpoint_seconds=ck.stall_seconds,
        commit_lag_seconds=ck.commit_seconds,
        relaunch_seconds=recipe.plan.relaunch_minutes * 60 + ck.download_seconds,
        preemptions_per_hour=rate,
        notice_seconds=NOTICE_WINDOW_SECONDS.get(cloud.lower(), 0.0),
        emergency_seconds=ck.emergency_seconds,
    )
    return run, steps


def make_plan(recipe: Recipe, top: int = 5) -> CostPlan:
    """Spot offers ranked by expected cost, the on-demand alternative, and the optimizer's pick."""
    r = recipe.resources
    if not r.accelerator:
        raise ValueError(f"{recipe.source}: the cost plan is for GPU recipes (no accelerator)")
    tokens = token_count(recipe)
    tp = throughput(recipe)
    plan = CostPlan(
        recipe=recipe.name,
        accelerator=r.accelerator,
        nodes=r.nodes,
        gpus_per_node=r.gpus_per_node,
        tokens=tokens.per_epoch * recipe.train.epochs,
        tokens_per_gpu_second=tp.per_gpu,
        throughput_basis=tp.basis,
        budget_usd=recipe.budget_usd,
        token_count=tokens,
        throughput=tp,
        recipe_every_steps=recipe.train.checkpoint_every_steps,
        seed_usd=seed_figure(recipe.model.params_b),
    )
    ck = plan.checkpointing = checkpointing(recipe, tokens, tp.per_gpu)
    work = plan.hours * 3600
    # Rank every spot offer the catalog has, not only the `top` cheapest by list price: a
    # cheap offer that is preempted often can cost more than a dearer one.
    spot, on_demand = catalog_candidates(recipe, top=10_000)
    plan.spot, plan.on_demand = spot[:top], on_demand[:top]
    for c in spot:
        same = [o for o in on_demand if o.instance_type == c.instance_type] or on_demand
        rate = preemption_rate(recipe, c.cloud, c.region)
        run, steps = spot_run(recipe, work, ck, rate, c.cloud)
        od = min((o.hourly_usd for o in same), default=math.nan)
        plan.offers.append(
            Offer(c.cloud, c.region, c.instance_type, c.hourly_usd, od, rate, steps, run, r.nodes)
        )
    plan.offers.sort(key=lambda o: (o.expected_usd, o.cloud, o.region))
    plan.offers = plan.offers[:top]
    if plan.best:
        b = plan.best
        plan.recipe_interval_run, _ = spot_run(
            recipe, work, ck, b.preemptions_per_hour, b.cloud, recipe.train.checkpoint_every_steps
        )
    plan.optimizer_choice, plan.optimizer_note = optimizer_choice(recipe, plan.hours)
    return plan


def seed_figure(params_b: float) -> float | None:
    """The seed's $ for a model of about this size (within 25 %), else None."""
    size = min(SEED_FIGURES, key=lambda b: abs(math.log(params_b / b)))
    return SEED_FIGURES[size] if abs(params_b / size - 1) <= 0.25 else None


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


def _hm(seconds: float) -> str:
    if seconds == math.inf:
        return "never"
    return f"{seconds / 3600:,.1f} h" if seconds >= 3600 else f"{seconds / 60:,.1f} min"


def render(plan: CostPlan) -> list[object]:
    """Rich renderables: tokens, throughput, checkpoints, and offers ranked by expected cost."""
    from rich.table import Table
    from rich.text import Text

    tc, tp, ck, best = plan.token_count, plan.throughput, plan.checkpointing, plan.best
    lines: list[object] = [
        Text(
            f"{plan.recipe}: {plan.nodes} x {plan.gpus_per_node} {plan.accelerator}, "
            f"{plan.tokens / 1e6:,.0f}M tokens -> {plan.gpu_hours:,.0f} GPU-hours, "
            f"~{plan.hours:,.1f} h of training"
        ),
        Text(f"tokens {tc.basis}", style="dim"),
        Text(f"throughput ({tp.source}) {tp.basis}", style="dim"),
        Text(
            f"checkpoint {ck.size_bytes / 1e9:,.1f} GB: training waits {ck.stall_seconds:,.0f} s, "
            f"committed {ck.commit_seconds:,.0f} s later (written {ck.write_seconds:,.0f} s, "
            f"uploaded {ck.upload_seconds:,.0f} s); a step takes {ck.step_seconds:,.1f} s "
            f"({ck.total_steps:,} steps; {ck.steps_basis})",
            style="dim",
        ),
    ]
    for cloud, e in plan.emergency().items():
        verdict = "fits" if e["fits"] else "does NOT fit"
        lines.append(
            Text(
                f"emergency checkpoint on {cloud}: needs ~{e['needs_seconds']:,.0f} s, the notice "
                f"gives {e['window_seconds']:.0f} s -> {verdict}: {e['then']}",
                style="green" if e["fits"] else "yellow",
            )
        )
    if best:
        run = best.run
        lines.append(
            Text(
                f"checkpoint every {best.every_steps} steps ({_hm(run.interval_seconds)}; "
                f"Young/Daly at {best.preemptions_per_hour:g} preemptions/h on "
                f"{best.cloud} {best.region}): expected overhead "
                f"{run.overhead_seconds / run.work_seconds:.1%} "
                f"({run.preemptions:.2f} preemptions, {_hm(run.checkpoints_seconds)} of "
                f"checkpoints); the recipe's {plan.recipe_every_steps} steps: "
                + (
                    f"{plan.recipe_interval_run.overhead_seconds / run.work_seconds:.1%}"
                    if plan.recipe_interval_run
                    else "-"
                )
            )
        )
    table = Table(title="cheapest spot offers by expected cost", title_justify="left")
    cols = ("cloud", "region", "instance", "$/h spot", "preempt/h", "ckpt steps", "billed h")
    cols += ("list $", "expected $", "$/M tokens", "on-demand $")
    for col in cols:
        table.add_column(col, justify="left" if col in cols[:3] else "right")
    for o in plan.offers:
        table.add_row(
            o.cloud,
            o.region,
            o.instance_type,
            f"{o.spot_hourly:,.2f}",
            f"{o.preemptions_per_hour:g}",
            str(o.every_steps),
            f"{o.run.billed_seconds / 3600:,.1f}",
            f"{o.list_usd:,.0f}",
            f"{o.expected_usd:,.0f}",
            f"{o.expected_usd / (plan.tokens / 1e6):,.3f}",
            f"{o.on_demand_usd:,.0f}",
        )
    if not plan.offers:
        table.add_row("-", "no spot offer in the catalog", *[""] * (len(cols) - 2))
    lines.append(table)
    od = Table(title="cheapest on-demand", title_justify="left")
    for col in ("cloud", "region", "instance", "$/h per node", "$ for run"):
        od.add_column(col, justify="right" if "$" in col else "left")
    for c in plan.on_demand:
        od.add_row(
            c.cloud,
            c.region,
            c.instance_type,
            f"{c.hourly_usd:,.2f}",
            f"{plan.on_demand_cost(c):,.0f}",
        )
    if not plan.on_demand:
        od.add_row("-", "no offer in the catalog", "", "", "")
    lines.append(od)
    if plan.seed_usd is not None:
        mine = f"${plan.expected_usd:,.0f} expected here" if plan.expected_usd else "no offer here"
        lines.append(Text(f"seed figure: ~${plan.seed_usd:,.0f} ({SEED_SOURCE}); {mine}"))
    if plan.optimizer_choice:
        lines.append(Text(f"SkyPilot optimizer picks: {plan.optimizer_choice}"))
    if plan.optimizer_note:
        lines.append(Text(plan.optimizer_note, style="yellow"))
    usd = plan.expected_usd
    if plan.budget_usd and usd is not None:
        verdict = "OVER BUDGET" if plan.over_budget else "within budget"
        style = "bold red" if plan.over_budget else "green"
        lines.append(
            Text(
                f"budget ${plan.budget_usd:,.0f}: best expected ${usd:,.0f} -> {verdict}",
                style=style,
            )
        )
    return lines
