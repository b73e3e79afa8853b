"""Realized cost from a run's attempts and metrics, at the (made-up) fixture catalog's prices."""

import json

import pytest

from vicuna_sky.launch import cost
from vicuna_sky.launch.jobs import Attempt, LocalJob
from vicuna_sky.launch.tasks import resolve_recipe
from vicuna_sky.recipe import Recipe

from ..plan.conftest import replace


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


def test_a_fresh_restart_keeps_nothing_of_the_attempt_before_it(tmp_path):
    """A relaunch that found no checkpoint starts over: the first attempt's steps are all
    redone. The third resumed at step 4, so the second's steps 1 to 4 (step 4 included) stay."""
    first = attempt(tmp_path, 1, 0.0, 100.0, range(1, 11), status="FAILED")  # an error, no
    second = attempt(tmp_path, 2, 100.0, 150.0, range(1, 7))  # preemption; no "resumed at"
    third = attempt(tmp_path, 3, 150.0, 250.0, range(5, 20), resumed=4, status="SUCCEEDED")
    job = LocalJob("run", "task-1", str(tmp_path), attempts=[first, second, third])
    assert cost.kept_seconds(job) == 100 + 4 * 5.0
    c = cost.realized(job, cost.Prices(3.6, 10.8, 1, "made up"))
    assert c.billed_hours == pytest.approx(250 / 3600) and c.kept_hours == pytest.approx(120 / 3600)
    assert (c.attempts, c.preemptions) == (3, 1)
    assert c.saving == pytest.approx(1 - (250 * 3.6) / (120 * 10.8))


def test_a_step_without_its_duration_counts_none(tmp_path):
    first = attempt(tmp_path, 1, 0.0, 100.0, range(1, 5))
    lines = [json.dumps({"step": 1, "seconds": 5.0}), json.dumps({"step": 2})]
    (tmp_path / "attempt-1" / "workdir" / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    second = attempt(tmp_path, 2, 100.0, 130.0, range(3, 5), resumed=2, status="SUCCEEDED")
    job = LocalJob("run", "task-1", str(tmp_path), attempts=[first, second])
    assert cost.kept_seconds(job) == 30 + 5.0


def test_an_attempt_still_running_is_not_billed_yet(tmp_path):
    first = attempt(tmp_path, 1, 0.0, 100.0, range(1, 11))
    running = attempt(tmp_path, 2, 100.0, 0.0, range(9, 12), resumed=8, status="RUNNING")
    job = LocalJob("run", "task-1", str(tmp_path), attempts=[first, running])
    prices = cost.Prices(3.6, 10.8, 1, "made up")
    c = cost.realized(job, prices)
    assert c.billed_hours == pytest.approx(100 / 3600) == c.kept_hours
    assert (c.attempts, c.preemptions) == (2, 1)
    nothing = LocalJob("run", "task-2", str(tmp_path), attempts=[running])
    assert cost.kept_seconds(nothing) == 0.0
    c = cost.realized(nothing, prices)
    assert (c.billed_hours, c.kept_hours, c.spot_usd, c.overhead_usd) == (0, 0, 0, 0)
    assert c.saving == 0.0  # nothing to compare with, not a division by zero


def test_kept_work_is_never_more_than_the_billed_time(tmp_path):
    """Steps timed by the trainer, attempts by the launcher: when the steps claim more time
    than the attempts were up (clocks disagree), the kept time is the billed time."""
    first = attempt(tmp_path, 1, 0.0, 20.0, range(1, 11))  # 10 steps of 5 s in 20 s
    second = attempt(tmp_path, 2, 20.0, 30.0, range(11, 13), resumed=10, status="SUCCEEDED")
    job = LocalJob("run", "task-1", str(tmp_path), attempts=[first, second])
    c = cost.realized(job, cost.Prices(3.6, 10.8, 1, "made up"))
    assert c.kept_hours == c.billed_hours == pytest.approx(30 / 3600)
    assert c.overhead_usd == 0


def test_a_managed_job_record_without_figures():
    c = cost.realized_from_managed_job(
        {"job_duration": None, "recovery_count": None}, cost.Prices(9.5, 30.0, 2, "made up")
    )
    assert (c.attempts, c.preemptions, c.billed_hours, c.spot_usd, c.saving) == (1, 0, 0, 0, 0)
    c = cost.realized_from_managed_job({"job_duration": 1800.0}, cost.Prices(9.5, 30.0, 2, "m"))
    assert (c.attempts, c.billed_hours, c.kept_hours, c.overhead_usd) == (1, 1.0, 1.0, 0.0)
    assert (c.spot_usd, c.on_demand_usd) == (9.5, 30.0)  # one node-hour: 30 min on 2 nodes


def test_the_gpu_offer_is_the_recipes_gpu_at_its_cheapest_spot_price():
    r = Recipe.from_yaml(resolve_recipe("vicuna-7b"))  # A100-80GB:8, on gcp or aws
    expected = cost.Prices(
        11.8, 37.5, 1, "gcp us-central1 a2-ultragpu-8g (SkyPilot catalog, median of 1 zones)"
    )
    assert cost.prices_for(r) == expected
    lower = replace(r, "resources", accelerator="a100-80gb")
    assert cost.prices_for(lower) == expected
    with pytest.raises(ValueError, match="no catalog offer for H100:8"):
        cost.prices_for(replace(r, "resources", accelerator="H100"))
    # The catalog has A100s eight to a node only; other GPUs (an L4) come one to a node.
    with pytest.raises(ValueError, match="no catalog offer for A100:1"):
        cost.prices_for(replace(r, "resources", accelerator="A100", gpus_per_node=1))


def test_a_cloud_without_a_local_catalog_is_an_error_not_a_download():
    for name in ("vicuna-7b", "tiny-cpu"):
        r = replace(Recipe.from_yaml(resolve_recipe(name)), "resources", clouds=["aws", "azure"])
        with pytest.raises(ValueError, match="no local SkyPilot catalog for azure"):
            cost.prices_for(r)


def test_a_cpu_recipe_is_priced_on_its_first_cloud():
    tiny = Recipe.from_yaml(resolve_recipe("tiny-cpu"))
    gcp = cost.prices_for(replace(tiny, "resources", clouds=["gcp", "aws"]))
    assert gcp == cost.Prices(0.03, 0.10, 1, "gcp n2-standard-2 (SkyPilot catalog)")
    default = cost.prices_for(replace(tiny, "resources", clouds=[]))  # none named: AWS
    assert default == cost.Prices(0.04, 0.10, 1, "aws m6i.large (SkyPilot catalog)")


def test_preemptions_count_the_preempted_attempts_as_read_back_from_the_job_record(tmp_path):
    """Statuses come back from the job's JSON record (new strings, not the literals)."""
    statuses = json.loads('["PREEMPTED", "PREEMPTED", "FAILED", "SUCCEEDED"]')
    attempts = [
        attempt(tmp_path, n, 10.0 * n, 10.0 * n + 10, range(1, 3), status=status)
        for n, status in enumerate(statuses, 1)
    ]
    job = LocalJob("run", "task-1", str(tmp_path), attempts=attempts)
    c = cost.realized(job, cost.Prices(3.6, 10.8, 1, "made up"))
    assert (c.attempts, c.preemptions) == (4, 2)
