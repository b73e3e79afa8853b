"""The one interface a launch hands its task to: both backends implement all of it, with the
same signatures, so the steps in runner.py never ask which one they have."""

from __future__ import annotations

import inspect

import pytest

from vicuna_sky.launch.backend import Backend
from vicuna_sky.launch.skypilot_backend import SkyPilotBackend
from vicuna_sky.localcloud.backend import LocalBackend

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
