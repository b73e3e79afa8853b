"""The Recipe: what a user edits (model, data, hyper-parameters, GPUs, bucket, budget).

A recipe YAML is loaded into frozen dataclasses, checked key by key and type by type, and
rendered to the environment variables the SkyPilot task specs in `sky/` declare. Every problem
is reported as one `RecipeError` line that names the key, so the CLI never shows a traceback.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

from vicuna_sky.recipe_yaml import RecipeError, build, load_mapping, one_of, yaml_number

BUCKET_SCHEMES = ("s3://", "gs://", "r2://", "cos://", "oci://", "https://", "file://")
PRECISIONS = ("bf16", "fp16", "fp32")
SCHEDULERS = ("cosine", "linear", "constant")
SERVE_BACKENDS = ("hf", "vllm", "echo")


@dataclass(frozen=True)
class ModelSection:
    path: str
    """Hub id or local path of the base model to fine-tune."""
    template: str = "vicuna_v1.1"
    """Conversation template used to render turns into one training string."""
    params_b: float = 7.0
    """Parameter count in billions; the cost plan derives FLOPs per token from it."""


@dataclass(frozen=True)
class DataSection:
    path: str
    """ShareGPT JSON to train on: a file here (uploaded by content at launch), else relative to
    the bucket root; `demo-sample` is the packaged sample, split for the recipe's model."""
    max_length: int = 2048
    """Context length in tokens; longer conversations are split to fit."""
    tokens: int = 0
    """Approximate tokens per epoch after cleaning and splitting (for the cost plan)."""
    eval_path: str = ""
    """Held-out ShareGPT JSON the trainer reports validation loss on (a file here is uploaded
    like data.path; else relative to the bucket root); empty = no validation loss."""
    eval_fraction: float = 0.0
    """Share of conversations `vicuna-sky data split --recipe` holds out (to data.eval_path)."""


@dataclass(frozen=True)
class TrainSection:
    epochs: float = 3.0
    """Passes over the data."""
    lr: float = 2e-5
    """Peak learning rate."""
    lr_scheduler: str = "cosine"
    """Decay after warm-up: cosine, linear or constant."""
    warmup_ratio: float = 0.03
    """Fraction of all optimizer steps spent warming up linearly."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    global_batch_size: int = 128
    """Sequences per optimizer step over all devices (gradient accumulation fills the gap)."""
    micro_batch_size: int = 2
    """Sequences per device per forward pass."""
    precision: str = "bf16"
    """Parameter/compute dtype on GPU: bf16, fp16 or fp32 (CPU always runs fp32)."""
    gradient_checkpointing: bool = True
    """Recompute activations per decoder layer to fit long contexts."""
    packing: bool = False
    """Pack several conversations into each sequence (attention kept per conversation)."""
    lora_r: int = 0
    """LoRA rank on the attention projections (merged into the export); 0 = full fine-tuning."""
    checkpoint_every_steps: int = 100
    """Optimizer steps between checkpoints; on spot this bounds the work a preemption loses."""
    eval_every_steps: int = 100
    """Optimizer steps between validation losses on data.eval_path (also before the first step
    and after the last); 0 = only before and after."""
    seed: int = 42
    """Seed for data order and initialisation."""


@dataclass(frozen=True)
class ResourcesSection:
    accelerator: str | None = "A100-80GB"
    """GPU type per node as SkyPilot names it; null runs on CPUs."""
    gpus_per_node: int = 8
    """GPUs per node (ignored when accelerator is null)."""
    accelerators: list[str] = field(default_factory=list)
    """GPU types the run may use, e.g. [A100-80GB:8, H100:8, A100:8] (each with gpus_per_node
    GPUs), or [any] for every type that fits; empty = the accelerator alone. The plan prices
    each, and the launch hands SkyPilot the ones that fit."""
    nodes: int = 1
    """Nodes in the cluster."""
    cpus: str | None = None
    """SkyPilot CPU request such as '4+' (CPU recipes)."""
    cpu_procs_per_node: int = 2
    """torchrun processes per node when the node has no GPU."""
    spot: bool = True
    """Use spot instances (managed jobs recover them on preemption)."""
    clouds: list[str] = field(default_factory=list)
    """Clouds allowed, cheapest first is the optimizer's job; empty = any enabled cloud."""
    regions: list[str] = field(default_factory=list)
    """Regions allowed, as SkyPilot infra strings 'cloud/region'; empty = any region."""
    max_restarts_on_errors: int = 3
    """Restarts of a training run after a crash (preemptions are always recovered; a failure a
    restart cannot fix, such as missing data, is never restarted). Eval and serving specs keep
    their own settings."""
    disk_size_gb: int = 512
    """Boot disk size per node."""


@dataclass(frozen=True)
class ServeSection:
    model_name: str = "vicuna"
    """Model name clients ask for in the OpenAI API."""
    model_path: str = ""
    """Weights to serve: hub id, local path, or relative to the bucket root; empty = the
    trained export of this recipe."""
    backend: str = "hf"
    """Worker backend: hf (transformers generate), vllm (GPU) or echo (tests)."""
    accelerator: str | None = "L4"
    """GPU type per worker; null serves on CPUs."""
    gpus_per_worker: int = 1
    """GPUs per worker replica."""
    workers: int = 2
    """Worker replicas to keep up."""
    spot: bool = True
    """Run workers on spot (SkyServe falls back to on-demand when spot is scarce)."""
    tls: str = ""
    """Key and certificate (one PEM file) for the OpenAI API and the chat UI, e.g. CA-signed for
    your domain; empty = one made for the fleet or service, whose fingerprint `serve` prints."""


@dataclass(frozen=True)
class EvalSection:
    bench: str = "vicuna_bench"
    """Question set: vicuna_bench, mt_bench (FastChat's files, fetched into the bucket once),
    demo (the small set that ships with vicuna-sky), or a question JSONL (path or bucket key)."""
    judge_model: str = "gpt-4"
    """Model that judges the answers (any OpenAI-compatible endpoint)."""
    judge_api_base: str = ""
    """Base URL of the judge's API; empty = the OpenAI default; `local` = the model under test
    judges (served on the eval VM; a smoke test, not an evaluation)."""
    baseline_model: str = "gpt-3.5-turbo"
    """Model answers are compared against in pairwise judging, and the 100 % of the report."""
    baseline_path: str = ""
    """Serve the baseline from this model path (or bucket key) on the eval VM; empty = ask the
    judge's API for the baseline's answers."""
    max_tokens: int = 1024
    """Most new tokens per answer turn."""
    judge_max_tokens: int = 2048
    """Most new tokens per judgment."""


@dataclass(frozen=True)
class PlanSection:
    mfu: float = 0.4
    """Assumed model FLOPs utilisation (6 x params FLOPs per token), used only where neither
    the recipe nor the packaged benchmark table (assets/train_throughput.json) has a measurement
    for this packing mode."""
    tokens_per_gpu_second: float = 0.0
    """Measured training throughput per GPU; 0 = the benchmark table, else mfu (the plan says)."""
    data_stats: str = ""
    """Stats file of the training data (`vicuna-sky data split` writes X.stats.json beside
    X.json; `data stats --write` too); empty = look beside data.path when it is local. Without
    one the plan uses data.tokens and labels it an estimate."""
    checkpoint_bytes_per_param: float = 12.0
    """Checkpoint size per parameter: fp32 weights + Adam's two moments = 12 (the trainer keeps
    fp32 master weights; a 1.1B model's DCP state measured 13 GB). 16 with a bf16 copy too."""
    write_gb_per_second: float = 0.4
    """Per node, GB/s at which a checkpoint is written to local disk (training waits for it):
    measured 17.2 GB (DCP + export) in 41 s on the H200 node of issue #14."""
    stage_gb_per_second: float = 10.0
    """Per node, GB/s at which a one-node run's periodic checkpoint is copied to host memory,
    the only time training waits for it (the trainer's DCP async_save writes in the background;
    several nodes save synchronously, at write_gb_per_second). An assumption: 8 GPUs at
    1.25 GB/s each, far below PCIe; benchmarks/train_gpu.py reports the measured stall."""
    upload_gb_per_second: float = 0.5
    """Per node, GB/s to and from the bucket (background upload; download on a relaunch):
    checkpoints_sync's 8 parallel transfers at ~85 MB/s each, AWS's per-connection S3 guidance,
    rounded down."""
    preemptions_per_hour: float = 0.1
    """Expected preemptions per node-hour of a spot offer (an assumption: no cloud publishes
    per-offer rates). Measure yours: recoveries / hours of `sky jobs queue`."""
    preemption_rates: dict[str, float] = field(default_factory=dict)
    """Per-offer overrides of preemptions_per_hour, keyed 'cloud' or 'cloud/region'
    (e.g. {gcp: 0.2, aws/us-east-1: 0.05}); the most specific key wins."""
    use_planned_interval: bool = True
    """`train` of a GPU recipe checkpoints every the plan's Young/Daly number of steps (for the
    best offer) instead of train.checkpoint_every_steps; `--env CHECKPOINT_EVERY_STEPS=N` wins,
    and without a plan (offline) the recipe's number stands."""
    relaunch_minutes: float | None = None
    """Minutes from a preemption to training again, before the checkpoint download (which the
    plan adds from its size); null = the planner's figure
    (vicuna_sky.plan.spot.RELAUNCH_MINUTES)."""


@dataclass(frozen=True)
class Recipe:
    name: str
    """Run name; also names the checkpoints prefix in the bucket."""
    model: ModelSection
    data: DataSection
    bucket: str
    """Bucket URL for data, checkpoints and exports (s3://, gs://, r2://, ... or file://)."""
    train: TrainSection = field(default_factory=TrainSection)
    resources: ResourcesSection = field(default_factory=ResourcesSection)
    serve: ServeSection = field(default_factory=ServeSection)
    eval: EvalSection = field(default_factory=EvalSection)
    plan: PlanSection = field(default_factory=PlanSection)
    budget_usd: float | None = None
    """Spending cap for the training run; the cost plan flags estimates above it."""
    source: str = field(default="<recipe>", compare=False)
    """Where the recipe was loaded from (not a YAML key)."""

    # ----------------------------------------------------------------- loading

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise RecipeError(f"cannot read recipe {path}: {e.strerror}") from None
        return cls.from_text(text, source=str(path))

    @classmethod
    def from_text(cls, text: str, source: str = "<recipe>") -> Recipe:
        recipe = build(cls, load_mapping(text, source), prefix="", source=source)
        recipe = dataclasses.replace(recipe, source=source)
        recipe.check()
        return recipe

    def path_of(self, value: str) -> Path:
        """A path the recipe names, relative to the recipe's own folder (not to wherever the
        launcher runs)."""
        path = Path(value).expanduser()
        if path.is_absolute() or self.source.startswith("<"):
            return path
        return Path(self.source).resolve().parent / path

    def check(self) -> None:
        """Cross-field checks that a type alone cannot express."""

        def fail(key: str, why: str) -> typing.NoReturn:
            raise RecipeError(f"{self.source}: '{key}' {why}")

        t, r = self.train, self.resources
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
            fail("name", "must be non-empty letters, digits, '-', '_' or '.'")
        if not self.bucket.startswith(BUCKET_SCHEMES):
            fail("bucket", f"must be a URL starting with one of {', '.join(BUCKET_SCHEMES)}")
        for key, value in (
            ("train.lr", t.lr),
            ("train.epochs", t.epochs),
            ("model.params_b", self.model.params_b),
        ):
            if value <= 0:
                fail(key, f"must be positive, got {value}")
        if t.lora_r < 0:
            fail("train.lora_r", f"must be 0 (full fine-tuning) or a positive rank, got {t.lora_r}")
        if not 0 <= t.warmup_ratio < 1:
            fail("train.warmup_ratio", f"must be in [0, 1), got {t.warmup_ratio}")
        if not 0 <= self.data.eval_fraction < 1:
            fail("data.eval_fraction", f"must be in [0, 1), got {self.data.eval_fraction}")
        if t.eval_every_steps < 0:
            fail("train.eval_every_steps", f"must not be negative, got {t.eval_every_steps}")
        one_of(self.source, "train.precision", t.precision, PRECISIONS)
        one_of(self.source, "train.lr_scheduler", t.lr_scheduler, SCHEDULERS)
        one_of(self.source, "serve.backend", self.serve.backend, SERVE_BACKENDS)
        for key, value in (
            ("data.max_length", self.data.max_length),
            ("train.micro_batch_size", t.micro_batch_size),
            ("train.checkpoint_every_steps", t.checkpoint_every_steps),
            ("resources.nodes", r.nodes),
            ("resources.gpus_per_node", r.gpus_per_node),
            ("resources.cpu_procs_per_node", r.cpu_procs_per_node),
            ("serve.workers", self.serve.workers),
        ):
            if value < 1:
                fail(key, f"must be at least 1, got {value}")
        per_step = t.micro_batch_size * self.world_size
        if t.global_batch_size % per_step:
            fail(
                "train.global_batch_size",
                f"({t.global_batch_size}) must be a multiple of micro_batch_size x devices "
                f"({t.micro_batch_size} x {self.world_size} = {per_step})",
            )
        self._check_accelerators(fail)
        for i, infra in enumerate(r.regions):
            cloud, sep, region = infra.partition("/")
            if not sep or not region:
                fail(f"resources.regions[{i}]", f"must be 'cloud/region', got '{infra}'")
            if r.clouds and cloud not in r.clouds:
                fail(f"resources.regions[{i}]", f"names cloud '{cloud}', not in resources.clouds")
        self._check_plan(fail)
        if self.budget_usd is not None and self.budget_usd <= 0:
            fail("budget_usd", f"must be positive, got {self.budget_usd}")

    def _check_accelerators(self, fail: typing.Callable[[str, str], typing.NoReturn]) -> None:
        r = self.resources
        if r.accelerators and not r.accelerator:
            fail("resources.accelerators", "needs resources.accelerator (a CPU run has no GPUs)")
        if [a.lower() for a in r.accelerators] == ["any"]:
            return
        for i, item in enumerate(r.accelerators):
            name, sep, count = item.partition(":")
            if not name or name.lower() == "any" or (sep and not count.isdigit()):
                fail(
                    f"resources.accelerators[{i}]",
                    f"must be NAME or NAME:COUNT (or the list [any]), got '{item}'",
                )
            if sep and int(count) != r.gpus_per_node:
                fail(
                    f"resources.accelerators[{i}]",
                    f"asks {count} GPUs per node, the recipe's batch is laid out for "
                    f"gpus_per_node {r.gpus_per_node}",
                )

    def _check_plan(self, fail: typing.Callable[[str, str], typing.NoReturn]) -> None:
        p = self.plan
        if not 0 < p.mfu <= 1:
            fail("plan.mfu", f"must be in (0, 1], got {p.mfu}")
        for key, value in (
            ("plan.write_gb_per_second", p.write_gb_per_second),
            ("plan.upload_gb_per_second", p.upload_gb_per_second),
            ("plan.stage_gb_per_second", p.stage_gb_per_second),
        ):
            if value <= 0:
                fail(key, f"must be positive, got {value}")
        if not 1 <= p.checkpoint_bytes_per_param <= 64:
            fail(
                "plan.checkpoint_bytes_per_param",
                f"must be in [1, 64], got {p.checkpoint_bytes_per_param}",
            )
        for key, value in (
            ("plan.tokens_per_gpu_second", p.tokens_per_gpu_second),
            ("plan.preemptions_per_hour", p.preemptions_per_hour),
            ("plan.relaunch_minutes", p.relaunch_minutes or 0.0),
            *((f"plan.preemption_rates.{k}", v) for k, v in p.preemption_rates.items()),
        ):
            if value < 0:
                fail(key, f"must not be negative, got {value}")
        for offer in p.preemption_rates:
            cloud, _, region = offer.partition("/")
            if not cloud or "/" in region or offer.endswith("/"):
                fail(f"plan.preemption_rates.{offer}", "must be keyed 'cloud' or 'cloud/region'")

    # --------------------------------------------------------------- deriving

    @property
    def devices_per_node(self) -> int:
        r = self.resources
        return r.gpus_per_node if r.accelerator else r.cpu_procs_per_node

    @property
    def world_size(self) -> int:
        return self.devices_per_node * self.resources.nodes

    @property
    def grad_accum_steps(self) -> int:
        return self.train.global_batch_size // (self.train.micro_batch_size * self.world_size)

    def envs(self) -> dict[str, str]:
        """The task env vars this recipe sets (the names the specs in `sky/` declare)."""
        t, s, e = self.train, self.serve, self.eval
        return {
            "RUN_NAME": self.name,
            "MODEL_PATH": self.model.path,
            "TEMPLATE": self.model.template,
            "DATA_PATH": self.data.path,
            "EVAL_PATH": self.data.eval_path,
            "MAX_LENGTH": str(self.data.max_length),
            "NUM_EPOCHS": yaml_number(t.epochs),
            "LR": yaml_number(t.lr),
            "LR_SCHEDULER": t.lr_scheduler,
            "WARMUP_RATIO": yaml_number(t.warmup_ratio),
            "WEIGHT_DECAY": yaml_number(t.weight_decay),
            "GLOBAL_BATCH_SIZE": str(t.global_batch_size),
            "MICRO_BATCH_SIZE": str(t.micro_batch_size),
            "PRECISION": t.precision,
            "GRADIENT_CHECKPOINTING": str(t.gradient_checkpointing).lower(),
            "PACKING": str(t.packing).lower(),
            "LORA_R": str(t.lora_r),
            "CHECKPOINT_EVERY_STEPS": str(t.checkpoint_every_steps),
            "EVAL_EVERY_STEPS": str(t.eval_every_steps),
            "MAX_RESTARTS_ON_ERRORS": str(self.resources.max_restarts_on_errors),
            "SEED": str(t.seed),
            "CPU_PROCS_PER_NODE": str(self.resources.cpu_procs_per_node),
            "BUCKET_URL": self.bucket.rstrip("/"),
            "SERVED_MODEL_NAME": s.model_name,
            "SERVE_MODEL_PATH": s.model_path or f"models/{self.name}",
            "SERVE_BACKEND": s.backend,
            "BENCH": e.bench,
            "JUDGE_MODEL": e.judge_model,
            "JUDGE_API_BASE": e.judge_api_base,
            "BASELINE_MODEL": e.baseline_model,
            "BASELINE_PATH": e.baseline_path,
            "EVAL_MAX_TOKENS": str(e.max_tokens),
            "JUDGE_MAX_TOKENS": str(e.judge_max_tokens),
        }
