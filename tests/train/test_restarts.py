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
