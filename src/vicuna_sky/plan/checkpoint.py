"""What a checkpoint costs in time, and how often to write one: Young/Daly's interval in steps.

The size is params x `plan.checkpoint_bytes_per_param`; the node's write and staging bandwidth
and the bucket's upload bandwidth (recipe `plan`) give how long training waits for a save (C)
and how long until it is committed (U). Young/Daly's interval sqrt(2 C MTBP) minimizes the
checkpoint time plus the work a preemption loses, never shorter than a checkpoint takes to
commit (one save is in flight at a time; faster saves only queue up).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from vicuna_sky.plan.tokens import TokenCount
from vicuna_sky.recipe import Recipe


def young_daly(checkpoint_seconds: float, mtbp_seconds: float) -> float:
    """The compute time between checkpoints that minimizes expected lost + checkpointing time:
    sqrt(2 x checkpoint cost x mean time between preemptions) (Young 1974, Daly 2006, to first
    order). No preemptions: infinite (checkpoint only at the end); free checkpoints: 0."""
    if mtbp_seconds == math.inf:
        return math.inf
    return math.sqrt(2 * checkpoint_seconds * mtbp_seconds)


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

    def planned_steps(self, preemptions_per_hour: float) -> int:
        """Young/Daly's interval at this preemption rate, in steps, at least the commit time."""
        mtbp = 3600 / preemptions_per_hour if preemptions_per_hour > 0 else math.inf
        return self.steps(max(young_daly(self.stall_seconds, mtbp), self.commit_seconds))


def checkpointing(
    recipe: Recipe, tokens: TokenCount, per_gpu: float, packing: bool | None = None
) -> Checkpointing:
    """What a checkpoint costs in time, and how long an optimizer step takes at `per_gpu`
    tokens/s per GPU."""
    r, p, t = recipe.resources, recipe.plan, recipe.train
    size = recipe.model.params_b * 1e9 * p.checkpoint_bytes_per_param
    if tokens.sequences and packing in (None, t.packing):
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
