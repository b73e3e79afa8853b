"""Plans on the real catalog fixture: GPU types, region offers, spot or on demand, enabled clouds,
egress, SkyPilot's own choice, the seed; and one offer priced by hand."""

import math

import pytest

from vicuna_sky.plan import PlanError, make_plan
from vicuna_sky.plan.spot import RELAUNCH_MINUTES

from .conftest import BOTH, REAL_CATALOG, recipe, replace


def plan_of(r, **kw):
    kw.setdefault("catalog_dir", REAL_CATALOG)
    kw.setdefault("enabled", BOTH)
    return make_plan(r, **kw)


def with_gpus(r, *gpus):
    return replace(r, "resources", accelerators=list(gpus))


def test_13b_offers_h100_below_a100_80gb_and_l4_does_not_fit():
    r = with_gpus(recipe("vicuna-13b"), "A100-80GB:8", "H100:8", "A100:8", "L4:8")
    plan = plan_of(r)
    status = {o.gpu: o.status for o in plan.options}
    assert status == {"A100-80GB": "fits", "H100": "fits", "A100": "fits", "L4": "does not fit"}
    assert "L4" not in {o.option.gpu for o in plan.offers}  # listed, never offered
    cheapest = {}
    for o in plan.offers:
        cheapest.setdefault(o.option.gpu, o.usd)
    # H100 is 3.2x the peak of an A100 for less than 2x the price per hour.
    assert cheapest["H100"] < cheapest["A100-80GB"]
    assert plan.best.option.gpu == "H100"
    assert plan.launch_set[0] == "H100:8" and "L4:8" not in plan.launch_set
    assert [o.usd for o in plan.offers] == sorted(o.usd for o in plan.offers)
    # The bucket is gs://: offers stay on GCP, and the plan says so.
    assert {o.cloud for o in plan.offers} == {"gcp"} and plan.egress["mode"] == "restricted"


def test_one_offer_by_hand():
    """8 x A100 on GCP europe-west4 for vicuna-7b at a measured 3,000 tokens/s per GPU."""
    r = with_gpus(replace(recipe("vicuna-7b"), "plan", tokens_per_gpu_second=3000.0), "A100")
    r = replace(r, "resources", accelerator="A100")
    best = plan_of(r).best
    assert (best.cloud, best.region, best.price.instance_type) == (
        "gcp",
        "europe-west4",
        "a2-highgpu-8g",
    )
    # Prices (two zones, equal): GPUs 9.3528 + host 2.54592 spot; 12.90919 + 6.51251 on demand.
    spot_hourly = 9.3528 + 2.54592  # 11.89872
    on_demand_hourly = 12.90919 + 6.51251  # 19.4217
    # Work: 90M tokens x 3 epochs at 3,000 tokens/s x 8 GPUs = 11,250 s.
    work = 270e6 / (3000 * 8)
    # Checkpoint: 6.74e9 params x 12 bytes = 80.88 GB; training waits while it is staged at
    # 10 GB/s (8.088 s); written at 0.4 GB/s (202.2 s), then uploaded at 0.5 GB/s (161.76 s).
    stall, write, upload = 80.88 / 10, 80.88 / 0.4, 80.88 / 0.5
    commit = write + upload  # 363.96 s
    # A step: 128 x 2048 tokens / 24,000 tokens/s = 10.92 s.
    step = 128 * 2048 / 24_000
    # Young/Daly at 0.1 preemptions/h: sqrt(2 x 8.088 x 36,000) = 763.1 s > commit: 70 steps.
    steps = round(math.sqrt(2 * stall * 36_000) / step)
    assert steps == 70 and best.every_steps == 70
    tau = steps * step  # 764.59 s
    checkpoints = work / tau * stall  # 119.0 s
    # GCP's 30 s notice is too short for an emergency save (10.9 + 202.2 + 161.8 s): a
    # preemption loses half an interval + the upload lag, and the window.
    lost = tau / 2 + min(commit, tau) + 30
    # A relaunch: provisioning (5 min, assumed) + the measured install (41 s) and trainer start
    # (9.1 s), then the base model from the bucket (6.74B x 2 bytes at 0.5 GB/s, 26.96 s) and
    # the checkpoint (161.76 s).
    assert pytest.approx(5 * 60 + 41 + 9.1) == RELAUNCH_MINUTES * 60
    relaunch = (5 * 60 + 41 + 9.1) + 13.48 / 0.5 + upload  # 538.82 s
    billed = (work + checkpoints) / (1 - 0.1 / 3600 * (lost + relaunch))  # 11,800 s
    assert billed == pytest.approx(11_800.1, abs=0.1)
    assert best.run.billed_seconds == pytest.approx(billed)
    assert best.spot_usd == pytest.approx(billed / 3600 * spot_hourly)
    assert best.spot_usd == pytest.approx(39.00, abs=0.01)
    assert best.on_demand_usd == pytest.approx((work + checkpoints) / 3600 * on_demand_hourly)
    assert best.on_demand_usd == pytest.approx(61.34, abs=0.01)
    assert best.recommended == "spot" and best.usd == best.spot_usd


def test_a_high_preemption_rate_recommends_on_demand_at_a_finite_cost():
    r = replace(recipe("vicuna-13b"), "plan", preemptions_per_hour=5.0)
    plan = plan_of(r)
    assert plan.offers
    for o in plan.offers:
        assert o.spot_usd is None and o.recommended == "on-demand"
        assert math.isfinite(o.usd) and o.usd == o.on_demand_usd
        assert "never finishes" in o.why
    # The plan's figure, and the budget check's, is the recommended one.
    out = plan.to_dict()
    assert out["expected_usd"] == plan.best.on_demand_usd and out["expected_spot_usd"] is None
    assert out["recommended"] == "on-demand" and math.isfinite(out["expected_usd"])


def test_spot_dearer_than_on_demand_says_so():
    # At 1 preemption/h spot still finishes, but costs more than on demand here.
    r = replace(recipe("vicuna-13b"), "plan", preemptions_per_hour=1.0)
    plan = plan_of(r)
    dear = [o for o in plan.offers if o.spot_usd and o.spot_usd > o.on_demand_usd]
    assert dear and all(o.recommended == "on-demand" for o in dear)
    assert all("exceeds on demand" in o.why for o in dear)


def test_a_lower_case_gpu_name_works():
    r = replace(recipe("vicuna-13b"), "resources", accelerator="h100", accelerators=["h100:8"])
    plan = plan_of(r)
    assert [o.gpu for o in plan.options] == ["H100"] and plan.best.option.gpu == "H100"
    assert plan.best.option.throughput.per_gpu > 0


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"accelerator": "X100", "accelerators": []}, "unknown GPU 'X100': no gcp catalog"),
        ({"accelerator": "V100", "accelerators": []}, "no gcp catalog offers V100 with 8 per"),
        (
            {"regions": ["gcp/us-nowhere1"], "clouds": ["gcp"]},
            "resources.regions 'gcp/us-nowhere1' has no 8-GPU offer in the gcp catalog",
        ),
    ],
)
def test_an_unknown_gpu_or_region_is_an_error(changes, message):
    with pytest.raises(PlanError, match=message):
        plan_of(replace(recipe("vicuna-13b"), "resources", **changes))


def test_enabled_clouds_rank_first_and_none_enabled_still_plans():
    r = recipe("vicuna-13b")
    plan = plan_of(r, any_cloud=True, enabled=frozenset({"aws"}))
    flags = [o.enabled for o in plan.offers]
    assert flags == sorted(flags, reverse=True) and flags[0] and not flags[-1]
    assert {o.cloud for o in plan.offers if o.enabled} == {"aws"}
    assert plan.best.cloud == "aws"
    nothing = plan_of(r, enabled=frozenset())
    assert nothing.offers and not any(o.enabled for o in nothing.offers)
    assert nothing.to_dict()["enabled_clouds"] == []


def test_egress_is_avoided_or_priced():
    r = recipe("vicuna-7b")
    restricted = plan_of(r)
    assert {o.cloud for o in restricted.offers} == {"gcp"}
    assert all(o.spot_egress_usd == 0 for o in restricted.offers)
    wide = plan_of(r, any_cloud=True)
    aws = [o for o in wide.offers if o.cloud == "aws"]
    assert wide.egress["mode"] == "priced" and "0.09/GB" in wide.egress["note"]
    # Every periodic checkpoint crosses to the gs:// bucket at AWS's $0.09/GB, every relaunch
    # brings one back at GCP's $0.12/GB, and the bf16 export crosses once.
    o = aws[0]
    gb = o.checkpointing.size_bytes / 1e9
    saves = o.work_seconds / o.run.interval_seconds
    expected = (saves * gb + 6.74 * 2) * 0.09 + o.run.preemptions * gb * 0.12
    assert o.spot_egress_usd == pytest.approx(expected)
    assert all(x.spot_egress_usd == 0 for x in wide.offers if x.cloud == "gcp")


def test_skypilots_own_choice_is_named_where_it_differs():
    r = with_gpus(recipe("vicuna-7b"), "A100-80GB:8", "H100:8", "A100:8")
    plan = plan_of(r, any_cloud=True)
    sky = plan.skypilot_choice
    # SkyPilot prices us-east-1 at its cheapest zone, the $2.47 outlier the plan does not take.
    assert (sky.cloud, sky.region, sky.option.gpu) == ("aws", "us-east-1", "A100")
    assert plan.skypilot_price == pytest.approx(2.4655)
    assert sky is not plan.best and plan.to_dict()["skypilot_choice"]["differs"]


def test_the_seed_priced_at_its_own_settings():
    plan = plan_of(recipe("vicuna-7b"))
    seed = plan.seed
    assert seed["usd"] == 140 and "A100-80GB" in seed["source"]
    at = seed["at_seed_settings"]
    packed = seed["packed_same_gpu"]
    assert at["gpu"] == "A100-80GB" and at["packing"] is False
    # Unpacked rows train far fewer tokens per second: the same tokens cost more.
    assert at["spot_usd"] > packed["spot_usd"] and at["on_demand_usd"] > at["spot_usd"]


def test_the_rule_for_skypilots_choice_is_what_its_optimizer_picks(clouds_enabled):
    """SkyPilot's own optimizer, in-process on the session's catalog, given the set the launch
    passes: the planner's SKYPILOT_RULE names the same offer."""
    import sky
    from sky import optimizer, sky_logging
    from vicuna_sky.launch.tasks import Spec, resources_config

    r = recipe("vicuna-7b")
    plan = make_plan(r, enabled=BOTH, any_cloud=True)  # SkyPilot's catalog: the made-up one
    base = {"job_recovery": {"strategy": "EAGER_NEXT_REGION"}}
    config = resources_config(Spec.TRAIN, r, base, plan.launch_set)
    task = sky.Task(name="plan-check", run="true", num_nodes=1)
    task.set_resources(sky.Resources.from_yaml_config(config))
    with sky.Dag() as dag:
        dag.add(task)
    with sky_logging.silent():
        optimizer.Optimizer.optimize(dag, quiet=True)
    best = dag.tasks[0].best_resources
    mine = plan.skypilot_choice
    assert (str(best.cloud).lower(), best.region, *best.accelerators) == (
        mine.cloud,
        mine.region,
        mine.option.gpu,
    )
    assert best.get_cost(3600) == pytest.approx(plan.skypilot_price)
