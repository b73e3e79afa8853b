import shutil
from pathlib import Path

import pytest
import yaml

from vicuna_sky.launch import tasks
from vicuna_sky.launch.tasks import Spec, SpecError, load_task, parse_env_overrides
from vicuna_sky.recipe import Recipe

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
WORKER_ENV = {"CONTROLLER_URL": "http://127.0.0.1:8000"}


def recipe(name: str) -> Recipe:
    return Recipe.from_yaml(ROOT / "recipes" / f"{name}.yaml")


def test_every_spec_validates_with_skypilot_as_is():
    import sky

    for spec in Spec:
        task = sky.Task.from_yaml(str(ROOT / "sky" / spec.value))
        if task.service is not None:
            sky.serve.validate_service_task(task, pool=False)
    assert {p.name for p in (ROOT / "sky").glob("*.yaml")} == {s.value for s in Spec}


@pytest.mark.parametrize("recipe_path", RECIPES, ids=lambda p: p.stem)
@pytest.mark.parametrize("spec", list(Spec), ids=lambda s: s.value)
def test_every_spec_validates_for_every_recipe(recipe_path, spec):
    r = Recipe.from_yaml(recipe_path)
    task = load_task(spec, r, WORKER_ENV if spec is Spec.WORKER else None)
    declared = yaml.safe_load((ROOT / "sky" / spec.value).read_text())["envs"]
    for key, value in r.envs().items():
        if key in declared:
            assert task.envs[key] == value
    if spec is Spec.CONTROLLER:
        assert all(not res.use_spot and not res.accelerators for res in task.resources)


def test_train_resources_come_from_the_recipe():
    task = load_task(Spec.TRAIN, recipe("vicuna-13b"))
    assert {str(r.cloud) for r in task.resources} == {"GCP", "AWS"}
    # Every GPU type the recipe accepts, on every cloud: SkyPilot's own Resources hold the set,
    # so its optimizer and its recovery may move between them.
    assert {(str(r.cloud), *r.accelerators.items()) for r in task.resources} == {
        (cloud, (gpu, 8)) for cloud in ("GCP", "AWS") for gpu in ("A100-80GB", "H100", "A100")
    }
    for res in task.resources:
        assert res.use_spot
        assert res.job_recovery["strategy"] == "EAGER_NEXT_REGION"
        # Restarts after a crash are counted by the run (MAX_RESTARTS_ON_ERRORS), so that a
        # failure no restart fixes ends the job once: SkyPilot's own counter stays at 0.
        assert res.job_recovery["max_restarts_on_errors"] == 0
        assert res.job_recovery["recover_on_exit_codes"] == [75, 76]
    assert task.envs["MAX_RESTARTS_ON_ERRORS"] == "3"
    assert task.workdir == str(ROOT)
    assert list(task.storage_mounts) == ["/vicuna-bucket"]
    assert task.storage_mounts["/vicuna-bucket"].source == "gs://vicuna-sky-bucket"


def test_cpu_recipe_has_no_accelerator_and_regions_become_infra():
    r = recipe("tiny-cpu")
    task = load_task(Spec.TRAIN, r)
    assert all(not res.accelerators for res in task.resources)
    import dataclasses

    pinned = dataclasses.replace(
        r, resources=dataclasses.replace(r.resources, regions=["aws/us-east-1"])
    )
    (res,) = load_task(Spec.TRAIN, pinned).resources
    assert (str(res.cloud), res.region) == ("AWS", "us-east-1")
    # The fleet's controller too: small, CPU, on-demand, but where the recipe allows.
    (res,) = load_task(Spec.CONTROLLER, pinned).resources
    assert (str(res.cloud), res.region, res.use_spot) == ("AWS", "us-east-1", False)
    assert not res.accelerators


def test_env_overrides_apply_and_typos_are_caught():
    task = load_task(Spec.TRAIN, recipe("vicuna-7b"), {"LR": "1e-5", "BUCKET_URL": "s3://mine"})
    assert task.envs["LR"] == "1e-5"
    # Env vars reach the bucket mount, exactly as `sky launch --env` does.
    assert task.storage_mounts["/vicuna-bucket"].source == "s3://mine"
    with pytest.raises(
        SpecError, match=r"train.yaml declares no env 'LRR' \(did you mean 'LR'\?\)"
    ):
        load_task(Spec.TRAIN, recipe("vicuna-7b"), {"LRR": "1"})


def test_parse_env_overrides():
    assert parse_env_overrides(["A=1", "B=x=y", "C="]) == {"A": "1", "B": "x=y", "C": ""}
    with pytest.raises(SpecError, match="--env expects KEY=VALUE, got 'nope'"):
        parse_env_overrides(["nope"])


@pytest.fixture
def spec_dir(tmp_path, monkeypatch):
    """A copy of sky/ that a test may break."""
    copy = tmp_path / "sky"
    shutil.copytree(ROOT / "sky", copy)
    monkeypatch.setattr(tasks, "spec_path", lambda spec: copy / spec.value)
    return copy


def test_broken_spec_gives_one_line_error(spec_dir):
    train = spec_dir / "train.yaml"
    config = yaml.safe_load(train.read_text())
    config["resources"]["use_spott"] = True
    train.write_text(yaml.safe_dump(config))
    with pytest.raises(SpecError) as e:
        load_task(Spec.TRAIN, recipe("vicuna-7b"))
    assert str(e.value).startswith("train.yaml: ")
    assert "use_spott" in str(e.value)
    assert "\n" not in str(e.value)
    train.write_text("name: [\n")
    with pytest.raises(SpecError, match="cannot read the spec"):
        load_task(Spec.TRAIN, recipe("vicuna-7b"))


def test_service_checks_are_skypilots(spec_dir):
    service = spec_dir / "service.yaml"
    config = yaml.safe_load(service.read_text())
    # SkyServe replaces preempted replicas itself; job_recovery there is a mistake.
    config["resources"]["job_recovery"] = {"strategy": "FAILOVER"}
    service.write_text(yaml.safe_dump(config))
    with pytest.raises(SpecError, match="job_recovery is disabled for SkyServe"):
        load_task(Spec.SERVICE, recipe("vicuna-7b"))


def test_service_readiness_probe_needs_no_key_and_the_api_does():
    task = load_task(Spec.SERVICE, recipe("vicuna-13b"))
    assert task.service.readiness_path == "/ready" and task.service.post_data is None
    assert "VICUNA_SKY_API_KEYS" in task.secrets and "VICUNA_SKY_API_KEYS" not in task.envs
    assert task.service.dynamic_ondemand_fallback
    assert all(res.use_spot for res in task.resources)


def test_every_serving_spec_takes_the_recipes_template():
    """serve-worker.yaml, service.yaml and eval.yaml prompt the model with the template it was
    trained with (the recipe's model.template), and pass it on to the worker."""
    smol = recipe("smollm2-cpu")
    assert smol.model.template == "chat_template"
    for spec in (Spec.WORKER, Spec.SERVICE, Spec.EVAL):
        task = load_task(spec, smol, WORKER_ENV if spec is Spec.WORKER else None)
        assert task.envs["TEMPLATE"] == "chat_template", spec
        assert '--template "$TEMPLATE"' in task.run, spec


def test_built_in_model_names_resolve_in_every_model_env(tmp_path):
    """A recipe copied from smollm2-cpu.yaml names built-in models as its base and its eval
    baseline: the local backend makes each once under RUNS/models and points the task at the
    directory (the eval used to look for `smollm2-135m` in the bucket, then on the hub)."""
    from vicuna_sky.localcloud.backend import builtin_models
    from vicuna_sky.localcloud.cluster import LocalConfig

    raw = yaml.safe_load((ROOT / "recipes" / "smollm2-cpu.yaml").read_text())
    raw["model"]["path"] = raw["eval"]["baseline_path"] = "tiny-llama"
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(raw))
    task = load_task(Spec.EVAL, Recipe.from_yaml(tmp_path / "mine.yaml"))
    assert task.envs["BASELINE_PATH"] == "tiny-llama"
    builtin_models(task, LocalConfig(runs_dir=tmp_path / "runs"))
    made = tmp_path / "runs" / "models" / "tiny-llama"
    assert task.envs["BASELINE_PATH"] == str(made) and (made / "config.json").is_file()
    assert task.envs["SERVE_MODEL_PATH"] == "models/vicuna-smol"  # the trained one: the bucket's


def test_the_dry_run_yaml_reads_like_the_spec():
    """setup: and run: as `|` blocks (not one quoted line of \\n), no YAML aliases, and the
    text loads back to the same task configuration."""
    task = load_task(Spec.TRAIN, recipe("tiny-cpu"))
    text = tasks.resolved_yaml(task)
    assert "\nrun: |\n" in text and "\nsetup: |\n" in text
    assert "&id" not in text and "*id" not in text
    loaded = yaml.safe_load(text)
    assert loaded["run"].strip() == "\n".join(
        line.rstrip() for line in task.run.strip().splitlines()
    )


def test_a_failed_eval_step_still_lets_skypilot_flush_the_bucket(tmp_path):
    """SkyPilot appends its wait for the MOUNT_CACHED upload after the run script (0.14.1,
    backends/task_codegen.py:146-193); a `set -e` script that exits at its failing step never
    reaches it, and the answers written so far are lost at teardown. Run as SkyPilot runs it:
    the spec's own script, then an epilogue that reports the status it was left."""
    import os
    import subprocess
    import sys

    spec = yaml.safe_load((ROOT / "sky" / "eval.yaml").read_text())
    epilogue = '\n__skypilot_user_exit_code=$?\necho "flushed after $__skypilot_user_exit_code"\n'
    script = spec["run"] + epilogue + "exit $__skypilot_user_exit_code\n"
    env = {k: str(v) for k, v in spec["envs"].items()}
    env |= {"BUCKET_DIR": str(tmp_path), "BENCH": str(tmp_path / "no-such-questions.jsonl")}
    env |= {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HOME": str(tmp_path)}
    ran = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
    assert "no such file" in ran.stderr  # the first step failed
    assert ran.returncode == 2 and "flushed after 2" in ran.stdout, (ran.stdout, ran.stderr)


@pytest.mark.parametrize("spec", [Spec.CONTROLLER, Spec.WORKER, Spec.SERVICE, Spec.EVAL])
def test_serving_and_evaluation_stay_on_the_buckets_cloud_unless_told(spec):
    """A worker on another cloud than its bucket reads the model across clouds at every
    (re)launch, and a controller belongs with its workers: both stay on the bucket's cloud,
    as training does, unless --any-cloud (or the recipe names only other clouds)."""
    import dataclasses

    extra = {"CONTROLLER_URL": "https://CONTROLLER:8002"} if spec is Spec.WORKER else None

    def clouds(recipe: Recipe, any_cloud: bool = False) -> set[str]:
        task = load_task(spec, recipe, extra, any_cloud=any_cloud)
        return {str(r.cloud).lower() for r in task.resources}

    base = Recipe.from_yaml(ROOT / "recipes" / "vicuna-7b.yaml")  # gs://, clouds gcp and aws
    assert clouds(base) == {"gcp"}
    assert clouds(dataclasses.replace(base, bucket="s3://mine")) == {"aws"}
    assert clouds(base, any_cloud=True) == {"gcp", "aws"}
    assert clouds(dataclasses.replace(base, bucket="r2://mine")) == {"gcp", "aws"}  # no cloud
    aws_only = dataclasses.replace(base.resources, clouds=["aws"])
    assert clouds(dataclasses.replace(base, resources=aws_only)) == {"aws"}  # its choice
