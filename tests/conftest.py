"""Test session set-up: a private HOME with a small, made-up SkyPilot catalog.

SkyPilot computes its paths (~/.sky) when it is imported, so HOME is replaced here, before
any test imports `sky`. Subprocesses (the CLI) inherit the same HOME and catalog. Usage
collection is off so nothing leaves this machine.
"""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
CATALOG = Path(__file__).parent / "fixtures" / "catalog"
SESSION_HOME = Path(tempfile.mkdtemp(prefix="vicuna-sky-test-home-"))

os.environ["HOME"] = str(SESSION_HOME)
os.environ["SKYPILOT_DISABLE_USAGE_COLLECTION"] = "1"
os.environ.pop("AWS_PROFILE", None)


def _install_catalog(home: Path) -> None:
    target = home / ".sky" / "catalogs" / "v8"
    for csv in CATALOG.rglob("*.csv"):
        dest = target / csv.relative_to(CATALOG)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(csv, dest)
    (home / ".sky" / "config.yaml").write_text("allowed_clouds:\n  - aws\n  - gcp\n")


_install_catalog(SESSION_HOME)


@pytest.fixture(scope="session")
def clouds_enabled() -> None:
    """Mark the fixture's clouds enabled, as `sky check` would with credentials."""
    from sky.clouds import cloud as sky_cloud

    from sky import check, global_user_state, skypilot_config

    workspace = skypilot_config.get_active_workspace()
    global_user_state.set_allowed_clouds(check._get_workspace_allowed_clouds(workspace), workspace)
    global_user_state.set_enabled_clouds(
        ["AWS", "GCP"], sky_cloud.CloudCapability.COMPUTE, workspace
    )


@pytest.fixture
def cli(tmp_path):
    """Run the real `vicuna-sky` console script; returns the CompletedProcess."""

    def run(*args: str, cwd: Path | None = None, timeout: float = 300):
        exe = Path(sys.executable).parent / "vicuna-sky"
        return subprocess.run(
            [str(exe), *args],
            cwd=cwd or tmp_path,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "COLUMNS": "200"},
        )

    return run
