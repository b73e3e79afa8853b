"""`vicuna-sky chaos train RECIPE`: sky/train.yaml through repeated spot preemptions, locally.

The run uses the local backend with its bucket on a local S3 server (moto). It is preempted K
times at random steps, each time either with no warning (SIGKILL) or with a notice first (the
local metadata server flips AWS's `spot/instance-action` / GCP's `instance/preempted`, and the
machine is killed when the notice window ends). Every relaunch gets a fresh directory, an empty
local disk and the same TASK_ID, so it can only resume from the bucket. An uninterrupted run of
the same recipe is the reference: the report compares wall time and the final weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vicuna_sky.errors import VicunaSkyError
from vicuna_sky.launch import cost, jobs
from vicuna_sky.launch.tasks import (
    Spec,
    checkpoint_url,
    load_task,
    parse_env_overrides,
    resolve_recipe,
)
from vicuna_sky.localcloud.cluster import LocalConfig, LocalRunner
from vicuna_sky.localcloud.loopback import stay_on_loopback
from vicuna_sky.localcloud.metadata_server import MetadataServer
from vicuna_sky.localcloud.s3_server import LOCAL_AWS_ENV, LocalS3
from vicuna_sky.recipe import Recipe

KINDS = ("kill", "notice")


@dataclass(frozen=True)
class ChaosConfig:
    recipe: str
    preemptions: int = 3
    seed: int = 0
    notice_seconds: float = 5.0
    """How long a notice lasts before the machine is killed (the clouds give 30-120 s)."""
    workdir: Path = Path("runs/chaos")
    envs: tuple[str, ...] = ()


@dataclass
class Preemption:
    kind: str
    """kill (no warning) or notice (metadata notice, then SIGKILL at the end of the window)."""
    cloud: str
    attempt: int
    at_step: int
    """The last step the machine finished before it went away."""
    latest_committed: int
    """The newest committed checkpoint in the bucket right after it went away (0 = none)."""
    emergency_checkpoint: bool = False
    resumed_from: int = 0
    steps_lost: int = 0
    """Steps finished before the preemption and done again after it."""
    seconds_to_resume: float = 0.0
    """From the relaunch to the first step finished after it."""


@dataclass
class ChaosReport:
    recipe: str
    seed: int
    steps: int
    preemptions: list[Preemption] = field(default_factory=list)
    wall_seconds: float = 0.0
    reference_wall_seconds: float = 0.0
    weights_sha256: str = ""
    reference_weights_sha256: str = ""
    weights_files: list[str] = field(default_factory=list)
    """The safetensors files hashed, of each run: two missing exports must never compare equal."""
    seconds_to_first_step: float = 0.0
    """From the first attempt's start (setup included) to its first step: what a relaunch's
    `seconds_to_resume` compares with (a relaunch also loads a checkpoint)."""
    reference_weights_files: list[str] = field(default_factory=list)
    identical_to_uninterrupted: bool = False
    only_committed_checkpoints_loaded: bool = True
    cost: dict = field(default_factory=dict)
    """The chaos run's realized cost at catalog prices (cost.RealizedCost), when known."""
    run_dir: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def weights_hash(export_dir: Path) -> tuple[str, list[str]]:
    """sha256 over every tensor of the exported safetensors files, in name order, and the
    files' names. No safetensors file is an error: an empty hash would equal another empty one."""
    import torch
    from safetensors.torch import load_file

    digest = hashlib.sha256()
    files = sorted(Path(export_dir).glob("*.safetensors"))
    if not files:
        raise VicunaSkyError(f"no exported weights (*.safetensors) in {export_dir}")
    for path in files:
        tensors = load_file(str(path))
        for name in sorted(tensors):
            digest.update(name.encode())
            raw = tensors[name].contiguous().view(-1).view(torch.uint8)
            digest.update(raw.numpy().tobytes())
    return digest.hexdigest(), [p.name for p in files]


class Chaos:
    def __init__(self, config: ChaosConfig) -> None:
        self.config = config
        self.recipe = Recipe.from_yaml(resolve_recipe(config.recipe))
        self.overrides = parse_env_overrides(config.envs)
        self.rng = random.Random(config.seed)
        self.workdir = Path(config.workdir).resolve()

    def _task(self, run_name: str, local: LocalConfig) -> object:
        from vicuna_sky.launch.runner import push_local_data
        from vicuna_sky.localcloud.backend import builtin_models

        task = load_task(Spec.TRAIN, self.recipe, {**self.overrides, "RUN_NAME": run_name})
        # The recipe's data as any launch uploads it (by content: both runs read one object).
        bucket = str(local.bucket_dir(self.recipe.bucket))
        push_local_data(
            self.recipe, task, bucket, Path(local.runs_dir), dryrun=False, overrides=self.overrides
        )
        builtin_models(task, local)  # both runs train the same model directory
        task.name = run_name
        return task

    def _bucket(self) -> str:
        return self.recipe.bucket.partition("://")[2].split("/")[0]

    def _export(self, s3: LocalS3, run_name: str, local: LocalConfig) -> Path:
        from checkpoints_sync import open_store

        store = open_store(f"{self.recipe.bucket.rstrip('/')}/models/{run_name}")
        target = self.workdir / "exports" / run_name
        for obj in store.list():
            store.get_file(obj.key, target / obj.key)
        return target

    def run(self) -> ChaosReport:
        if not self.recipe.bucket.startswith("s3://"):
            raise VicunaSkyError(
                "chaos runs put the recipe's bucket on a local S3 server: use an s3:// bucket"
            )
        # Every SDK endpoint on loopback first (STS from SkyPilot's catalog included); the
        # local S3 server's own endpoint is set below, service-specific, so it wins.
        stay_on_loopback()
        os.environ.update(LOCAL_AWS_ENV)
        os.environ["VICUNA_SKY_NOTICE_POLL_SECONDS"] = "0.1"
        self.workdir.mkdir(parents=True, exist_ok=True)
        with LocalS3() as s3, MetadataServer() as metadata:
            s3.create_bucket(self._bucket())
            local = LocalConfig(
                runs_dir=self.workdir / "runs",
                bucket_root=self.workdir / "buckets",
                s3_endpoint_url=s3.url,
                max_recoveries=self.config.preemptions + 5,
            )
            reference_task = self._task(f"{self.recipe.name}-reference", local)
            os.environ["AWS_ENDPOINT_URL_S3"] = s3.url  # for our own reads of the bucket
            os.environ.update(metadata.env(""))
            reference = LocalRunner(reference_task, local).run()
            if reference.status != "SUCCEEDED":
                raise VicunaSkyError(
                    f"the uninterrupted reference run ended {reference.status}: "
                    f"see {reference.run_dir}"
                )
            report = self._chaos_run(local, metadata)
            report.reference_wall_seconds = _wall(reference)
            report.reference_weights_sha256, report.reference_weights_files = weights_hash(
                self._export(s3, f"{self.recipe.name}-reference", local)
            )
            report.weights_sha256, report.weights_files = weights_hash(
                self._export(s3, f"{self.recipe.name}-chaos", local)
            )
            report.identical_to_uninterrupted = (
                report.weights_sha256 == report.reference_weights_sha256
                and report.weights_files == report.reference_weights_files
            )
        return report

    def _chaos_run(self, local: LocalConfig, metadata: MetadataServer) -> ChaosReport:
        from checkpoints_sync import Checkpoints, open_store

        run_name = f"{self.recipe.name}-chaos"
        runner = LocalRunner(self._task(run_name, local), local)
        prices = _prices(self.recipe)
        if prices:
            runner.job.prices = asdict(prices)
            runner.job.save()
        url = checkpoint_url(runner.task)  # where sky/train.yaml commits (runs/NAME/TAG)
        checkpoints = Checkpoints(open_store(url))
        kinds = [KINDS[i % 2] for i in range(self.config.preemptions)]
        self.rng.shuffle(kinds)
        # The cloud each attempt "runs on" (whose notice endpoint its trainer polls) is decided
        # before it starts: the environment is read when the attempt is launched.
        clouds = [self.rng.choice(["aws", "gcp"]) for _ in range(len(kinds) + 1)]
        interval = int(
            self.overrides.get("CHECKPOINT_EVERY_STEPS", self.recipe.train.checkpoint_every_steps)
        )
        done: list[Preemption] = []

        def attempt_now() -> jobs.Attempt | None:
            return runner.job.attempts[-1] if runner.job.attempts else None

        def finished() -> bool:
            return runner.job.status in ("SUCCEEDED", "FAILED", "CANCELLED", "FAILED_SETUP")

        def chaos() -> None:
            for kind in kinds:
                # A random moment: 1 to 2 checkpoint intervals into this attempt's training.
                while not finished():
                    attempt = attempt_now()
                    if attempt and jobs.attempt_metrics(attempt):
                        break
                    time.sleep(0.05)
                if finished():
                    return
                attempt = attempt_now()
                target = jobs.attempt_metrics(attempt)[0]["step"] + self.rng.randint(
                    0, 2 * interval - 1
                )
                while (
                    not finished()
                    and max((m["step"] for m in jobs.attempt_metrics(attempt)), default=0) < target
                ):
                    time.sleep(0.02)
                if finished():
                    return
                cloud = clouds[len(done)]
                os.environ["VICUNA_SKY_CLOUD"] = clouds[len(done) + 1]  # for the relaunch
                if kind == "notice":
                    metadata.notice()
                    deadline = time.monotonic() + self.config.notice_seconds
                    while time.monotonic() < deadline and runner.running():
                        time.sleep(0.05)
                runner.preempt(grace_seconds=0)  # the machine is gone
                metadata.clear()
                count = len(runner.job.attempts)
                steps = [m["step"] for m in jobs.attempt_metrics(attempt)]
                done.append(
                    Preemption(
                        kind,
                        cloud,
                        attempt.number,
                        max(steps, default=0),
                        checkpoints.latest() or 0,
                    )
                )
                while not finished() and len(runner.job.attempts) == count:
                    time.sleep(0.05)

        os.environ["VICUNA_SKY_CLOUD"] = clouds[0]
        thread = threading.Thread(target=chaos, daemon=True)
        thread.start()
        job = runner.run()
        thread.join(timeout=30)
        if job.status != "SUCCEEDED":
            raise VicunaSkyError(f"the chaos run ended {job.status}: see {job.run_dir}")
        report = ChaosReport(
            self.config.recipe,
            self.config.seed,
            0,
            done,
            wall_seconds=_wall(job),
            run_dir=job.run_dir,
        )
        by_number = {a.number: a for a in job.attempts}
        for p in done:
            killed, after = by_number[p.attempt], by_number.get(p.attempt + 1)
            p.emergency_checkpoint = "emergency checkpoint" in jobs.attempt_log(killed)
            if after is None:
                continue
            p.resumed_from = jobs.resumed_from(after) or 0
            p.steps_lost = max(0, p.at_step - p.resumed_from)
            first = jobs.attempt_metrics(after)
            if first:
                p.seconds_to_resume = round(first[0]["time"] - after.started_at, 2)
            report.only_committed_checkpoints_loaded &= p.resumed_from == p.latest_committed
        report.steps = max((m["step"] for m in jobs.attempt_metrics(job.attempts[-1])), default=0)
        first_attempt = jobs.attempt_metrics(job.attempts[0])
        if first_attempt:
            report.seconds_to_first_step = round(
                first_attempt[0]["time"] - job.attempts[0].started_at, 2
            )
        if prices:
            report.cost = cost.realized(job, prices).to_dict()
        return report


def _prices(recipe: Recipe) -> cost.Prices | None:
    try:
        return cost.prices_for(recipe)
    except Exception:
        return None


def _wall(job: jobs.LocalJob) -> float:
    starts = [a.started_at for a in job.attempts if a.started_at]
    ends = [a.ended_at for a in job.attempts if a.ended_at]
    return round(max(ends) - min(starts), 2) if starts and ends else 0.0


def render(report: ChaosReport) -> list[object]:
    from rich.table import Table

    table = Table(title=f"chaos: {report.recipe}, seed {report.seed}", title_justify="left")
    for col in (
        "#",
        "kind",
        "cloud",
        "at step",
        "committed",
        "resumed from",
        "steps lost",
        "emergency ckpt",
        "s to resume",
    ):
        table.add_column(col, justify="right" if col not in ("kind", "cloud") else "left")
    for i, p in enumerate(report.preemptions, 1):
        table.add_row(
            str(i),
            p.kind,
            p.cloud,
            str(p.at_step),
            str(p.latest_committed),
            str(p.resumed_from),
            str(p.steps_lost),
            "yes" if p.emergency_checkpoint else "no",
            f"{p.seconds_to_resume:.1f}",
        )
    overhead = report.wall_seconds - report.reference_wall_seconds
    same = "identical" if report.identical_to_uninterrupted else "DIFFERENT"
    lines = [
        f"{len(report.preemptions)} preemption(s), {report.steps} steps; "
        f"wall {report.wall_seconds:.1f}s vs {report.reference_wall_seconds:.1f}s "
        f"uninterrupted (+{overhead:.1f}s)",
        f"final weights {same} to the uninterrupted run's "
        f"({', '.join(report.weights_files)}, sha256 {report.weights_sha256[:16]})",
        *(
            [
                f"cost at {report.cost['basis']}: ${report.cost['spot_usd']:.5f} on spot vs "
                f"${report.cost['on_demand_usd']:.5f} on demand for the same work; "
                f"preemption overhead ${report.cost['overhead_usd']:.5f}"
            ]
            if report.cost
            else []
        ),
        "every resume loaded the newest committed checkpoint"
        if report.only_committed_checkpoints_loaded
        else "A RESUME DID NOT LOAD THE NEWEST COMMITTED CHECKPOINT",
    ]
    return [table, *lines]
