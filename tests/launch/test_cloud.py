"""The cloud path against SkyPilot's own objects, with the SDK replaced at its boundary.

Tasks are built by `sky.Task.from_yaml_config` from the real specs in sky/ and the service is
checked by `sky.serve.validate_service_task`; only the calls that would go to SkyPilot's API
server (`sky.launch`, `sky.jobs.launch`, `sky.endpoints`, `sky.status`, `sky.jobs.queue_v2`,
`sky.serve.status`, ...) are replaced by `FakeSky`, which records them and answers from its own
state. No API server is started and nothing leaves this machine.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vicuna_sky.errors import VicunaSkyError
from vicuna_sky.launch import cloud, report, runner
from vicuna_sky.launch.skypilot_backend import SkyPilotBackend
from vicuna_sky.launch.tasks import (
    Spec,
    SpecError,
    checkpoint_url,
    load_task,
    missing_secrets,
    resolved_yaml,
)

from .conftest import NO_BUCKET, ROOT, SECRET_ENV, recipe

# -- 1. the fleet ---------------------------------------------------------------------------


# -- 2. an address the controller can reach ---------------------------------------------------


# -- 3. secrets --------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", list(Spec), ids=lambda s: s.value)
def test_secrets_come_from_the_environment_and_never_become_envs(spec, monkeypatch):
    for key, value in SECRET_ENV.items():
        monkeypatch.setenv(key, value)
    extra = {"CONTROLLER_URL": "http://CONTROLLER:8000"} if spec is Spec.WORKER else None
    task = load_task(spec, recipe(), extra)
    printed = resolved_yaml(task)
    for key, value in SECRET_ENV.items():
        assert key not in task.envs
        if value:
            assert value not in printed and value not in str(task.envs)
            if key in task.secrets:
                assert task.secrets[key].get_secret_value() == value
    assert "HF_TOKEN" in task.secrets or spec is Spec.CONTROLLER
    if spec is Spec.EVAL:
        assert task.secrets["OPENAI_API_KEY"].get_secret_value() == SECRET_ENV["OPENAI_API_KEY"]
        assert "OPENAI_API_KEY: <set, redacted>" in printed


def test_a_secret_on_the_command_line_is_refused():
    with pytest.raises(SpecError, match="OPENAI_API_KEY is a secret: export it"):
        load_task(Spec.EVAL, recipe(), {"OPENAI_API_KEY": "sk-on-the-command-line"})


def test_eval_launch_needs_the_judges_key_and_sends_it_as_a_secret(fake_sky, monkeypatch, tmp_path):
    options = dict(dryrun=False, backend=SkyPilotBackend(), name=None)
    with pytest.raises(VicunaSkyError, match=r"eval\.yaml needs OPENAI_API_KEY: export it"):
        runner.launch_recipe(Spec.EVAL, "vicuna-7b", (), **options)
    assert not fake_sky.calls  # refused before anything was launched (or paid for)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET_ENV["OPENAI_API_KEY"])
    runner.launch_recipe(Spec.EVAL, "vicuna-7b", (), **options)
    (_, name, _task, envs, secrets) = fake_sky.named("jobs.launch")[0]
    assert name == "vicuna-7b-eval" and "OPENAI_API_KEY" not in envs
    assert secrets["OPENAI_API_KEY"].get_secret_value() == SECRET_ENV["OPENAI_API_KEY"]
    local_judge = load_task(Spec.EVAL, recipe(), {"JUDGE_API_BASE": "local"}, environ={})
    assert missing_secrets(Spec.EVAL, local_judge) == []


def test_the_dry_run_prints_no_secret(cli, monkeypatch):
    for key, value in SECRET_ENV.items():
        monkeypatch.setenv(key, value)
    out = cli("eval", "launch", "vicuna-7b", "--dryrun")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "OPENAI_API_KEY: <set, redacted>" in out.stdout
    for value in filter(None, SECRET_ENV.values()):
        assert value not in out.stdout + out.stderr


# -- 4. serve.spot: false, min_replicas from the recipe -----------------------------------------


def test_an_on_demand_service_validates_without_the_spot_fallback():
    import sky

    task = load_task(Spec.SERVICE, recipe(spot=False, workers=3))  # validate_service_task inside
    sky.serve.validate_service_task(task, pool=False)
    assert all(not r.use_spot for r in task.resources)
    assert not task.service.dynamic_ondemand_fallback
    assert task.service.min_replicas == 3 and task.service.max_replicas == 4
    spot = load_task(Spec.SERVICE, recipe(workers=6))
    assert spot.service.dynamic_ondemand_fallback and all(r.use_spot for r in spot.resources)
    assert spot.service.min_replicas == 6 and spot.service.max_replicas == 6


# -- 5. status, each section on its own ------------------------------------------------------


@pytest.mark.parametrize("down", ["jobs", "serve", "both"])
def test_status_with_a_controller_down(fake_sky, down, capsys):
    fake_sky.jobs = [{"job_name": "vicuna-7b-train", "status": "RUNNING", "recovery_count": 2}]
    fake_sky.clusters = {"vic-controller": "UP"}
    fake_sky.services = [
        {
            "name": "vicuna",
            "status": "READY",
            "endpoint": "http://203.0.113.20:30001",
            "replica_info": [{"replica_id": 3, "status": "READY"}],
        }
    ]
    fake_sky.jobs_controller_up = down == "serve"
    fake_sky.serve_controller_up = down == "jobs"
    jobs, clusters, services = cloud.status()
    assert clusters.rows == [{"name": "vic-controller", "status": "UP"}]
    if down in ("jobs", "both"):
        assert jobs.note == "jobs controller not running" and not jobs.rows
    else:
        assert jobs.rows[0]["recoveries"] == "2" and not jobs.note
    if down in ("serve", "both"):
        assert services.note == "serve controller not running"
    else:
        assert services.rows[0]["replicas"] == "1/1 ready"
    report.print_status(local=False, runs_dir=Path("runs"))
    printed = capsys.readouterr().out
    assert "controller not running" in printed and "vic-controller" in printed


# -- 6. checkpoints keyed by the run name --------------------------------------------------------


def test_checkpoints_are_keyed_by_the_run_name(fake_sky, tmp_path):
    task = load_task(Spec.TRAIN, recipe())
    assert "SKYPILOT_TASK_ID" not in task.run.split("--checkpoint-url", 1)[1].splitlines()[0]
    assert '--checkpoint-url "$BUCKET_URL/runs/$RUN_NAME/$RUN_TAG"' in task.run
    assert checkpoint_url(task) == "gs://vicuna-sky-bucket/runs/vicuna-7b/main"
    options = dict(dryrun=False, backend=SkyPilotBackend(), name=None, skip_preflight=NO_BUCKET)
    # The data named in the bucket: nothing to upload (there is no bucket server here).
    data = ("DATA_PATH=data/train.json",)
    runner.launch_recipe(Spec.TRAIN, "tiny-cpu", data, **options)
    runner.launch_recipe(Spec.TRAIN, "tiny-cpu", data, fresh=True, **options)
    again, fresh = (call[3]["RUN_TAG"] for call in fake_sky.named("jobs.launch"))
    assert again == "main" and re.fullmatch(r"fresh-\d{8}T\d{6}Z", fresh)


def test_a_second_run_of_a_job_in_progress_is_refused(fake_sky, tmp_path):
    """Both would write under one checkpoint prefix: refused while the first is in progress
    (nothing launched), allowed with --fresh or once the first has ended."""
    options = dict(dryrun=False, backend=SkyPilotBackend(), name=None, skip_preflight=NO_BUCKET)
    data = ("DATA_PATH=data/train.json",)  # in the bucket: nothing to upload
    runner.launch_recipe(Spec.TRAIN, "tiny-cpu", data, **options)
    with pytest.raises(VicunaSkyError, match="vicuna-tiny-train is already running as a managed"):
        runner.launch_recipe(Spec.TRAIN, "tiny-cpu", data, **options)
    assert len(fake_sky.named("jobs.launch")) == 1
    # Another name, the same checkpoints (RUN_NAME, RUN_TAG): the job's task is named after
    # them, and that is what the check finds.
    assert fake_sky.jobs[0]["task_name"] == "vicuna-tiny.main"
    renamed = {**options, "name": "mine"}
    same = "vicuna-tiny-train, writing the same checkpoints, is already running as a managed job"
    with pytest.raises(VicunaSkyError, match=f"{same}: .* `vicuna-sky down vicuna-tiny-train`"):
        runner.launch_recipe(Spec.TRAIN, "tiny-cpu", data, **renamed)
    runner.launch_recipe(Spec.TRAIN, "tiny-cpu", (*data, "RUN_TAG=other"), **renamed)
    assert [c[1] for c in fake_sky.named("jobs.launch")] == ["vicuna-tiny-train", "mine"]
    # Other checkpoints under a job name in use: refused too (down and logs go by the name).
    with pytest.raises(VicunaSkyError, match="mine is already running as a managed"):
        runner.launch_recipe(Spec.TRAIN, "tiny-cpu", (*data, "RUN_TAG=third"), **renamed)
    fake_sky.jobs[0]["status"] = "SUCCEEDED"
    runner.launch_recipe(Spec.TRAIN, "tiny-cpu", data, **options)
    assert len(fake_sky.named("jobs.launch")) == 3


# -- 7. logs of a service --------------------------------------------------------------------------


def test_service_logs_pick_a_live_replica_or_the_one_asked_for(fake_sky):
    fake_sky.services = [
        {
            "name": "vicuna",
            "replica_info": [
                {"replica_id": 1, "status": "PREEMPTED"},
                {"replica_id": 4, "status": "READY"},
                {"replica_id": 5, "status": "STARTING"},
            ],
        }
    ]
    cloud.logs("vicuna", "service")
    cloud.logs("vicuna", "service", replica=5)
    ids = [call[2]["replica_id"] for call in fake_sky.named("serve.tail_logs")]
    assert ids == [4, 5]
    fake_sky.services = [{"name": "vicuna", "replica_info": []}]
    with pytest.raises(VicunaSkyError, match="has no replicas"):
        cloud.logs("vicuna", "service")
    fake_sky.serve_controller_up = False
    with pytest.raises(VicunaSkyError, match="serve controller is not running"):
        cloud.logs("vicuna", "service")


# -- 8. the dry run offline -----------------------------------------------------------------------


def test_the_dry_run_prints_the_task_offline(tmp_path, offline_env):
    """No catalog in HOME and no way out (a proxy on a closed loopback port): the catalog
    download fails at once, the task still prints and the plan says why it is missing."""
    env = offline_env
    exe = Path(sys.executable).parent / "vicuna-sky"
    out = subprocess.run(
        [str(exe), "train", "vicuna-7b", "--dryrun"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "RUN_TAG: main" in out.stdout and "A100: 8" in out.stdout
    assert "cost plan: unavailable (cannot read SkyPilot's catalog" in out.stdout
    # Which checkpoint interval the launch would use, and the task says the same.
    assert "checkpoint every 100 steps (the recipe's: no plan to choose by)" in out.stdout
    assert re.search(r"CHECKPOINT_EVERY_STEPS: '?100'?\n", out.stdout)


def test_the_dry_run_names_the_planned_checkpoint_interval_the_launch_uses(tmp_path, capsys):
    """With a catalog (the session's fixture), the plan's interval replaces the recipe's in
    the task, and the dry run says so beside the YAML that shows it."""
    runner.launch_recipe(
        Spec.TRAIN, "vicuna-7b", (), dryrun=True, backend=SkyPilotBackend(), name=None
    )
    out = capsys.readouterr().out
    said = re.search(r"checkpoint every (\d+) steps: the plan's Young/Daly interval", out)
    assert said, out[-3000:]
    assert said.group(1) != "100"  # not the recipe's
    assert re.search(rf"CHECKPOINT_EVERY_STEPS: '?{said.group(1)}'?\n", out)


def test_local_data_goes_to_the_bucket_once_by_content(
    fake_sky, tmp_path, moto_endpoint, new_bucket
):
    """A recipe whose data.path is a file here: `train` uploads it (to a local S3 server) under
    its content key before launching and points the job at that object; the same file is not
    uploaded again; a changed file is a new object, and the next job trains on it."""
    import json

    import boto3
    import yaml

    bucket = new_bucket("s3")
    data = tmp_path / "mine.json"
    conversation = [
        {"from": "human", "value": "Hi there, how are you?"},
        {"from": "gpt", "value": "Well!"},
    ]
    data.write_text(json.dumps([{"id": "a", "conversations": conversation}]))
    raw = yaml.safe_load((ROOT / "recipes" / "tiny-cpu.yaml").read_text())
    raw["data"]["path"], raw["bucket"] = str(data), f"s3://{bucket}"
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(raw))
    options = dict(dryrun=False, backend=SkyPilotBackend(), name=None, fresh=True)

    def objects() -> list[str]:
        listed = boto3.client("s3").list_objects_v2(Bucket=bucket).get("Contents", [])
        return sorted(o["Key"] for o in listed)

    runner.launch_recipe(Spec.TRAIN, str(tmp_path / "mine.yaml"), (), dryrun=True,
                         **{k: v for k, v in options.items() if k != "dryrun"})  # fmt: skip
    assert objects() == []  # a dry run uploads nothing
    runner.launch_recipe(Spec.TRAIN, str(tmp_path / "mine.yaml"), (), **options)
    first = fake_sky.named("jobs.launch")[-1][3]["DATA_PATH"]
    assert re.fullmatch(r"data/sha256-[0-9a-f]{16}/mine\.json", first)
    assert objects() == [first]
    body = boto3.client("s3").get_object(Bucket=bucket, Key=first)["Body"].read()
    assert body == data.read_bytes()
    put = boto3.client("s3").head_object(Bucket=bucket, Key=first)["LastModified"]
    runner.launch_recipe(Spec.TRAIN, str(tmp_path / "mine.yaml"), (), **options)
    assert fake_sky.named("jobs.launch")[-1][3]["DATA_PATH"] == first
    assert boto3.client("s3").head_object(Bucket=bucket, Key=first)["LastModified"] == put
    data.write_text(json.dumps([{"id": "b", "conversations": conversation}]))
    runner.launch_recipe(Spec.TRAIN, str(tmp_path / "mine.yaml"), (), **options)
    second = fake_sky.named("jobs.launch")[-1][3]["DATA_PATH"]
    assert second != first and objects() == sorted([first, second])
    # Data that is not ShareGPT is refused before anything is uploaded or launched.
    data.write_text('{"not": "a list"}')
    launched = len(fake_sky.named("jobs.launch"))
    with pytest.raises(VicunaSkyError, match="expected a JSON list of samples"):
        runner.launch_recipe(Spec.TRAIN, str(tmp_path / "mine.yaml"), (), **options)
    assert len(fake_sky.named("jobs.launch")) == launched and len(objects()) == 2


def test_preflight_refuses_before_anything_is_launched(
    fake_sky, tmp_path, moto_endpoint, new_bucket, monkeypatch
):
    """Missing data, a gated model without HF_TOKEN, a bucket that cannot be written and GPUs
    too small for the model: each is one line before any upload, cluster or job."""
    import json

    import yaml

    bucket = new_bucket("s3")
    data = tmp_path / "mine.json"
    turns = [
        {"from": "human", "value": "Hi there, how are you?"},
        {"from": "gpt", "value": "Well!"},
    ]
    data.write_text(json.dumps([{"id": "a", "conversations": turns}]))

    def launch(edit, skip=()):
        raw = yaml.safe_load((ROOT / "recipes" / "tiny-cpu.yaml").read_text())
        raw["bucket"] = f"s3://{bucket}"
        raw["data"]["path"] = str(data)
        edit(raw)
        path = tmp_path / f"r{len(list(tmp_path.glob('r*.yaml')))}.yaml"
        path.write_text(yaml.safe_dump(raw))
        options = dict(dryrun=False, backend=SkyPilotBackend(), name=None)
        runner.launch_recipe(Spec.TRAIN, str(path), (), skip_preflight=skip, **options)

    gated = "meta-llama/Llama-2-7b-hf"
    cases = [
        (
            lambda r: r["data"].update(path="data/nothing.json"),
            "preflight data: data 'data/nothing.json' is not in",
        ),
        (
            lambda r: r["model"].update(path=gated),
            f"preflight hf-token: {gated} is gated on the Hugging Face hub (per known list",
        ),
        (
            lambda r: r.update(bucket="s3://no-such-bucket-here"),
            "preflight bucket: cannot write to s3://no-such-bucket-here",
        ),
        (
            lambda r: (
                r["model"].update(params_b=13),
                r["resources"].update(accelerator="L4", gpus_per_node=8),
                r["train"].update(global_batch_size=16),
            ),
            "preflight memory: 13B parameters need about 27.7 GB per GPU on 8 x L4",
        ),
        (
            lambda r: r["resources"].update(clouds=["azure"], regions=[]),
            "preflight clouds: none of the recipe's clouds (azure) is enabled (enabled: aws, gcp)",
        ),
    ]  # fmt: skip
    for edit, message in cases:
        with pytest.raises(VicunaSkyError, match=re.escape(message)) as refused:
            launch(edit)
        assert "\n" not in str(refused.value) and "nothing was launched" in str(refused.value)
        assert fake_sky.calls == [], message
    assert not (tmp_path / "runs").exists()  # no local run either
    # A named check can be skipped: the gated model launches without a token.
    launch(lambda r: r["model"].update(path="meta-llama/Llama-2-7b-hf"), skip=("hf-token",))
    assert [c[0] for c in fake_sky.calls] == ["jobs.launch"]
    with pytest.raises(VicunaSkyError, match="--skip-preflight 'gpu': the checks are clouds"):
        launch(lambda r: None, skip=("gpu",))
    # `sky check` never ran (or found no credentials): one line saying so.
    from vicuna_sky.plan import clouds

    fake_sky.calls.clear()
    monkeypatch.setattr(clouds, "enabled_clouds", lambda verbose=False: frozenset())
    with pytest.raises(VicunaSkyError, match=re.escape("preflight clouds: no cloud is enabled")):
        launch(lambda r: None)
    assert fake_sky.calls == []


# -- 4b. TLS for the service's and the fleet's clients ------------------------------------------


def test_a_service_ends_tls_at_skyserves_load_balancer(fake_sky, tmp_path, monkeypatch, capsys):
    """`service.tls` with the recipe's certificate (resolved against the recipe's folder), or
    with one made for the service once: a key file only this user reads, a certificate for
    clients, its fingerprint printed."""
    import os

    from vicuna_sky.serve.tls import fingerprint, make_certificate, trusting

    pem = make_certificate("my domain")
    (tmp_path / "mine.pem").write_text(pem)
    source = tmp_path / "r.yaml"
    mine = dataclasses.replace(recipe(tls="mine.pem"), source=str(source))
    task = load_task(Spec.SERVICE, mine)
    assert task.service.tls_credential.keyfile == str(tmp_path / "mine.pem")
    assert cloud.service_tls(task, "vic")[0] == fingerprint(pem)
    from vicuna_sky.launch.fleet_state import FleetState

    kept = FleetState.path("vic").parent  # made by service_tls: the first of the service's files
    assert os.stat(kept).st_mode & 0o077 == 0  # the folder of its keys: this user's alone
    for wrong in ("missing.pem", "cert-only.pem"):
        (tmp_path / "cert-only.pem").write_text(pem[pem.index("-----BEGIN CERTIFICATE") :])
        with pytest.raises(SpecError, match=f"serve.tls: .*{wrong}"):
            serve = dataclasses.replace(mine.serve, tls=wrong)
            load_task(Spec.SERVICE, dataclasses.replace(mine, serve=serve))
    task = load_task(Spec.SERVICE, recipe())
    assert task.service.tls_credential is None
    sha, crt = cloud.service_tls(task, "vic")
    keyfile = task.service.tls_credential.keyfile
    assert os.stat(keyfile).st_mode & 0o077 == 0 and "PRIVATE KEY" in Path(keyfile).read_text()
    assert "PRIVATE KEY" not in crt.read_text() and trusting(crt.read_text())
    again = load_task(Spec.SERVICE, recipe())
    assert cloud.service_tls(again, "vic")[0] == sha  # one certificate per service
    monkeypatch.setenv("VICUNA_SKY_API_KEYS", "key-test-1234")
    options = dict(dryrun=False, backend=SkyPilotBackend(), name="vic3")
    runner.launch_recipe(Spec.SERVICE, "vicuna-7b", (), **options)
    (up,) = fake_sky.named("serve.up")
    assert up[2].service.tls_credential is not None
    assert "endpoint TLS: certificate SHA-256" in capsys.readouterr().out
