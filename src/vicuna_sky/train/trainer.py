"""The training loop: one optimizer step per global batch, checkpoints, preemption, export.

Loss is the mean over every answer token of the global batch: each micro-batch contributes its
token-loss sum divided by the global count of answer tokens (times the world size, which FSDP's
gradient averaging divides back out). That makes the update independent of how the batch is
split into micro-batches and processes, and a resumed run identical to an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path

import torch
import torch.distributed as torch_dist
from torch.nn import functional as F

from vicuna_sky.data.tokenize import IGNORE_INDEX
from vicuna_sky.errors import VicunaSkyError
from vicuna_sky.models import resolve_model_path
from vicuna_sky.spot import PREEMPTED_EXIT_CODE, PreemptionWatcher
from vicuna_sky.train import dist
from vicuna_sky.train import model as model_lib
from vicuna_sky.train.checkpoint import CheckpointManager
from vicuna_sky.train.config import TrainConfig
from vicuna_sky.train.data import ResumableSampler, collate, load_dataset, micro_batches
from vicuna_sky.train.export import export
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
        tokenizer = AutoTokenizer.from_pretrained(path)
        dataset = load_dataset(Path(c.data_path), tokenizer, c.template, c.max_length, c.packing)
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
        optimizer = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
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
                "attention %s, %s on %s x%d, %d samples, %d steps (%s)",
                attn,
                model_lib.compute_dtype(c, world),
                world.device.type,
                world.size,
                len(dataset),
                total,
                f"resumed at step {step}" if resume else "fresh start",
            )
        watcher = PreemptionWatcher(poll_seconds=c.preemption_poll_seconds).start()
        # DTensor.numel() is the full (unsharded) size: this is the whole model.
        flops_per_token = 6 * sum(p.numel() for p in model.parameters())
        progress = Progress(
            total, step, world.is_main, peak_flops(world.device) * world.size, c.metrics_path
        )
        flash = attn == "flash_attention_2"
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        try:
            while step < total:
                started = time.perf_counter()
                batch = sampler.next_batch()
                loss, tokens = self._step(model, dataset, batch, world, pad_id, flash)
                torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                progress.update(
                    step,
                    loss,
                    tokens,
                    time.perf_counter() - started,
                    flops_per_token,
                    scheduler.get_last_lr()[0],
                    peak_memory_mb(world.device),
                )
                stopping = dist.any_rank(watcher.triggered, world)
                if stopping:
                    return self._emergency(
                        step, model, optimizer, sampler, scheduler, ckpt, watcher, world
                    )
                if step % c.checkpoint_every_steps == 0 or step == total:
                    ckpt.save(step, model, optimizer, self._extra(step, sampler, scheduler))
            progress.close()
            export(model, tokenizer, c, world, path)
            ckpt.wait()
            return 0
        finally:
            watcher.stop()
            ckpt.close()

    @staticmethod
    def _extra(step: int, sampler: ResumableSampler, scheduler: object) -> dict:
        return {"step": step, "sampler": sampler.state_dict(), "scheduler": scheduler.state_dict()}

    def _step(
        self,
        model: torch.nn.Module,
        dataset: object,
        batch: list[int],
        world: dist.World,
        pad_id: int,
        flash: bool,
    ) -> tuple[float, int]:
        c = self.config
        micro = [
            collate(dataset, idx, pad_id, flash)
            for idx in micro_batches(batch, world.rank, world.size, c.micro_batch_size)
        ]
        local = sum(int((m["labels"][:, 1:] != IGNORE_INDEX).sum()) for m in micro)
        count = torch.tensor([local], device=world.device)
        torch_dist.all_reduce(count)
        total_tokens = max(1, int(count.item()))
        loss_sum = torch.zeros((), device=world.device)
        for i, m in enumerate(micro):
            # Sync gradients only on the last micro-batch: one reduce-scatter per step.
            model.set_requires_gradient_sync(i == len(micro) - 1)
            m = {k: v.to(world.device) if v is not None else None for k, v in m.items()}
            labels = m.pop("labels")
            logits = model(**m).logits.float()
            token_loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)),
                labels[:, 1:].reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            (token_loss * world.size / total_tokens).backward()
            loss_sum += token_loss.detach()
        torch_dist.all_reduce(loss_sum)
        tokens = sum(
            int(m["attention_mask"].sum())
            if m["attention_mask"] is not None and m["attention_mask"].dim() == 2
            else m["input_ids"].numel()
            for m in micro
        )
        return loss_sum.item() / total_tokens, tokens * world.size

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
        ckpt.save(step, model, optimizer, self._extra(step, sampler, scheduler))
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
            marker = Path(self.config.checkpoint_dir) / "PREEMPTED"
            marker.write_text(f"step {step}\n")
        return PREEMPTED_EXIT_CODE
