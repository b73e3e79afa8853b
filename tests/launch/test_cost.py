"""Realized cost from a run's attempts and metrics, at the (made-up) fixture catalog's prices."""

import json
import math

import pytest

from vicuna_sky.launch import cost
from vicuna_sky.launch.jobs import Attempt, LocalJob
from vicuna_sky.launch.tasks import resolve_recipe
from vicuna_sky.recipe import Recipe


def test_prices_from_the_catalog():
    tiny = cost.prices_for(Recipe.from_yaml(resolve_recipe("tiny-cpu")))
    assert (tiny.spot_hourly, tiny.on_demand_hourly, tiny.nodes) == (0.04, 0.10, 1)
    assert "m6i.large" in tiny.basis
    big = cost.prices_for(Recipe.from_yaml(resolve_recipe("vicuna-7b")))
    assert 0 < big.spot_hourly < big.on_demand_hourly


def attempt(tmp_path, number, start, end, steps, resumed=None, status="PREEMPTED"):
    workdir = tmp_path / f"attempt-{number}" / "workdir"
    workdir.mkdir(parents=True)
    lines = [
        json.dumps({"step": s, "seconds": 5.0, "time": start + 10 + 5 * i})
        for i, s in enumerate(steps)
    ]
    (workdir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    log = f"attention sdpa ... (resumed at step {resumed})\n" if resumed else "(fresh start)\n"
    (workdir.parent / "run-rank0.log").write_text(log)
    return Attempt(
        number, str(workdir), f"zone-{number}", status=status, started_at=start, ended_at=end
    )


def test_realized_cost_separates_kept_work_from_overhead(tmp_path):
    first = attempt(tmp_path, 1, 0.0, 100.0, range(1, 11))  # 10 steps, killed
    second = attempt(tmp_path, 2, 100.0, 200.0, range(9, 21), resumed=8, status="SUCCEEDED")
    job = LocalJob("run", "task-1", str(tmp_path), attempts=[first, second])
    prices = cost.Prices(spot_hourly=3.6, on_demand_hourly=10.8, nodes=2, basis="made up")
    c = cost.realized(job, prices)
    # Billed: 200 s on 2 nodes. Kept: all of the last attempt (100 s) + steps 1-8 (8 x 5 s).
    assert c.billed_hours == pytest.approx(400 / 3600)
    assert c.kept_hours == pytest.approx(280 / 3600)
    assert c.spot_usd == pytest.approx(0.4)
    assert c.on_demand_usd == pytest.approx(280 / 3600 * 10.8)
    assert c.overhead_usd == pytest.approx(120 / 3600 * 3.6)
    assert (c.attempts, c.preemptions) == (2, 1)


def test_managed_job_record():
    record = {"job_name": "vicuna-7b-train", "job_duration": 7200.0, "recovery_count": 2}
    c = cost.realized_from_managed_job(record, cost.Prices(9.5, 30.0, 1, "made up"))
    assert (c.spot_usd, c.on_demand_usd, c.preemptions) == (19.0, 60.0, 2)
    assert c.saving == pytest.approx(1 - 19 / 60)


# ---------------------------------------------------------------- expected cost (the plan's model)


def test_young_daly_interval():
    # sqrt(2 x 100 s x 20,000 s) = 2,000 s.
    assert cost.young_daly(100, 20_000) == pytest.approx(2000)
    assert cost.young_daly(202.2, 36_000) == pytest.approx(math.sqrt(2 * 202.2 * 36_000))
    assert cost.young_daly(100, math.inf) == math.inf  # never preempted: only the final one
    assert cost.young_daly(0, 20_000) == 0


def made_up_run(**changes) -> cost.SpotRun:
    values = dict(
        work_seconds=36_000,  # 10 h of training
        interval_seconds=3_600,
        checkpoint_seconds=360,
        commit_lag_seconds=180,
        relaunch_seconds=600,
        preemptions_per_hour=0.1,
    )
    return cost.SpotRun(**(values | changes))


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
    tau = cost.young_daly(360, 36_000)  # C = 6 min, one preemption per 10 h
    billed = {
        f: made_up_run(interval_seconds=tau * f, commit_lag_seconds=0).billed_seconds
        for f in (0.25, 0.5, 0.8, 1.0, 1.25, 2.0, 4.0)
    }
    assert min(billed, key=billed.get) == 1.0
