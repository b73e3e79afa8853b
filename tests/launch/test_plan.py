"""Cost plans from SkyPilot's catalog and optimizer, on the made-up fixture catalog."""

import dataclasses
import json
import math
import re
import shutil
from pathlib import Path

import pytest

from vicuna_sky.launch.plan import make_plan, throughput
from vicuna_sky.recipe import Recipe, RecipeError

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


def replace(r: Recipe, section: str, **changes) -> Recipe:
    return dataclasses.replace(r, **{section: dataclasses.replace(getattr(r, section), **changes)})


def test_throughput_measured_scaled_transferred_or_assumed():
    r = replace(recipe("vicuna-7b"), "train", packing=True)
    # The recipe's own measurement wins.
    measured = replace(r, "plan", tokens_per_gpu_second=3000)
    assert throughput(measured).per_gpu == 3000 and throughput(measured).source == "recipe"
    # The same GPU measured (H200, packed): scaled by FLOPs per token from the 1.88B shape.
    h200 = throughput(replace(r, "resources", accelerator="H200"))
    assert h200.source == "measured"
    assert h200.per_gpu == pytest.approx(30_857 * 1.88 / 6.74)
    assert "30,857 tokens/s" in h200.basis and "scaled by FLOPs per token" in h200.basis
    # Nothing measured on A100: the H200 row's MFU (6N: 35.2 %) applied to A100's peak.
    a100 = throughput(r)
    mfu = 6 * 1.88e9 * 30_857 / 989e12
    assert a100.source == "measured-mfu"
    assert a100.per_gpu == pytest.approx(mfu * 312e12 / (6 * 6.74e9))
    assert "measured MFU 35.2% on H200" in a100.basis
    # Unpacked: the unpacked measurement (2.9 %), never the packed one.
    unpacked = throughput(replace(r, "train", packing=False))
    assert unpacked.per_gpu == pytest.approx(2_535 * 6 * 1.88e9 / 989e12 * 312e12 / (6 * 6.74e9))
    # Nothing measured of the kind: the recipe's MFU, at 6 x params FLOPs per token.
    assumed = throughput(r, rows=[])
    assert assumed.source == "assumed-mfu"
    assert assumed.per_gpu == pytest.approx(0.4 * 312e12 / (6 * 6.74e9))
    assert assumed.basis.startswith("assumed: 40% MFU")


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


def test_plan_json_has_every_figure(cli, clouds_enabled):
    out = cli("plan", str(ROOT / "recipes" / "vicuna-7b.yaml"), "--json")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["tokens"]["source"] == "estimate" and plan["tokens"]["total"] == 270e6
    assert "data.tokens" in plan["tokens"]["basis"]
    rate = plan["tokens_per_gpu_second"]
    assert rate["value"] > 0 and rate["source"] in ("measured", "measured-mfu", "assumed-mfu")
    assert plan["hours"]["training"] > 0 and plan["billed_hours"] > plan["hours"]["training"]
    ck = plan["checkpoint"]
    assert ck["size_gb"] == pytest.approx(6.74 * 12)
    assert ck["every_steps"] >= 1 and ck["recipe_every_steps"] == 100
    assert 0 < ck["expected_overhead"]["fraction"] < 1
    assert set(plan["emergency_checkpoint"]) == {"aws", "gcp"}
    assert plan["emergency_checkpoint"]["gcp"]["window_seconds"] == 30
    assert plan["emergency_checkpoint"]["aws"]["window_seconds"] == 120
    offers = plan["offers"]
    assert [o["expected_spot_usd"] for o in offers] == sorted(
        o["expected_spot_usd"] for o in offers
    )
    assert plan["expected_spot_usd"] == offers[0]["expected_spot_usd"]
    assert plan["expected_spot_usd"] < plan["on_demand_usd"]
    assert plan["usd_per_million_tokens"] == pytest.approx(plan["expected_spot_usd"] / 270)
    assert plan["seed"]["usd"] == 140 and "Vicuna" in plan["seed"]["source"]


def test_young_daly_interval_in_steps(clouds_enabled):
    r = replace(recipe("vicuna-7b"), "train", packing=True)
    plan = make_plan(r)
    ck, best = plan.checkpointing, plan.best
    # 80.9 GB on one node: training waits while it is copied to host memory (10 GB/s), then it
    # is written (0.4 GB/s) and uploaded (0.5 GB/s) in the background. One preemption per 10 h.
    assert ck.stall_seconds == pytest.approx(6.74e9 * 12 / 10e9)
    assert ck.write_seconds == pytest.approx(6.74e9 * 12 / 0.4e9)
    assert ck.commit_seconds == pytest.approx(6.74e9 * 12 / 0.4e9 + 6.74e9 * 12 / 0.5e9)
    tau = math.sqrt(2 * ck.stall_seconds * 36_000)
    assert tau > ck.commit_seconds
    assert best.every_steps == round(tau / ck.step_seconds)
    assert best.run.commit_lag_seconds == ck.commit_seconds
    # Two nodes save synchronously: training waits for the write of each node's half.
    two = make_plan(replace(r, "resources", nodes=2)).checkpointing
    assert two.stall_seconds == two.write_seconds == pytest.approx(6.74e9 * 12 / 0.8e9)
    assert two.commit_seconds == two.upload_seconds
    # Preempted often, Young/Daly would checkpoint faster than a checkpoint commits: the floor.
    flaky = make_plan(replace(r, "plan", preemptions_per_hour=20.0)).best
    assert flaky.run.interval_seconds >= ck.commit_seconds - ck.step_seconds
    # Without stats: a step is a global batch of full 2048-token rows.
    assert ck.tokens_per_step == 128 * 2048
    assert ck.step_seconds == pytest.approx(128 * 2048 / (plan.tokens_per_gpu_second * 8))
    # The 13B seed figure, and none for a size the seed never trained.
    assert make_plan(recipe("vicuna-13b")).seed_usd == 300
    assert make_plan(replace(r, "model", params_b=30.0)).seed_usd is None


def test_offers_ranked_by_expected_cost_not_list_price(clouds_enabled):
    r = replace(recipe("vicuna-7b"), "train", packing=True)
    cheap_but_flaky = replace(r, "plan", preemption_rates={"gcp": 1.0, "aws/us-west-2": 0.01})
    plan = make_plan(cheap_but_flaky)
    assert plan.spot[0].cloud == "GCP"  # the lowest list price
    assert (plan.best.cloud, plan.best.region) == ("AWS", "us-east-1")
    rates = {(o.cloud, o.region): o.preemptions_per_hour for o in plan.offers}
    assert rates[("GCP", "us-central1")] == 1.0 and rates[("AWS", "us-west-2")] == 0.01
    assert rates[("AWS", "us-east-1")] == 0.1
    # More preemptions: a shorter interval on that offer.
    steps = {(o.cloud, o.region): o.every_steps for o in plan.offers}
    assert steps[("GCP", "us-central1")] < steps[("AWS", "us-east-1")] < steps[("AWS", "us-west-2")]


def test_emergency_checkpoint_fits_aws_not_gcp_for_a_small_model(clouds_enabled):
    small = replace(replace(recipe("vicuna-7b"), "train", packing=True), "model", params_b=1.1)
    plan = make_plan(small)
    # 13.2 GB: written in 33 s, uploaded in 26 s, plus the step in flight.
    ck = plan.checkpointing
    assert ck.emergency_seconds == pytest.approx(33 + 26.4 + ck.step_seconds)
    emergency = plan.emergency()
    assert emergency["aws"]["fits"] and not emergency["gcp"]["fits"]
    assert "periodic checkpoint" in emergency["gcp"]["then"]
    aws = next(o for o in plan.offers if o.cloud == "AWS")
    gcp = next(o for o in plan.offers if o.cloud == "GCP")
    assert aws.run.lost_seconds == 120  # no work lost, the window billed
    assert gcp.run.lost_seconds > gcp.run.interval_seconds / 2


def write_recipe(tmp_path, data: Path, extra: str = "") -> Path:
    text = (ROOT / "recipes" / "vicuna-7b.yaml").read_text()
    text = text.replace("path: data/sharegpt_clean_split.json", f"path: {data}")
    text = text.replace("  mfu: 0.4\n", f"  mfu: 0.4\n{extra}")
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_tokens_from_the_data_stats_file(cli, tmp_path, clouds_enabled):
    data = tmp_path / "split.json"
    shutil.copy(ROOT / "tests" / "fixtures" / "fastchat" / "dummy_conversation.json", data)
    tokenizer = ROOT / "tests" / "fixtures" / "tokenizers" / "llama2"
    out = cli("data", "stats", str(data), "--tokenizer", str(tokenizer), "--write")
    assert out.returncode == 0, out.stderr
    stats = json.loads((tmp_path / "split.stats.json").read_text())
    assert stats["max_length"] == 2048 and 0 < stats["packs"] < stats["samples"] == 500
    unpacked = replace(Recipe.from_yaml(write_recipe(tmp_path, data)), "train", packing=False)
    plan = make_plan(unpacked)
    tc = plan.token_count
    assert (tc.per_epoch, tc.measured) == (stats["tokens"], True)
    assert plan.tokens == 3 * stats["tokens"]
    assert tc.sequences == stats["samples"]  # unpacked: one sample per sequence
    assert plan.checkpointing.steps_basis.startswith("500 sequences")
    packed = make_plan(
        replace(Recipe.from_yaml(write_recipe(tmp_path, data)), "train", packing=True)
    )
    assert packed.token_count.sequences == stats["packs"]
    # The data changed after it was counted: back to the recipe's estimate, saying why.
    with data.open("a") as f:
        f.write(" ")
    stale = make_plan(Recipe.from_yaml(write_recipe(tmp_path, data)))
    assert not stale.token_count.measured and "older than" in stale.token_count.basis
    # A stats file named in the recipe must exist.
    missing = write_recipe(tmp_path, data, "  data_stats: nowhere.stats.json\n")
    with pytest.raises(ValueError, match=re.escape("data_stats nowhere.stats.json does not exist")):
        make_plan(Recipe.from_yaml(missing))


@pytest.mark.parametrize(
    ("yaml", "message"),
    [
        ("  write_gb_per_second: 0\n", "'plan.write_gb_per_second' must be positive"),
        ("  preemptions_per_hour: -1\n", "'plan.preemptions_per_hour' must not be negative"),
        ("  checkpoint_bytes_per_param: 0.5\n", "'plan.checkpoint_bytes_per_param' must be in"),
        ("  preemption_rates: {gcp: -0.5}\n", "'plan.preemption_rates.gcp' must not be negative"),
        ("  preemption_rates: {a/b/c: 0.5}\n", "keyed 'cloud' or 'cloud/region'"),
        ("  preemption_rates: [1]\n", "'plan.preemption_rates' must be a mapping"),
        ("  preemption_rates: {gcp: fast}\n", "'plan.preemption_rates.gcp' must be a number"),
    ],
)
def test_plan_section_checked(tmp_path, yaml, message):
    with pytest.raises(RecipeError, match=re.escape(message)):
        Recipe.from_yaml(write_recipe(tmp_path, Path("data/x.json"), yaml))


def test_pack_count_is_the_trainers_packing():
    import random

    from vicuna_sky.data.pipeline import pack_count
    from vicuna_sky.data.tokenize import IGNORE_INDEX, Tokenized, pack

    rng = random.Random(0)
    for max_length in (8, 64, 2048):
        lengths = [rng.choice([0, 1, 3, 7, 8, 40, 64, 100, 3000]) for _ in range(300)]
        samples = [Tokenized([1] * n, [IGNORE_INDEX] * n) for n in lengths]
        assert pack_count(lengths, max_length) == len(pack(samples, max_length))


def test_train_launches_with_the_planned_interval(clouds_enabled):
    from vicuna_sky.launch.runner import train_plan
    from vicuna_sky.launch.tasks import Spec, load_task

    r = recipe("vicuna-7b")
    task = load_task(Spec.TRAIN, r, {})
    plan, why = train_plan(r, task, {})
    assert why == "" and plan.best.every_steps != r.train.checkpoint_every_steps
    assert task.envs["CHECKPOINT_EVERY_STEPS"] == str(plan.best.every_steps)
    # The user's --env wins; so does a recipe that keeps its own number.
    task = load_task(Spec.TRAIN, r, {"CHECKPOINT_EVERY_STEPS": "7"})
    train_plan(r, task, {"CHECKPOINT_EVERY_STEPS": "7"})
    assert task.envs["CHECKPOINT_EVERY_STEPS"] == "7"
    own = replace(r, "plan", use_planned_interval=False)
    task = load_task(Spec.TRAIN, own, {})
    train_plan(own, task, {})
    assert task.envs["CHECKPOINT_EVERY_STEPS"] == "100"
    # No plan (no offer for this GPU in the catalog): the recipe's number, and why.
    nowhere = replace(r, "resources", accelerator="H100")
    task = load_task(Spec.TRAIN, nowhere, {})
    plan, why = train_plan(nowhere, task, {})
    assert plan is None or plan.best is None
    assert task.envs["CHECKPOINT_EVERY_STEPS"] == "100"
