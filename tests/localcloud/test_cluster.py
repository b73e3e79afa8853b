"""The local backend runs real bash processes with SkyPilot's environment and recovery."""

import json
import threading
import time
from pathlib import Path

import pytest

from vicuna_sky.launch.jobs import JobStatus, LocalJob, list_jobs
from vicuna_sky.localcloud.cluster import LocalConfig, LocalRunner

ROOT = Path(__file__).resolve().parents[2]

SPEC = """
name: probe
workdir: {workdir}
num_nodes: {nodes}
resources:
  cpus: 1+
  job_recovery:
    max_restarts_on_errors: {restarts}
    recover_on_exit_codes: [75, 76]
envs:
  BUCKET_URL: s3://probe-bucket
  BUCKET_DIR: /probe-bucket
  MASTER_PORT: "29500"
file_mounts:
  $BUCKET_DIR:
    source: $BUCKET_URL
    mode: MOUNT
setup: |
  echo "setup $(pwd)" >> "$BUCKET_DIR/setups"
run: |
{run}
"""

RECORD = """
  python - <<'PY'
  import json, os
  keys = ["SKYPILOT_NODE_RANK", "SKYPILOT_NODE_IPS", "SKYPILOT_NUM_NODES",
          "SKYPILOT_NUM_GPUS_PER_NODE", "SKYPILOT_TASK_ID", "SKYPILOT_CLUSTER_INFO",
          "BUCKET_DIR", "BUCKET_URL", "MASTER_PORT"]
  record = {k: os.environ.get(k) for k in keys} | {"cwd": os.getcwd()}
  # Each node has its own copy of the workdir; a file from another attempt is a leak.
  zone = json.loads(os.environ["SKYPILOT_CLUSTER_INFO"])["zone"]
  record["leaked"] = os.path.exists("scratch") and open("scratch").read() != zone
  with open(os.path.join(os.environ["BUCKET_DIR"], "records.jsonl"), "a") as f:
      f.write(json.dumps(record) + "\\n")
  with open("scratch", "w") as f:
      f.write(zone)
  PY
"""


def make_task(tmp_path: Path, run: str, nodes: int = 1, restarts: int = 0):
    import sky

    workdir = tmp_path / "project"
    workdir.mkdir(exist_ok=True)
    (workdir / "code.txt").write_text("our code\n")
    text = SPEC.format(workdir=workdir, nodes=nodes, restarts=restarts, run=run)
    return sky.Task.from_yaml_str(text)


def config(tmp_path: Path, **kw) -> LocalConfig:
    return LocalConfig(runs_dir=tmp_path / "runs", bucket_root=tmp_path / "buckets", **kw)


def bucket(tmp_path: Path) -> Path:
    return tmp_path / "buckets" / "s3" / "probe-bucket"


def records(tmp_path: Path) -> list[dict]:
    lines = (bucket(tmp_path) / "records.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_multi_node_run_sees_skypilot_environment(tmp_path):
    task = make_task(tmp_path, RECORD, nodes=2)
    job = LocalRunner(task, config(tmp_path)).run()
    assert job.status == JobStatus.SUCCEEDED.value
    recs = sorted(records(tmp_path), key=lambda r: r["SKYPILOT_NODE_RANK"])
    assert [r["SKYPILOT_NODE_RANK"] for r in recs] == ["0", "1"]
    for r in recs:
        assert r["SKYPILOT_NODE_IPS"] == "127.0.0.1\n127.0.0.1"
        assert r["SKYPILOT_NUM_NODES"] == "2"
        assert r["SKYPILOT_NUM_GPUS_PER_NODE"] == "0"
        assert r["SKYPILOT_TASK_ID"] == job.task_id
        assert r["SKYPILOT_TASK_ID"].startswith("sky-managed-")
        info = json.loads(r["SKYPILOT_CLUSTER_INFO"])
        assert info["cluster_name"] == "local-probe" and info["zone"] == "local-zone-1"
        # The bucket mount and the bucket URL both lead to the local stand-in directory.
        assert r["BUCKET_DIR"] == str(bucket(tmp_path))
        assert r["BUCKET_URL"] == f"file://{bucket(tmp_path)}"
        assert r["MASTER_PORT"] != "29500"
        assert Path(r["cwd"], "code.txt").read_text() == "our code\n"
        assert not r["leaked"]
    assert recs[0]["cwd"] != recs[1]["cwd"]  # each node its own disk
    # setup ran on each node, in its own workdir; logs are in the run directory
    setups = (bucket(tmp_path) / "setups").read_text().splitlines()
    assert sorted(setups) == sorted(f"setup {r['cwd']}" for r in recs)
    node_dir = Path(job.run_dir) / "attempt-1"
    assert {p.name for p in node_dir.glob("*.log")} == {
        "setup-rank0.log",
        "setup-rank1.log",
        "run-rank0.log",
        "run-rank1.log",
    }
    assert LocalJob.load(Path(job.run_dir)).status == "SUCCEEDED"


def test_killed_run_is_relaunched_fresh_with_same_task_id(tmp_path):
    # The first attempt's rank 0 dies by SIGKILL, as a node does when its spot VM goes.
    run = (
        RECORD
        + """
  if [ "$SKYPILOT_NODE_RANK" = 0 ] && [ ! -e "$BUCKET_DIR/preempted-once" ]; then
    # Once both nodes have recorded themselves: the node's death takes the other down.
    for i in $(seq 600); do
      [ "$(wc -l < "$BUCKET_DIR/records.jsonl")" -ge 2 ] && break; sleep 0.1
    done
    touch "$BUCKET_DIR/preempted-once"; kill -9 $$
  fi
"""
    )
    task = make_task(tmp_path, run, nodes=2)
    job = LocalRunner(task, config(tmp_path)).run()
    assert job.status == JobStatus.SUCCEEDED.value
    assert [a.status for a in job.attempts] == ["PREEMPTED", "SUCCEEDED"]
    assert job.recoveries == 1
    assert "SIGKILL" in job.attempts[0].reason
    recs = records(tmp_path)
    assert {r["SKYPILOT_TASK_ID"] for r in recs} == {job.task_id}
    dirs = {r["cwd"] for r in recs}
    assert len(dirs) == 4  # each node's own, fresh for the second attempt
    # Local disk did not survive the "preemption" (no scratch file at start); the bucket did.
    assert not any(r["leaked"] for r in recs)
    assert (Path(job.attempts[0].workdir) / "scratch").read_text() == "local-zone-1"
    zones = {json.loads(r["SKYPILOT_CLUSTER_INFO"])["zone"] for r in recs}
    assert zones == {"local-zone-1", "local-zone-2"}
    assert len((bucket(tmp_path) / "setups").read_text().splitlines()) == 4  # 2 nodes, twice


def test_preempt_from_outside_takes_the_whole_node_down(tmp_path):
    run = """
  echo "start $SKYPILOT_NODE_RANK" >> "$BUCKET_DIR/starts"
  if [ -e "$BUCKET_DIR/second" ]; then exit 0; fi
  touch "$BUCKET_DIR/second"
  sleep 60 &
  wait
"""
    task = make_task(tmp_path, run)
    runner = LocalRunner(task, config(tmp_path))

    def preempt_when_started():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (bucket(tmp_path) / "second").exists():
            time.sleep(0.05)
        while not runner.preempt(grace_seconds=0.5):
            time.sleep(0.05)

    t = threading.Thread(target=preempt_when_started)
    t.start()
    started = time.monotonic()
    job = runner.run()
    t.join()
    assert job.status == "SUCCEEDED"
    assert [a.status for a in job.attempts] == ["PREEMPTED", "SUCCEEDED"]
    assert time.monotonic() - started < 30  # the background `sleep 60` was killed too


def test_errors_restart_up_to_max_restarts_on_errors(tmp_path):
    run = '  echo try >> "$BUCKET_DIR/tries"; exit 3'
    task = make_task(tmp_path, run, restarts=2)
    events = []
    job = LocalRunner(task, config(tmp_path), on_event=events.append).run()
    assert job.status == JobStatus.FAILED.value
    assert len(job.attempts) == 3 and job.restarts_on_errors == 2
    assert job.attempts[-1].exit_codes == [3]
    assert len((bucket(tmp_path) / "tries").read_text().splitlines()) == 3
    assert any(e.startswith("RECOVERING") for e in events)
    assert events[-1].startswith("FAILED")


def test_a_failed_setup_ends_the_job_unless_restarts_remain(tmp_path):
    """SkyPilot 0.14.1 sends a failed setup's exit codes through the same recovery rules as a
    run's (jobs/controller.py:1346-1390): FAILED_SETUP once the restarts are spent."""
    task = make_task(tmp_path, "  echo never", nodes=2)
    task.setup = "exit 7"
    job = LocalRunner(task, config(tmp_path)).run()
    assert job.status == JobStatus.FAILED_SETUP.value
    assert len(job.attempts) == 1
    codes = job.attempts[0].exit_codes  # the first to fail cancels the other (137)
    assert 7 in codes and set(codes) <= {7, 137} and "setup exit codes" in job.attempts[0].reason
    task = make_task(tmp_path, "  echo ran", restarts=1)
    task.setup = 'echo try >> "$BUCKET_DIR/setup-tries"; exit 7'
    job = LocalRunner(task, config(tmp_path)).run()
    assert job.status == JobStatus.FAILED_SETUP.value and len(job.attempts) == 2
    assert len((bucket(tmp_path) / "setup-tries").read_text().splitlines()) == 2


def test_a_setup_that_exits_with_a_recovery_code_is_recovered(tmp_path):
    """An install that could not finish (sky/install.sh: 76) is tried again on a new cluster,
    without a restart counted, as a run's 76 is."""
    task = make_task(tmp_path, '  echo ran >> "$BUCKET_DIR/ran"')
    task.setup = 'if [ ! -e "$BUCKET_DIR/once" ]; then touch "$BUCKET_DIR/once"; exit 76; fi'
    job = LocalRunner(task, config(tmp_path)).run()
    assert job.status == JobStatus.SUCCEEDED.value
    assert [a.status for a in job.attempts] == ["PREEMPTED", "SUCCEEDED"]
    assert job.attempts[0].exit_codes == [76] and job.restarts_on_errors == 0


def test_the_first_node_to_fail_cancels_the_others_with_137(tmp_path):
    """SkyPilot 0.14.1 (backends/task_codegen.py:387-400): the job's codes are the failed
    node's and 137 for every node it cancelled, at once, not when they would have ended."""
    run = '  if [ "$SKYPILOT_NODE_RANK" = 1 ]; then exit 5; fi; sleep 60'
    started = time.monotonic()
    job = LocalRunner(make_task(tmp_path, run, nodes=3), config(tmp_path)).run()
    assert job.status == JobStatus.FAILED.value
    assert job.attempts[0].exit_codes == [137, 5, 137]
    assert time.monotonic() - started < 30


def test_any_nodes_recovery_code_recovers_the_job_though_the_rest_were_cancelled(tmp_path):
    """The node that ends first decides: its 76 recovers the job, the others' 137 aside."""
    run = """
  case "$SKYPILOT_CLUSTER_INFO" in *local-zone-1*) first=1 ;; *) first=0 ;; esac
  if [ $first = 1 ] && [ "$SKYPILOT_NODE_RANK" = 1 ]; then exit 76; fi
  if [ $first = 1 ]; then sleep 60; fi
"""
    job = LocalRunner(make_task(tmp_path, run, nodes=2), config(tmp_path)).run()
    assert job.status == JobStatus.SUCCEEDED.value
    assert job.attempts[0].exit_codes == [137, 76] and job.attempts[0].status == "PREEMPTED"
    assert job.restarts_on_errors == 0


def test_too_many_preemptions_fail_the_job(tmp_path):
    task = make_task(tmp_path, "  kill -9 $$")
    job = LocalRunner(task, config(tmp_path, max_recoveries=2)).run()
    assert job.status == "FAILED" and job.recoveries == 3
    assert [j.name for j in list_jobs(tmp_path / "runs")] == ["probe"]


@pytest.mark.parametrize(
    ("kw", "expected_url"),
    [({"s3_endpoint_url": "http://127.0.0.1:9"}, "s3://probe-bucket")],
)
def test_bucket_url_kept_when_a_local_s3_endpoint_is_configured(tmp_path, kw, expected_url):
    run = '  echo "$BUCKET_URL|$AWS_ENDPOINT_URL_S3" > "$BUCKET_DIR/url"'
    job = LocalRunner(make_task(tmp_path, run), config(tmp_path, **kw)).run()
    assert job.status == "SUCCEEDED"
    url, endpoint = (bucket(tmp_path) / "url").read_text().strip().split("|")
    assert (url, endpoint) == (expected_url, kw["s3_endpoint_url"])


PUSH = """
  mkdir -p ckpt/step-3 && echo weights > ckpt/step-3/model.bin
  python -m checkpoints_sync push ckpt/step-3 "$BUCKET_URL/ckpts"
"""


def test_bucket_is_a_checkpoints_sync_store(tmp_path):
    """A task's bucket URL, rewritten to the local bucket directory, works with checkpoints_sync."""
    from checkpoints_sync import Checkpoints, open_store

    job = LocalRunner(make_task(tmp_path, PUSH), config(tmp_path)).run()
    assert job.status == "SUCCEEDED"
    assert Checkpoints(open_store(f"file://{bucket(tmp_path)}/ckpts")).committed() == [3]


def test_bucket_url_on_a_local_s3_server(tmp_path, moto_endpoint, new_bucket):
    from checkpoints_sync import Checkpoints, open_store

    name = new_bucket("s3")
    task = make_task(tmp_path, PUSH)
    task.update_envs({"BUCKET_URL": f"s3://{name}"})
    job = LocalRunner(task, config(tmp_path, s3_endpoint_url=moto_endpoint)).run()
    assert job.status == "SUCCEEDED"
    assert Checkpoints(open_store(f"s3://{name}/ckpts")).committed() == [3]


def test_train_locally_to_the_end_then_relaunch_resumes_and_fresh_starts_over(cli, tmp_path):
    """`vicuna-sky train RECIPE --local` runs sky/train.yaml here: it seeds the demo data in the
    bucket, trains and exports; `status` (costed at the test catalog's made-up prices) and
    `logs` report it. A second launch of the run (a new SKYPILOT_TASK_ID, as after a
    jobs-controller restart) finds the first one's checkpoints under runs/RUN_NAME/RUN_TAG;
    --fresh starts at step 0."""
    from transformers import AutoConfig

    recipe = tmp_path / "r.yaml"  # a recipe given by its path
    recipe.write_text((ROOT / "recipes" / "tiny-cpu.yaml").read_text())
    work = tmp_path / "w"
    runs = work / "runs"

    def train(*extra: str) -> str:
        out = cli("train", str(recipe), "--local", "--workdir", str(work), *extra, timeout=600)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        newest = max(runs.glob("vicuna-tiny-train-*"), key=lambda p: p.name)
        job = json.loads((newest / "job.json").read_text())
        assert job["status"] == "SUCCEEDED", job
        return (newest / "attempt-1" / "run-rank0.log").read_text()

    first = train()
    assert "(fresh start)" in first
    assert AutoConfig.from_pretrained(work / "export").num_hidden_layers == 2
    bucket = work / "buckets" / "s3" / "vicuna-sky-tiny"
    # demo-sample: prepared here for the tiny model, uploaded by content like a user's file.
    assert len(list((bucket / "data").glob("sha256-*/demo_sharegpt.json"))) == 1
    status = cli("status", "--local", "--runs-dir", str(runs))
    assert status.returncode == 0, status.stderr
    assert "vicuna-tiny-train" in status.stdout and "SUCCEEDED" in status.stdout
    assert "spot" in status.stdout and "on-demand" in status.stdout, status.stdout
    run_name = max(runs.glob("vicuna-tiny-train-*"), key=lambda p: p.name).name
    logs = cli("logs", run_name, "--local", "--runs-dir", str(runs))
    assert logs.returncode == 0 and "run-rank0.log" in logs.stdout, logs.stdout + logs.stderr

    second = train()
    prefix = f"file://{bucket}/runs/vicuna-tiny/main"
    assert f"downloaded step-8 from {prefix}" in second and "(resumed at step 8)" in second
    third = train("--fresh")
    assert "(fresh start)" in third
    assert any(p.name.startswith("fresh-") for p in Path(prefix[7:]).parent.iterdir())
