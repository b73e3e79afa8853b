"""Checkpoint timing and Young/Daly's interval in steps."""

import math

import pytest

from vicuna_sky.plan.checkpoint import Checkpointing, checkpointing, young_daly
from vicuna_sky.plan.tokens import TokenCount, token_count

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
    assert ck.steps(float("inf")) == ck.total_steps  # any infinity, not just math.inf
    assert ck.steps(ck.step_seconds / 3) == 1  # an interval shorter than a step: every step
    # On a notice: finish the step, then write and upload (10.9 + 202.2 + 161.8 s).
    assert ck.emergency_seconds == pytest.approx(
        128 * 2048 / 24_000 + 6.74e9 * 12 / 0.4e9 + 6.74e9 * 12 / 0.5e9
    )
    # Two nodes save synchronously: training waits for the write of each node's half.
    two = checkpointing(replace(r, "resources", nodes=2), token_count(r), per_gpu=3000.0)
    assert two.stall_seconds == two.write_seconds == pytest.approx(6.74e9 * 12 / 0.8e9)
    assert two.commit_seconds == two.upload_seconds


def test_free_checkpoints_without_preemptions_are_still_only_the_final_one():
    assert young_daly(0.0, float("inf")) == math.inf  # not sqrt(0 x inf), which is nan


def test_checkpoint_download_and_steps_by_hand():
    r = replace(recipe("vicuna-7b"), "train", packing=True, epochs=2.5)
    tokens = token_count(r)
    for nodes in (1, 2):
        ck = checkpointing(replace(r, "resources", nodes=nodes), tokens, per_gpu=3000.0)
        # A relaunch downloads each node's share of 80.9 GB at the bucket's 0.5 GB/s.
        assert ck.download_seconds == pytest.approx(6.74e9 * 12 / (nodes * 0.5e9))
    # Without stats: steps of 128 full 2048-token rows, 2.5 epochs of them, rounded up.
    steps_per_epoch = round(tokens.per_epoch / (128 * 2048))
    assert ck.total_steps == math.ceil(steps_per_epoch * 2.5)


def test_steps_from_the_datas_own_stats():
    """With the data's counts: an epoch is its sequences in whole global batches, and a step
    carries the epoch's tokens spread over them."""
    r = replace(recipe("vicuna-7b"), "train", packing=True, epochs=3.0)
    stats = TokenCount(per_epoch=64_000_000, sequences=50_000, measured=True, basis="stats")
    ck = checkpointing(r, stats, per_gpu=3000.0)
    assert ck.tokens_per_step == pytest.approx(64_000_000 / (50_000 // 128))  # 390 steps
    assert ck.total_steps == 3 * 390
    assert ck.steps_basis == "50,000 sequences per epoch / global batch 128"
    # Fewer sequences than a global batch, or just over one: one step, never none; the same
    # without stats for fewer tokens than half a step.
    one = replace(r, "train", epochs=1.0)
    for sequences in (100, 130, 0):
        small = TokenCount(per_epoch=1000, sequences=sequences, measured=True, basis="stats")
        assert checkpointing(one, small, per_gpu=3000.0).total_steps == 1


def test_young_daly_uses_an_hour_of_3600_seconds():
    """One preemption an hour, a 0.5 s stall: sqrt(2 x 0.5 x 3600) = 60 s, which is 10.5001
    steps here: 11 (an hour of 3599 s would give 10.4986: 10), or 10.4999: 10 (3601 s: 11)."""
    for steps, planned in ((10.5001, 11), (10.4999, 10)):
        ck = Checkpointing(
            size_bytes=1e9, write_seconds=0.0, upload_seconds=0.0, download_seconds=0.0,
            stall_seconds=0.5, step_seconds=60 / steps, tokens_per_step=1.0, steps_basis="",
            total_steps=1_000,
        )  # fmt: skip
        assert ck.planned_steps(1.0) == planned


def test_a_stall_longer_than_the_write_leaves_only_the_upload_to_commit():
    r = replace(recipe("vicuna-7b"), "plan", stage_gb_per_second=0.2, write_gb_per_second=0.4)
    ck = checkpointing(r, token_count(r), per_gpu=3000.0)
    assert ck.stall_seconds > ck.write_seconds  # the write is done when training resumes
    assert ck.commit_seconds == ck.upload_seconds
