"""What `train` takes from the plan: the checkpoint interval, the GPU types offered to SkyPilot,
and the budget check (on the session's made-up catalog, as a launch reads SkyPilot's own)."""

import dataclasses
import re
from pathlib import Path

import pytest

from vicuna_sky.errors import VicunaSkyError
from vicuna_sky.launch.runner import check_budget, train_plan
from vicuna_sky.launch.tasks import Spec, load_task
from vicuna_sky.recipe import Recipe

ROOT = Path(__file__).resolve().parents[2]


def recipe(name: str) -> Recipe:
    return Recipe.from_yaml(ROOT / "recipes" / f"{name}.yaml")


def replace(r: Recipe, section: str, **changes) -> Recipe:
    return dataclasses.replace(r, **{section: dataclasses.replace(getattr(r, section), **changes)})


def test_train_launches_with_the_planned_interval_and_gpu_types(clouds_enabled):
    r = recipe("vicuna-7b")
    task = load_task(Spec.TRAIN, r, {})
    plan, why = train_plan(r, task, {})
    assert why == "" and plan.best.every_steps != r.train.checkpoint_every_steps
    assert task.envs["CHECKPOINT_EVERY_STEPS"] == str(plan.best.every_steps)
    # The made-up catalog has no H100: SkyPilot is offered the two types that have an offer.
    assert sorted(plan.launch_set) == ["A100-80GB:8", "A100:8"]
    assert {next(iter(res.accelerators)) for res in task.resources} == {"A100", "A100-80GB"}
    # The plan kept the run on the gs:// bucket's cloud; so does the task SkyPilot gets.
    assert plan.egress["mode"] == "restricted" and {str(x.cloud) for x in task.resources} == {"GCP"}
    # The user's --env wins; so does a recipe that keeps its own number.
    task = load_task(Spec.TRAIN, r, {"CHECKPOINT_EVERY_STEPS": "7"})
    train_plan(r, task, {"CHECKPOINT_EVERY_STEPS": "7"})
    assert task.envs["CHECKPOINT_EVERY_STEPS"] == "7"
    own = replace(r, "plan", use_planned_interval=False)
    task = load_task(Spec.TRAIN, own, {})
    train_plan(own, task, {})
    assert task.envs["CHECKPOINT_EVERY_STEPS"] == "100"


def test_no_offer_means_no_plan_and_a_refused_budget_check(clouds_enabled):
    nowhere = replace(recipe("vicuna-7b"), "resources", accelerator="H100", accelerators=[])
    task = load_task(Spec.TRAIN, nowhere, {})
    plan, why = train_plan(nowhere, task, {})
    assert plan is None and "no gcp catalog offers H100 with 8 per node" in why
    assert task.envs["CHECKPOINT_EVERY_STEPS"] == "100"
    # The budget check does not pass silently on a plan that could not be made.
    with pytest.raises(VicunaSkyError, match=re.escape("no gcp catalog offers H100")):
        check_budget(nowhere, over_budget=False)
