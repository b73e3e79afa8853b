"""Checkpoint timing and Young/Daly's interval in steps."""

import math

import pytest

from vicuna_sky.plan.checkpoint import checkpointing, young_daly
from vicuna_sky.plan.tokens import token_count

from .conftest import recipe, replace


def test_young_daly_interval():
    # sqrt(2 x 100 s x 20,000 s) = 2,000 s.
    assert young_daly(100, 20_000) == pytest.approx(2000)
    assert young_daly(100, math.inf) == math.inf  # never preempted: only the final one
    assert young_daly(0, 20_000) == 0


def test_checkpoint_times_and_interval_in_steps():
    r = replace(recipe("vicuna-7b"), "train", packing=True)
    ck = checkpointing(r, token_count(r), per_gpu=3000.0)
    # 80.9 GB on one node: training waits while it is copied to host memory (10 GB/s), then it
    # is written (0.4 GB/s) and uploaded (0.5 GB/s) in the background.
    assert ck.stall_seconds == pytest.approx(6.74e9 * 12 / 10e9)
    assert ck.write_seconds == pytest.approx(6.74e9 * 12 / 0.4e9)
    assert ck.commit_seconds == pytest.approx(6.74e9 * 12 / 0.4e9 + 6.74e9 * 12 / 0.5e9)
    # Without stats: a step is a global batch of full 2048-token rows.
    assert ck.tokens_per_step == 128 * 2048
    assert ck.step_seconds == pytest.approx(128 * 2048 / (3000 * 8))
    tau = math.sqrt(2 * ck.stall_seconds * 36_000)
    assert ck.planned_steps(0.1) == round(tau / ck.step_seconds)
    # Preempted often, Young/Daly would checkpoint faster than a checkpoint commits: the floor.
    assert ck.planned_steps(20.0) == round(ck.commit_seconds / ck.step_seconds)
    assert ck.planned_steps(0.0) == ck.total_steps  # never preempted: the final one only
    # Two nodes save synchronously: training waits for the write of each node's half.
    two = checkpointing(replace(r, "resources", nodes=2), token_count(r), per_gpu=3000.0)
    assert two.stall_seconds == two.write_seconds == pytest.approx(6.74e9 * 12 / 0.8e9)
    assert two.commit_seconds == two.upload_seconds
