"""The one interface a launch hands its task to: both backends implement all of it, with the
same signatures, so the steps in runner.py never ask which one they have."""

from __future__ import annotations

import inspect

import pytest

from vicuna_sky.launch.backend import Backend
from vicuna_sky.launch.local_backend import LocalBackend
from vicuna_sky.launch.runner import choose_backend
from vicuna_sky.launch.skypilot_backend import SkyPilotBackend

METHODS = sorted(n for n, v in vars(Backend).items() if inspect.isfunction(v) and n[0] != "_")
FLAGS = sorted(Backend.__annotations__)


@pytest.mark.parametrize("backend", [LocalBackend, SkyPilotBackend], ids=lambda b: b.__name__)
def test_each_backend_implements_the_whole_interface(backend):
    assert {"launch", "down", "logs", "preflight", "in_progress"} <= set(METHODS)
    for name in METHODS:
        ours = inspect.signature(getattr(backend, name))
        theirs = inspect.signature(getattr(Backend, name))
        assert list(ours.parameters) == list(theirs.parameters), (backend.__name__, name)
    for flag in FLAGS:
        assert isinstance(getattr(backend, flag), bool), flag


def test_the_flag_chooses_the_backend_and_the_workdir_holds_the_local_runs(tmp_path):
    local = choose_backend(True, tmp_path / "runs", tmp_path / "w")
    assert isinstance(local, LocalBackend) and local.local and not local.bills
    assert local.runs_dir == tmp_path / "w" / "runs"
    assert local.workspace() == tmp_path / "w" / "runs"
    assert choose_backend(True, tmp_path / "runs").runs_dir == tmp_path / "runs"
    cloud = choose_backend(False, tmp_path / "runs")
    assert isinstance(cloud, SkyPilotBackend) and cloud.bills and not cloud.local
