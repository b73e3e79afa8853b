"""Finding and handling local runs as a user does: what an attempt copies, one run per job
name, stopping a run with `down --local`, and a Ctrl-C that is not a preemption."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vicuna_sky.launch.jobs import LocalJob, list_jobs
from vicuna_sky.localcloud.cluster import LocalConfig, LocalRunner, signal_tree

ROOT = Path(__file__).resolve().parents[2]
EXE = str(Path(sys.executable).parent / "vicuna-sky")
SERVE_BUILT_IN = ("--env", "SERVE_MODEL_PATH=tiny-llama")  # nothing trained: a built-in model


def test_an_attempt_copies_what_skypilot_would_upload(tmp_path):
    """The checkout's .skyignore (SkyPilot's rules: else .gitignore) keeps runs, exports,
    GGUF files and virtual environments out of every attempt's copy of the workdir."""
    import sky

    project = tmp_path / "project"
    for name in (
        "src/keep.py",
        "recipes/mine.yaml",
        "runs/demo/models/big.bin",
        "gguf/model.q8_0.gguf",
        "sub/model.f16.gguf",
        ".venv-llama-cpp/lib/big.so",
        ".git/objects/pack",
    ):
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text("x")
    shutil.copy(ROOT / ".skyignore", project / ".skyignore")
    # Listed before files.txt exists (a `find | sort > files.txt` races the redirection).
    listing = 'files=$(find . -type f | sort); echo "$files" > files.txt'
    task = sky.Task(name="copy", run=listing, workdir=str(project))
    runner = LocalRunner(task, LocalConfig(runs_dir=tmp_path / "runs"))
    job = runner.run()
    assert job.status == "SUCCEEDED"
    copied = (Path(job.attempts[0].workdir) / "files.txt").read_text().split()
    assert copied == ["./.skyignore", "./recipes/mine.yaml", "./src/keep.py"]


def _wait_running(runs: Path, name: str, timeout: float = 120) -> LocalJob:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for job in list_jobs(runs):
            if job.name == name and job.status == "RUNNING":
                return job
        time.sleep(0.2)
    pytest.fail(f"no RUNNING {name} under {runs}")


def _cli(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [EXE, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )


def test_one_training_run_per_job_and_down_local_stops_it(tmp_path):
    """A second `train` of a job in progress is refused, naming the first; `down --local`
    stops the first as Ctrl-C would (CANCELLED, its processes gone), and then a train runs."""
    args = ["train", "tiny-cpu", "--local", "--workdir", "w", "--env", "NUM_EPOCHS=40"]
    first = subprocess.Popen(
        [EXE, *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        job = _wait_running(tmp_path / "w" / "runs", "vicuna-tiny-train")
        second = _cli(*args, cwd=tmp_path)
        assert second.returncode == 2, second.stdout
        assert "vicuna-tiny-train is already running locally" in second.stderr
        assert f"pid {first.pid}" in second.stderr and "--fresh" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
        # Under another name it would write the same checkpoints (RUN_NAME, RUN_TAG): refused.
        renamed = _cli(*args, "--name", "another", cwd=tmp_path)
        assert renamed.returncode == 2, renamed.stdout
        same = "vicuna-tiny-train, writing the same checkpoints, is already running locally"
        assert same in renamed.stderr and "down vicuna-tiny-train --local" in renamed.stderr
        assert len(list_jobs(tmp_path / "w" / "runs")) == 1  # no second run was started
        run_id = Path(job.run_dir).name
        follow = subprocess.Popen(
            [EXE, "logs", "vicuna-tiny-train", "--local", "--runs-dir", "w/runs", "--follow"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        listed = _cli("status", "--runs-dir", "w/runs", cwd=tmp_path)
        assert listed.returncode == 0, listed.stderr
        assert f"{run_id}" in listed.stdout and "RUNNING" in listed.stdout
        assert "local" in listed.stdout
        down = _cli("down", "vicuna-tiny-train", "--local", "--runs-dir", "w/runs", cwd=tmp_path)
        assert down.returncode == 0, down.stderr
        assert f"stopped: {run_id}" in down.stdout
        first.wait(60)
        # --follow printed the run as it went and ended with it.
        followed, _ = follow.communicate(timeout=60)
        assert "RUNNING attempt 1 running" in followed and "CANCELLED stopped (SIGTERM)" in followed
        assert followed.strip().endswith("vicuna-tiny-train: CANCELLED")
    finally:
        for proc in (first, locals().get("follow")):
            if proc is not None and proc.poll() is None:
                signal_tree(proc.pid, signal.SIGKILL)  # its runs' processes too
    assert first.returncode == 128 + signal.SIGTERM
    stopped = LocalJob.load(Path(job.run_dir))
    assert stopped.status == "CANCELLED"
    events = (Path(job.run_dir) / "events.log").read_text()
    assert "CANCELLED stopped (SIGTERM)" in events and "RECOVERING" not in events
    nothing = _cli("down", "vicuna-tiny-train", "--local", "--runs-dir", "w/runs", cwd=tmp_path)
    assert "no local run named vicuna-tiny-train is in progress" in nothing.stdout
    # A run picked by its id; a wrong id lists the job's runs.
    logs = ("logs", "vicuna-tiny-train", "--local", "--runs-dir", "w/runs")
    picked = _cli(*logs, "--run", run_id, cwd=tmp_path)
    assert picked.returncode == 0 and "run-rank0.log" in picked.stdout
    wrong = _cli(*logs, "--run", "nope", cwd=tmp_path)
    assert wrong.returncode == 2 and f"its runs: {run_id}" in wrong.stderr


def test_ctrl_c_stops_a_local_fleet_as_the_user_asked(tmp_path):
    """`serve --fleet --local` on loopback, its URLs printed; Ctrl-C ends every job as
    "stopped by user", never as a preemption to recover from."""
    env = {**os.environ, "COLUMNS": "200", "VICUNA_SKY_UI_PASSWORD": ""}
    fleet = subprocess.Popen(
        [EXE, "serve", "tiny-cpu", "--fleet", "--local", "--workdir", "w", *SERVE_BUILT_IN],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        # A terminal's Ctrl-C: pytest-xdist workers run with SIGINT ignored, which the fleet
        # would inherit (and then never see the signal).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = fleet.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "chat UI:" in line:
                break
        text = "".join(lines)
        assert "OpenAI API: http://127.0.0.1:" in text, text
        assert "chat UI: off (export VICUNA_SKY_UI_PASSWORD" in text
        fleet.send_signal(signal.SIGINT)
        out, _ = fleet.communicate(timeout=90)
    finally:
        if fleet.poll() is None:
            signal_tree(fleet.pid, signal.SIGKILL)  # the controller and workers too
    assert fleet.returncode == 0, out
    jobs = list_jobs(tmp_path / "w" / "runs")
    assert {j.name for j in jobs} == {
        "vicuna-tiny-controller",
        "vicuna-tiny-worker-0",
        "vicuna-tiny-worker-1",
    }
    for job in jobs:
        assert job.status == "CANCELLED", job
        events = (Path(job.run_dir) / "events.log").read_text()
        assert "CANCELLED stopped by user" in events and "RECOVERING" not in events, events
    # Loopback only: the controller's log says where it listens.
    controller = next(j for j in jobs if j.name.endswith("controller"))
    log = (Path(controller.attempts[0].workdir).parent / "run-rank0.log").read_text()
    assert "0.0.0.0" not in log
    assert json.loads((Path(controller.run_dir) / "job.json").read_text())["pid"] == fleet.pid


def test_a_recipes_local_data_file_is_uploaded_once_and_trained_on(tmp_path):
    """data.path (and data.eval_path) name files here: `train --local` uploads them to the
    local bucket under their content keys and trains (and evaluates) on those objects; `data
    push` and the dry runs say when the bucket has it already; a changed file is a new object."""
    import yaml

    data = tmp_path / "mine.json"
    dummy = json.loads((ROOT / "tests/fixtures/fastchat/dummy_conversation.json").read_text())
    data.write_text(json.dumps(dummy[:24]))
    (tmp_path / "held.json").write_text(json.dumps(dummy[24:30]))
    raw = yaml.safe_load((ROOT / "recipes" / "tiny-cpu.yaml").read_text())
    raw["data"]["path"] = "mine.json"
    raw["data"]["eval_path"] = "held.json"
    raw["train"]["epochs"] = 1
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(raw))
    dry = _cli("train", "mine.yaml", "--local", "--dryrun", "--workdir", "w", cwd=tmp_path)
    assert "data: would upload mine.json (" in dry.stdout, dry.stdout
    assert "data: would upload held.json (" in dry.stdout, dry.stdout
    bucket = tmp_path / "w" / "buckets" / "s3" / "vicuna-sky-tiny"
    assert not bucket.exists()
    trained = _cli("train", "mine.yaml", "--local", "--workdir", "w", cwd=tmp_path, timeout=600)
    assert trained.returncode == 0, trained.stderr[-2000:]
    key = re.search(
        r"data: uploaded mine\.json \(.*?\) to s3://vicuna-sky-tiny/(\S+)", trained.stdout
    )
    assert key, trained.stdout
    stored = bucket / key.group(1)
    assert stored.read_bytes() == data.read_bytes()
    job = next(j for j in list_jobs(tmp_path / "w" / "runs") if j.name == "vicuna-tiny-train")
    log = (Path(job.attempts[0].workdir).parent / "run-rank0.log").read_text()
    assert str(stored) in log  # the trainer read that object
    held = re.search(
        r"data: uploaded held\.json \(.*?\) to s3://vicuna-sky-tiny/(\S+)", trained.stdout
    )
    assert held and (bucket / held.group(1)).read_bytes() == (tmp_path / "held.json").read_bytes()
    assert "step 0/" in log and "eval loss" in log  # evaluated on it, the base model first
    push = ("data", "push", "mine.json", "--recipe", "mine.yaml", "--local", "--workdir", "w")
    again = _cli(*push, cwd=tmp_path)
    assert (
        "is already in the bucket" in again.stdout and f"DATA_PATH={key.group(1)}" in again.stdout
    )
    data.write_text(data.read_text().replace("Hello", "Hi", 1))
    changed = _cli(*push, cwd=tmp_path)
    assert "data: uploaded mine.json" in changed.stdout
    assert len(list(bucket.glob("data/sha256-*/mine.json"))) == 2


def test_a_failure_no_restart_fixes_ends_the_job_once_and_a_crash_is_restarted(tmp_path):
    """sky/train.yaml on the local backend (SkyPilot's recovery rules): a model that does not
    exist ends the job after one attempt, saying why; a crash is restarted while the recipe's
    restarts remain, counted in the bucket."""
    import yaml

    dummy = json.loads((ROOT / "tests/fixtures/fastchat/dummy_conversation.json").read_text())
    (tmp_path / "mine.json").write_text(json.dumps(dummy[:8]))
    raw = yaml.safe_load((ROOT / "recipes" / "tiny-cpu.yaml").read_text())
    raw["data"]["path"] = "mine.json"
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(raw))
    runs = tmp_path / "w" / "runs"
    train = ("train", "mine.yaml", "--local", "--workdir", "w")
    missing = _cli(*train, "--env", "MODEL_PATH=/nowhere/model", cwd=tmp_path)
    assert missing.returncode == 2
    (job,) = list_jobs(runs)
    assert job.status == "FAILED" and len(job.attempts) == 1, job
    log = (Path(job.attempts[0].workdir).parent / "run-rank0.log").read_text()
    assert "not retried: cannot load model '/nowhere/model'" in log
    assert job.attempts[0].exit_codes == [3]
    crashing = (
        *train, "--env", "RUN_TAG=crashing", "--env", "MAX_RESTARTS_ON_ERRORS=1",
        "--env", "NUM_EPOCHS=many",
    )  # fmt: skip
    assert _cli(*crashing, cwd=tmp_path).returncode == 2
    job = next(j for j in list_jobs(runs) if len(j.attempts) != 1)
    assert job.status == "FAILED" and [a.exit_codes for a in job.attempts] == [[76], [1]]
    bucket = tmp_path / "w" / "buckets" / "s3" / "vicuna-sky-tiny"
    counted = sorted((bucket / "runs").rglob("restarts/*/*"))
    assert len(counted) == 1 and counted[0].name.startswith("attempt-")
    # Launched again (after a fix, say): its restarts are its own, not the first launch's.
    assert _cli(*crashing, cwd=tmp_path).returncode == 2
    again = [j for j in list_jobs(runs) if len(j.attempts) != 1]
    assert len(again) == 2 and [a.exit_codes for a in again[-1].attempts] == [[76], [1]]
    counted = sorted((bucket / "runs").rglob("restarts/*/*"))
    assert len(counted) == 2 and counted[0].parent != counted[1].parent


@pytest.mark.parametrize("hosts", [False, True], ids=["loopback", "hosts"])
def test_every_node_of_a_crashed_multi_node_run_says_restart_and_it_counts_once(tmp_path, hosts):
    """Two nodes of sky/train.yaml crash: SkyPilot keeps the code of whichever ends first and
    cancels the other (137). Node 1 used to exit with torchrun's 1, which ended the job when
    it came first; now either node's code is 76 while restarts remain, the attempt is counted
    once, and the job ends (1) when they are spent. With --hosts each node is a host of its
    own: torchrun meets across the bridge, and the restart is on new hosts."""
    import yaml

    from vicuna_sky.localcloud.network import unavailable_reason

    if hosts and unavailable_reason() == "network namespaces need root":
        pytest.skip("network namespaces need root")

    raw = yaml.safe_load((ROOT / "recipes" / "tiny-cpu.yaml").read_text())
    raw["resources"].update(nodes=2, cpu_procs_per_node=1)
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(raw))
    crashing = (
        "train", "two.yaml", "--local", "--workdir", "w", "--env", "MAX_RESTARTS_ON_ERRORS=1",
        "--env", "NUM_EPOCHS=many", *(["--hosts"] if hosts else []),
    )  # fmt: skip
    done = _cli(*crashing, cwd=tmp_path)
    assert done.returncode == 2
    (job,) = list_jobs(tmp_path / "w" / "runs")
    if hosts:
        assert "runs on loopback" not in done.stdout + done.stderr
        one, two = (a.addresses for a in job.attempts)
        assert len(set(one)) == 2 and not set(one) & set(two), (one, two)
        assert all(a.startswith("198.18.") for a in one + two)
    first, second = (a.exit_codes for a in job.attempts)
    assert 76 in first and set(first) <= {76, 137}, first
    assert 1 in second and set(second) <= {1, 137}, second
    bucket = tmp_path / "w" / "buckets" / "s3" / "vicuna-sky-tiny"
    assert len(list((bucket / "runs").rglob("restarts/*/attempt-*"))) == 1


def _modules(root: int, module: str) -> list:
    """The python processes under `root` running `-m module` (not the shells that start
    them, whose command lines name it too)."""
    import psutil

    return [
        p
        for p in psutil.Process(root).children(recursive=True)
        if p.cmdline()[1:3] == ["-m", module]
    ]


def _read_until(proc: subprocess.Popen, marker: str, seconds: float) -> str:
    lines: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if marker in line:
            break
    return "".join(lines)


def test_a_rerun_repairs_a_fleet_whose_controller_died(tmp_path):
    """The controller process of a running local fleet is killed; `serve --fleet --local`
    run again finds its workers running, sees the controller not answer, starts it again on
    its port (same secret and certificate) and the workers register with it without being
    restarted. Workers reach it over TLS on its fleet port."""
    import httpx

    env = {**os.environ, "COLUMNS": "200", "VICUNA_SKY_UI_PASSWORD": ""}
    command = [EXE, "serve", "tiny-cpu", "--fleet", "--local", "--workdir", "w", *SERVE_BUILT_IN]
    popen = {
        "cwd": tmp_path,
        "stdout": subprocess.PIPE,
        "stderr": subprocess.STDOUT,
        "text": True,
        "env": env,
        "preexec_fn": lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    }
    first = subprocess.Popen(command, **popen)
    second = None
    try:
        text = _read_until(first, "chat UI:", 240)
        url = re.search(r"OpenAI API: (http://127\.0\.0\.1:\d+)/v1", text).group(1)
        workers = _modules(first.pid, "vicuna_sky.serve.worker")
        workers_before = {p.pid for p in workers}
        assert len(workers_before) == 2
        worker_cmdline = " ".join(workers[0].cmdline())
        assert "--controller-url https://127.0.0.1:" in worker_cmdline  # the TLS fleet port
        (controller,) = _modules(first.pid, "vicuna_sky.serve.controller")
        controller.kill()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{url}/v1/models", timeout=1)
                time.sleep(0.2)
            except httpx.HTTPError:
                break
        second = subprocess.Popen(command, **popen)
        repaired = _read_until(second, "controller relaunched", 240)
        assert "does not answer: relaunching it" in repaired, repaired
        assert "2 worker(s) registered again" in repaired, repaired
        answer = httpx.post(
            f"{url}/v1/chat/completions",
            json={
                "model": "vicuna-tiny",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 4,
            },
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
        workers_after = {p.pid for p in _modules(first.pid, "vicuna_sky.serve.worker")}
        assert workers_after == workers_before  # not restarted
        check = {k: v for k, v in popen.items() if k not in ("stdout", "stderr")}
        third = subprocess.run(command, **check, capture_output=True, timeout=120)
        assert "nothing to repair" in third.stdout, third.stdout
    finally:
        for proc in (second, first):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.communicate(timeout=90)
                except subprocess.TimeoutExpired:
                    signal_tree(proc.pid, signal.SIGKILL)
