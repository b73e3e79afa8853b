"""Cost plans from SkyPilot's catalog and optimizer, on the made-up fixture catalog."""

import dataclasses
from pathlib import Path

import pytest

from vicuna_sky.launch.plan import make_plan, throughput
from vicuna_sky.recipe import Recipe

ROOT = Path(__file__).resolve().parents[2]


def recipe(name: str) -> Recipe:
    return Recipe.from_yaml(ROOT / "recipes" / f"{name}.yaml")


def test_cheapest_candidates_across_clouds(clouds_enabled):
    plan = make_plan(recipe("vicuna-7b"))
    # GCP prices a node as accelerator + host VM: 8.00 + 0.60 spot, 25.00 + 2.00 on demand.
    assert [(c.cloud, c.region, c.instance_type) for c in plan.spot] == [
        ("GCP", "us-central1", "a2-highgpu-8g"),
        ("AWS", "us-east-1", "p4d.24xlarge"),
        ("GCP", "europe-west4", "a2-highgpu-8g"),
        ("AWS", "us-west-2", "p4d.24xlarge"),
    ]
    assert plan.spot[0].hourly_usd == pytest.approx(8.6)
    assert plan.on_demand[0].hourly_usd == pytest.approx(27.0)
    # The run's $ is the node price times the estimated wall-clock hours.
    assert plan.cost(plan.spot[0]) == pytest.approx(8.6 * plan.hours)
    assert plan.cost(plan.on_demand[0]) > 3 * plan.cost(plan.spot[0])
    assert "GCP/us-central1" in plan.optimizer_choice and "spot" in plan.optimizer_choice


def test_duration_from_tokens_and_assumed_mfu():
    r = recipe("vicuna-7b")
    rate, basis = throughput(r)
    # 40% of 312 TFLOP/s over 8 FLOPs x 6.74e9 parameters per token (with recomputation).
    assert rate == pytest.approx(0.4 * 312e12 / (8 * 6.74e9))
    assert basis.startswith("assumed: 40% MFU of A100")
    measured = dataclasses.replace(r, plan=dataclasses.replace(r.plan, tokens_per_gpu_second=3000))
    assert throughput(measured) == (3000, "measured: 3,000 tokens/s per GPU (recipe plan section)")


def test_regions_and_budget_narrow_the_plan(clouds_enabled):
    r = recipe("vicuna-13b")
    pinned = dataclasses.replace(
        r,
        resources=dataclasses.replace(r.resources, clouds=["aws"], regions=["aws/us-east-1"]),
        budget_usd=1.0,
    )
    plan = make_plan(pinned)
    assert {(c.cloud, c.region) for c in plan.spot + plan.on_demand} == {("AWS", "us-east-1")}
    assert plan.spot[0].instance_type == "p4de.24xlarge"
    assert plan.over_budget
    assert "AWS/us-east-1" in plan.optimizer_choice


def test_cpu_recipe_has_no_gpu_plan():
    with pytest.raises(ValueError, match="GPU recipes"):
        make_plan(recipe("tiny-cpu"))
