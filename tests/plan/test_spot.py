"""The spot model: expected billed time and cost of a run on one offer, by hand."""

import math

import pytest

from vicuna_sky.plan.checkpoint import young_daly
from vicuna_sky.plan.spot import (
    RELAUNCH_MINUTES,
    SpotRun,
    base_model_seconds,
    preemption_rate,
    relaunch_minutes,
)

from .conftest import recipe, replace


def test_young_daly_interval():
    # sqrt(2 x 100 s x 20,000 s) = 2,000 s.
    assert young_daly(100, 20_000) == pytest.approx(2000)
    assert young_daly(202.2, 36_000) == pytest.approx(math.sqrt(2 * 202.2 * 36_000))
    assert young_daly(100, math.inf) == math.inf  # never preempted: only the final one
    assert young_daly(0, 20_000) == 0


def made_up_run(**changes) -> SpotRun:
    values = dict(
        work_seconds=36_000,  # 10 h of training
        interval_seconds=3_600,
        checkpoint_seconds=360,
        commit_lag_seconds=180,
        relaunch_seconds=600,
        preemptions_per_hour=0.1,
    )
    return SpotRun(**(values | changes))


def test_expected_cost_arithmetic():
    run = made_up_run()
    # 10 checkpoints of 360 s; a preemption loses half an interval + the upload lag, + relaunch.
    assert run.checkpoints_seconds == 3_600
    assert run.lost_seconds == 1_800 + 180
    assert run.per_preemption_seconds == 2_580
    # W = 39,600 / (1 - 0.1/3600 x 2,580) = 42,657.1 s, with 1.18 preemptions expected in it.
    assert run.billed_seconds == pytest.approx(39_600 / (1 - 2_580 / 36_000))
    assert run.billed_seconds == pytest.approx(42_657.1, abs=0.1)
    assert run.preemptions == pytest.approx(1.18492, abs=1e-5)
    assert run.preemptions * run.per_preemption_seconds == pytest.approx(
        run.billed_seconds - 39_600
    )
    # 2 nodes at $10/h spot, $30/h on demand (same checkpoints, no preemption).
    assert run.cost(10.0, 2) == pytest.approx(236.98, abs=0.01)
    assert run.on_demand_cost(30.0, 2) == pytest.approx(660.0)
    assert run.overhead_seconds == pytest.approx(run.billed_seconds - 36_000)


def test_emergency_checkpoint_in_the_window_saves_the_work():
    fits = made_up_run(notice_seconds=120, emergency_seconds=60)
    # No work lost; the node is billed until the cloud takes it at the end of the window.
    assert fits.emergency_fits and fits.lost_seconds == 120
    # Too slow for the window: the save never commits; the interval since the newest
    # committed checkpoint is lost, and the window spent on the save too.
    late = made_up_run(notice_seconds=30, emergency_seconds=60)
    assert not late.emergency_fits
    assert late.lost_seconds == 1_800 + 180 + 30
    assert fits.billed_seconds < made_up_run().billed_seconds < late.billed_seconds


def test_upload_lag_is_capped_at_one_interval_and_hopeless_runs_never_finish():
    assert made_up_run(interval_seconds=100, commit_lag_seconds=500).lost_seconds == 50 + 100
    # Preempted every 20 minutes with 30 minutes lost each time: no end.
    assert made_up_run(preemptions_per_hour=3).billed_seconds == math.inf


def test_young_daly_minimizes_the_expected_billed_time():
    tau = young_daly(360, 36_000)  # C = 6 min, one preemption per 10 h
    billed = {
        f: made_up_run(interval_seconds=tau * f, commit_lag_seconds=0).billed_seconds
        for f in (0.25, 0.5, 0.8, 1.0, 1.25, 2.0, 4.0)
    }
    assert min(billed, key=billed.get) == 1.0


def test_an_emergency_save_that_just_fits_the_window_counts():
    exact = made_up_run(notice_seconds=120, emergency_seconds=120)
    assert exact.emergency_fits and exact.lost_seconds == 120
    assert not made_up_run().emergency_fits  # no notice, no emergency save


def test_checkpointing_only_at_the_end_costs_no_periodic_time():
    final_only = made_up_run(interval_seconds=math.inf)
    assert final_only.checkpoints_seconds == 0
    assert final_only.on_demand_cost(30.0, 2) == pytest.approx(600.0)
    never = made_up_run(preemptions_per_hour=0)
    assert never.billed_seconds == 39_600 and never.preemptions == 0
    assert never.overhead_seconds == 3_600  # the periodic checkpoints only


def test_a_run_that_loses_exactly_its_pace_never_finishes():
    # 1 preemption/h, each costing an hour (1,800 + 180 lost + 1,620 relaunch): no progress.
    run = made_up_run(preemptions_per_hour=1, relaunch_seconds=1_620)
    assert run.per_preemption_seconds == 3_600 and run.billed_seconds == math.inf


def test_the_relaunch_time_and_preemption_rate_of_a_recipe():
    # What the plan states: provisioning (5 min, assumed), the install (41 s) and the trainer's
    # start (9.1 s), both measured (see the constants' notes).
    assert pytest.approx(5 * 60 + 41 + 9.1) == RELAUNCH_MINUTES * 60
    r = recipe("vicuna-7b")
    assert relaunch_minutes(r) == RELAUNCH_MINUTES
    assert relaunch_minutes(replace(r, "plan", relaunch_minutes=2.5)) == 2.5
    assert relaunch_minutes(replace(r, "plan", relaunch_minutes=0.0)) == 0.0  # set, not unset
    # Each node reads all of the base model (bf16: 2 bytes a parameter) at the bucket's rate.
    slow = replace(r, "plan", upload_gb_per_second=0.25)
    assert base_model_seconds(slow) == pytest.approx(r.model.params_b * 2 / 0.25)
    rates = {"GCP": 0.3, "gcp/us-central1": 0.5}
    r = replace(r, "plan", preemptions_per_hour=0.1, preemption_rates=rates)
    assert preemption_rate(r, "gcp", "US-Central1") == 0.5  # the region's own, any case
    assert preemption_rate(r, "gcp", "europe-west4") == 0.3  # the cloud's
    assert preemption_rate(r, "aws", "us-central1") == 0.1  # the default
