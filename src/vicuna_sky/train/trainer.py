"""The training loop: one optimizer step per global batch, checkpoints, preemption, export.

Loss is the mean over every answer token of the global batch: each micro-batch contributes its
token-loss sum divided by the global count of answer tokens (times the world size, which FSDP's
gradient averaging divides back out). That makes the update independent of how the batch is
split into micro-batches and processes, and a resumed run identical to an uninterrupted one.
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as torch_dist

from vicuna_sky.errors import VicunaSkyError
from vicuna_sky.models import resolve_model_path
from vicuna_sky.spot import PREEMPTED_EXIT_CODE, PreemptionWatcher
from vicuna_sky.train import dist
from vicuna_sky.train import model as model_lib
from vicuna_sky.train.checkpoint import CheckpointManager
from vicuna_sky.train.config import TrainConfig
from vicuna_sky.train.data import ResumableSampler, collate, load_dataset, micro_batches
from vicuna_sky.train.evaluate import Evaluator
from vicuna_sky.train.export import export
from vicuna_sky.train.loss import batch_loss_sum
from vicuna_sky.train.metrics import LOSS_CURVE, MetricsLog
from vicuna_sky.train.progress import Progress

log = logging.getLogger("vicuna_sky.train")
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 125e12}


def lr_lambda(config: TrainConfig, total_steps: int):  # noqa: ANN201 (a step -> factor function)
    warmup = math.ceil(config.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if config.lr_scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if config.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: allocated GPU memory, or on CPU this process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def peak_flops(device: torch.device) -> float:
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), 0.0)


# Python's cyclic garbage collector runs when allocations cross a threshold, at any point of a
# step, for as long as the heap takes to scan: the periodic slow steps of issue #14 look like it.
# Training makes few cycles, so it is collected at known points instead (as torchtitan does).
GC_EVERY_STEPS = 50
# Set (to anything) to have torch warn at every operation that makes the host wait for the GPU,
# from the third step on (the first two compile and warm up): a step should make none.
SYNC_DEBUG_ENV = "VICUNA_SKY_SYNC_DEBUG"


@dataclass
class _StepRecord:
    """A step whose numbers are read once the device has finished it (reading a device tensor
    earlier would make the host wait for the GPU every step)."""

    step: int
    loss_sum: torch.Tensor
    """On the host: copied without blocking, valid once `done` has completed."""
    answer_tokens: int
    tokens: int
    tokens_seen: int
    lr: float
    done: torch.cuda.Event | None
    extra: dict = field(default_factory=dict)


def unreachable_model(error: BaseException, path: str) -> bool:
    """Whether a model load failed in a way no restart fixes: no such local directory or
    repository, or a gated repository without access (a missing or refused HF_TOKEN)."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if path.startswith(("/", "./", "../", "~")) and not Path(path).expanduser().exists():
        return True

    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, GatedRepoError | RepositoryNotFoundError):
            return True
        seen = seen.__cause__ or seen.__context__
    text = str(error)
    return "not a valid model identifier" in text or "gated repo" in text


class Trainer:
    def __init__(self, config: TrainConfig) -> None:
        config.check()
        self.config = config

    def run(self) -> int:
        """Train to the end (0) or until a preemption notice (PREEMPTED_EXIT_CODE)."""
        c = self.config
        world = dist.init()
        random.seed(c.seed)
        torch.manual_seed(c.seed)
        from transformers import AutoTokenizer

        cache = Path(c.checkpoint_dir).parent / "models"
        if world.local_rank == 0:  # one process per node builds the built-in model, once
            resolve_model_path(c.model_path, cache)
        torch_dist.barrier()
        path = resolve_model_path(c.model_path, cache)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except OSError as e:
            if not unreachable_model(e, path):
                raise  # the hub or the disk failing now: a restart may succeed
            first = str(e).strip().splitlines()[0]
            raise VicunaSkyError(f"cannot load model {c.model_path!r}: {first}") from None
        dataset = load_dataset(Path(c.data_path), tokenizer, c.template, c.max_length, c.packing)
        eval_set = None
        if c.eval_path:
            eval_set = load_dataset(
                Path(c.eval_path), tokenizer, c.template, c.max_length, c.packing
            )
        per_step = c.micro_batch_size * world.size
        if c.global_batch_size % per_step:
            raise VicunaSkyError(
                f"global batch {c.global_batch_size} is not a multiple of micro batch "
                f"{c.micro_batch_size} x {world.size} processes"
            )
        sampler = ResumableSampler(len(dataset), c.global_batch_size, c.seed)
        total = c.max_steps or max(1, int(c.epochs * sampler.steps_per_epoch))
        model, attn = model_lib.load(c, path, world)
        model = model_lib.shard(model, c, world, dist.mesh(world))
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = model_lib.optimizer(params, c)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(c, total))
        ckpt = CheckpointManager(
            Path(c.checkpoint_dir), c.checkpoint_url, c.keep_checkpoints, world
        )
        step = 0
        resume = ckpt.find_resume_step()
        if resume is not None:
            extra = ckpt.load(resume, model, optimizer, self._extra(0, sampler, scheduler))
            step = extra["step"]
            sampler.load_state_dict(extra["sampler"])
            scheduler.load_state_dict(extra["scheduler"])
        if world.is_main:
            log.info(
                "attention %s, %s on %s x%d, %d samples of %s, %d steps (%s)",
                attn,
                model_lib.compute_dtype(c, world),
                world.device.type,
                world.size,
                len(dataset),
                c.data_path,
                total,
                f"resumed at step {step}" if resume else "fresh start",
            )
        watcher = PreemptionWatcher(poll_seconds=c.preemption_poll_seconds).start()
        # DTensor.numel() is the full (unsharded) size: this is the whole model.
        flops_per_token = 6 * sum(p.numel() for p in model.parameters())
        metrics = MetricsLog(
            c.metrics_path,
            c.checkpoint_url,
            c.tensorboard_dir,
            c.run_name,
            c.metrics_upload_seconds,
            enabled=world.is_main,
            config=dataclasses.asdict(c),
        )
        progress = Progress(
            total, step, world.is_main, peak_flops(world.device) * world.size, metrics
        )
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # flex_attention is compiled for one shape: packed rows are padded to one length.
        pad_to = math.ceil(c.max_length / 128) * 128 if attn == "flex_attention" else 0
        evaluator = None
        if eval_set is not None:
            evaluator = Evaluator(
                eval_set, world, c.micro_batch_size, pad_id, attn, pad_to, c.loss_chunk_tokens
            )
        tokens_seen = tokens_before(dataset, c.global_batch_size, c.seed, step)
        evaluated_at = None  # the step of this attempt's latest eval
        if evaluator is not None and resume is None:
            # The base model's number: what the fine-tune is judged against.
            progress.evaluated(0, evaluator.loss(model), evaluator.tokens, 0)
            evaluated_at = 0
        # Steps whose loss is not read yet. On a GPU one step stays in flight: the host reads
        # step N-1's numbers (finished by then) while the device runs step N, and collates
        # step N+1 meanwhile; nothing in a step waits for the device.
        pending: collections.deque[_StepRecord] = collections.deque()
        in_flight = 1 if world.device.type == "cuda" else 0
        self._clock = time.perf_counter()
        gc.collect()
        gc.freeze()  # what setup made is never scanned again
        gc.disable()
        try:
            while step < total:
                batch = sampler.next_batch()
                micro = [
                    collate(dataset, idx, pad_id, attn, pad_to)
                    for idx in micro_batches(batch, world.rank, world.size, c.micro_batch_size)
                ]
                answers = max(1, sum(dataset.answer_tokens[i] for i in batch))
                loss_sum = self._step(model, micro, world, answers)
                torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                done = None
                if world.device.type == "cuda":
                    # Queued behind the step; a pinned host copy, read once `done` completes
                    # (`.item()` on the device tensor would be a sync of its own).
                    loss_sum = loss_sum.to("cpu", non_blocking=True)
                    done = torch.cuda.Event()
                    done.record()
                    if step == 2 and os.environ.get(SYNC_DEBUG_ENV):
                        torch.cuda.set_sync_debug_mode("warn")
                tokens = sum(dataset.tokens[i] for i in batch)
                tokens_seen += tokens
                lr = scheduler.get_last_lr()[0]
                pending.append(_StepRecord(step, loss_sum, answers, tokens, tokens_seen, lr, done))
                if step % GC_EVERY_STEPS == 0:
                    gc.collect(1)
                stopping = dist.any_rank(watcher.triggered, world)
                if stopping:
                    while pending:
                        self._report(pending.popleft(), progress, world, flops_per_token)
                    return self._emergency(
                        step, model, optimizer, sampler, scheduler, ckpt, watcher, world
                    )
                every = c.eval_every_steps
                if evaluator is not None and (step == total or (every and step % every == 0)):
                    started = time.perf_counter()
                    pending[-1].extra["eval_loss"] = evaluator.loss(model)
                    pending[-1].extra["eval_tokens"] = evaluator.tokens
                    evaluated_at = step
                    # Not training time: tokens/s, MFU and the ETA measure the steps alone.
                    self._clock += time.perf_counter() - started
                if step % c.checkpoint_every_steps == 0 or (step == total and c.final_checkpoint):
                    stall = ckpt.save(step, model, optimizer, self._extra(step, sampler, scheduler))
                    pending[-1].extra["checkpoint_stall_seconds"] = stall
                ckpt.poll()
                while len(pending) > in_flight:
                    self._report(pending.popleft(), progress, world, flops_per_token)
            while pending:
                self._report(pending.popleft(), progress, world, flops_per_token)
            if world.device.type == "cuda":
                torch.cuda.set_sync_debug_mode(0)  # the export and the last save may wait
            if evaluator is not None and evaluated_at != step:
                # Resumed from the last step's (emergency) checkpoint: nothing left to train,
                # but the final model's eval loss is still owed.
                progress.evaluated(step, evaluator.loss(model), evaluator.tokens, tokens_seen)
            progress.close()
            if c.export_dir:
                export(model, tokenizer, c, world, path)
            ckpt.wait()
            if world.is_main:
                metrics.close()
                draw_loss_curve(metrics)
            return 0
        finally:
            gc.enable()
            metrics.close()  # after a preemption too: the bucket has this attempt's records
            watcher.stop()
            ckpt.close()

    def _report(
        self, record: _StepRecord, progress: Progress, world: dist.World, flops_per_token: float
    ) -> None:
        """Log a finished step. Its time runs from the previous step's end on the device to
        this one's, so a host running ahead does not flatter the figure."""
        if record.done is not None:
            record.done.synchronize()
        now = time.perf_counter()
        seconds, self._clock = now - self._clock, now
        extra = dict(record.extra)
        if world.device.type == "cuda":
            # cudaMalloc retries (the allocator freeing its cache to satisfy a request) stall
            # a step for milliseconds to seconds: counted so a slow step can be explained.
            extra["alloc_retries"] = torch.cuda.memory_stats(world.device).get(
                "num_alloc_retries", 0
            )
        progress.update(
            record.step,
            record.loss_sum.item() / record.answer_tokens,
            record.tokens,
            seconds,
            flops_per_token,
            record.lr,
            peak_memory_mb(world.device),
            record.tokens_seen,
            **extra,
        )

    @staticmethod
    def _extra(step: int, sampler: ResumableSampler, scheduler: object) -> dict:
        return {"step": step, "sampler": sampler.state_dict(), "scheduler": scheduler.state_dict()}

    def _step(
        self,
        model: torch.nn.Module,
        micro: list[dict[str, torch.Tensor]],
        world: dist.World,
        answer_tokens: int,
    ) -> torch.Tensor:
        """Forward and backward over this process's micro-batches; the summed token loss of the
        whole global batch, on the device (not read here: that would wait for the device)."""
        loss_sum = torch.zeros((), device=world.device)
        for i, m in enumerate(micro):
            # Sync gradients only on the last micro-batch: one reduce-scatter per step.
            model.set_requires_gradient_sync(i == len(micro) - 1)
            token_loss = batch_loss_sum(model, m, world.device, self.config.loss_chunk_tokens)
            (token_loss * world.size / answer_tokens).backward()
            loss_sum += token_loss.detach()
        torch_dist.all_reduce(loss_sum)
        return loss_sum

    def _emergency(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        sampler: ResumableSampler,
        scheduler: object,
        ckpt: CheckpointManager,
        watcher: PreemptionWatcher,
        world: dist.World,
    ) -> int:
        start = time.monotonic()
        ckpt.save(step, model, optimizer, self._extra(step, sampler, scheduler), blocking=True)
        ckpt.wait()
        took = time.monotonic() - start
        since = time.monotonic() - watcher.noticed_at if watcher.noticed_at else took
        if world.is_main:
            log.warning(
                "emergency checkpoint step-%d saved and uploaded in %.1fs (%.1fs after the %s "
                "notice; window %.0fs)",
                step,
                took,
                since,
                watcher.source or "peer",
                watcher.window_seconds,
            )
        if world.local_rank == 0:
            # On every node: the node whose run script ends first decides the job's exit code
            # for all (SkyPilot cancels the others with 137), so each must know it was this.
            marker = Path(self.config.checkpoint_dir) / "PREEMPTED"
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(f"step {step}\n")
        return PREEMPTED_EXIT_CODE


def tokens_before(dataset: object, global_batch: int, seed: int, steps: int) -> int:
    """Tokens trained on in the first `steps` steps: the sampler's order is a function of the
    seed alone, so a resumed run replays it (indices only) instead of keeping a count."""
    sampler = ResumableSampler(len(dataset), global_batch, seed)
    return sum(dataset.tokens[i] for _ in range(steps) for i in sampler.next_batch())


def draw_loss_curve(metrics: MetricsLog) -> None:
    """The run's loss curve (every attempt's records, from the bucket when there is one) as
    loss_curve.png here and beside the checkpoints. Best effort: a finished run stays one."""
    try:
        from vicuna_sky.eval.plots import save_loss_curve
        from vicuna_sky.train.metrics import History, history, parse_lines

        if metrics.url:
            runs = history(metrics.url)
        else:
            mine = metrics.path.read_bytes()[metrics.offset :] if metrics.path else b""
            runs = History([parse_lines(mine.decode())])
        local = save_loss_curve(runs, Path(LOSS_CURVE))
        if local is not None:
            metrics.put(local, LOSS_CURVE)
            log.info("loss curve: %s", local.resolve())
    except Exception as e:
        log.warning("no loss curve: %s: %s", type(e).__name__, e)
