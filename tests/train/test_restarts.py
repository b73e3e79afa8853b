"""Restarts after failures, counted in the bucket per launch (train/restarts.py)."""

from __future__ import annotations

import subprocess
import sys

from vicuna_sky.train.restarts import restart_allowed


def test_each_launch_has_its_own_restarts_and_the_count_survives_machines(tmp_path):
    url = f"file://{tmp_path}/runs/r/main"
    assert restart_allowed(url, 2, "a") == (True, 0)
    assert restart_allowed(url, 2, "a") == (True, 1)
    assert restart_allowed(url, 2, "a") == (False, 2)  # spent: the job ends
    assert restart_allowed(url, 2, "b") == (True, 0)  # launched again: its own two
    assert restart_allowed(url, 1, "") == (True, 0)  # no launch named: one count for all
    assert restart_allowed(url, 1, "") == (False, 1)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("restarts/**/*")) == [
        "runs/r/main/restarts/1",
        "runs/r/main/restarts/a",
        "runs/r/main/restarts/a/1",
        "runs/r/main/restarts/a/2",
        "runs/r/main/restarts/b",
        "runs/r/main/restarts/b/1",
    ]


def test_the_command_says_which_restart_and_refuses_a_launch_with_a_slash(tmp_path):
    def restarts(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "vicuna_sky.train.restarts", "--url", str(tmp_path)]
        return subprocess.run([*command, *args], capture_output=True, text=True)

    first = restarts("--max", "1", "--launch", "x")
    assert first.returncode == 0 and "1 of 1" in first.stderr
    spent = restarts("--max", "1", "--launch", "x")
    assert spent.returncode == 1 and "1 of 1 restarts after failures used" in spent.stderr
    assert restarts("--max", "1", "--launch", "../x").returncode == 2


def test_the_nodes_of_one_attempt_count_its_restart_once(tmp_path):
    """Every node of a multi-node run asks (whichever ends first decides the job's code): one
    attempt is one restart however many nodes ask, and the next attempt is another."""
    url = f"file://{tmp_path}/runs/r/main"
    assert restart_allowed(url, 2, "l", "first") == (True, 0)
    assert restart_allowed(url, 2, "l", "first") == (True, 0)  # its second node
    assert restart_allowed(url, 2, "l", "second") == (True, 1)
    assert restart_allowed(url, 2, "l", "second") == (True, 1)
    assert restart_allowed(url, 2, "l", "third") == (False, 2)
    assert sorted(p.name for p in (tmp_path / "runs/r/main/restarts/l").iterdir()) == [
        "attempt-first",
        "attempt-second",
    ]


def test_an_attempt_is_named_by_its_cluster(monkeypatch):
    """The same on every node of a cluster (its addresses and zone, not the node's rank), new
    with each cluster SkyPilot provisions; off SkyPilot every call counts."""
    from vicuna_sky.train.restarts import this_attempt

    def key(ips: str, zone: str, rank: str = "0") -> str:
        monkeypatch.setenv("SKYPILOT_NODE_IPS", ips)
        monkeypatch.setenv("SKYPILOT_NODE_RANK", rank)
        monkeypatch.setenv("SKYPILOT_CLUSTER_INFO", f'{{"zone": "{zone}"}}')
        return this_attempt()

    first = key("10.0.0.1\n10.0.0.2", "us-east1-b")
    assert first and first == key("10.0.0.1\n10.0.0.2", "us-east1-b", rank="1")
    assert first != key("10.0.0.1\n10.0.0.2", "us-west1-a")  # the next region
    assert first != key("10.0.0.7\n10.0.0.9", "us-east1-b")  # new machines, same zone
    assert key("", "us-east1-b") == ""


def test_a_bucket_that_hiccups_as_the_run_crashes_is_asked_again(tmp_path, monkeypatch):
    """The bucket fails at first (here a file stands where its folder must be) and answers a
    moment later: the restart is allowed and counted, not the job ended."""
    import threading

    from vicuna_sky.train import restarts

    monkeypatch.setattr(restarts, "RETRY_SECONDS", (0.5, 0.5, 0.5, 0.5))
    (tmp_path / "runs").write_text("not a folder")
    threading.Timer(0.8, lambda: (tmp_path / "runs").unlink()).start()
    assert restart_allowed(f"file://{tmp_path}/runs/r/main", 1, "l", "a") == (True, 0)
    assert (tmp_path / "runs/r/main/restarts/l/attempt-a").exists()


def test_a_bucket_that_never_answers_ends_the_job_in_one_line(tmp_path):
    (tmp_path / "runs").write_text("not a folder")
    code = (
        "import sys; from vicuna_sky.train import restarts; restarts.RETRY_SECONDS = (0.1,); "
        "restarts.main(sys.argv[1:])"
    )
    url = f"file://{tmp_path}/runs/r/main"
    done = subprocess.run(
        [sys.executable, "-c", code, "--url", url, "--max", "3"], capture_output=True, text=True
    )
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("not restarting: the bucket did not answer")
    assert "Traceback" not in done.stderr
