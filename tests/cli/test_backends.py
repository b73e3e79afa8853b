"""`--local` chooses the local cloud, else SkyPilot's: the launch never imports the local
cloud itself (tests/test_layers.py)."""

from vicuna_sky.cli.backends import choose_backend
from vicuna_sky.launch.skypilot_backend import SkyPilotBackend
from vicuna_sky.localcloud.backend import LocalBackend


def test_the_flag_chooses_the_backend_and_the_workdir_holds_the_local_runs(tmp_path):
    local = choose_backend(True, tmp_path / "runs", tmp_path / "w")
    assert isinstance(local, LocalBackend) and local.local and not local.bills
    assert local.runs_dir == tmp_path / "w" / "runs"
    assert local.workspace() == tmp_path / "w" / "runs"
    assert choose_backend(True, tmp_path / "runs").runs_dir == tmp_path / "runs"
    cloud = choose_backend(False, tmp_path / "runs")
    assert isinstance(cloud, SkyPilotBackend) and cloud.bills and not cloud.local
