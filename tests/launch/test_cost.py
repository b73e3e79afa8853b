"""Realized cost from a run's attempts and metrics, at the (made-up) fixture catalog's prices."""

import json

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
