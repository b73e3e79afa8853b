"""Test session set-up: a private HOME with a small, made-up SkyPilot catalog.

SkyPilot computes its paths (~/.sky) when it is imported, so HOME is replaced here, before
any test imports `sky`. Subprocesses (the CLI) inherit the same HOME and catalog. Usage
collection is off so nothing leaves this machine.
"""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CATALOG = Path(__file__).parent / "fixtures" / "catalog"
SESSION_HOME = Path(tempfile.mkdtemp(prefix="vicuna-sky-test-home-"))

os.environ["HOME"] = str(SESSION_HOME)
os.environ["SKYPILOT_DISABLE_USAGE_COLLECTION"] = "1"
# One compute thread per process (torch reads this when it is imported): the models here are
# tiny and two pytest workers with their servers and trainers share a small machine's cores,
# where torch's default of a thread per core spends more time contending than computing
# (a tiny Llama's 400 tokens with both cores busy: 0.6 s on one thread, 1.7 s on two).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.pop("AWS_PROFILE", None)
# The private HOME goes with the session (processes still writing to it are ignored).
atexit.register(shutil.rmtree, SESSION_HOME, ignore_errors=True)

# Nothing leaves loopback: every Python process of the session (this one, and through
# tests/netguard/sitecustomize.py every one it starts) refuses and records a non-loopback
# connection or name lookup; the `_loopback_only` fixture below fails the test that made one.
NETGUARD = Path(__file__).parent / "netguard"
NET_LOG = SESSION_HOME / "non-loopback.log"
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(NETGUARD), *filter(None, [os.environ.get("PYTHONPATH")])]
)
os.environ["VICUNA_SKY_NET_GUARD_LOG"] = str(NET_LOG)
sys.path.insert(0, str(NETGUARD))
import loopback_guard  # noqa: E402

loopback_guard.install()


def _install_catalog(home: Path) -> None:
    target = home / ".sky" / "catalogs" / "v8"
    for csv in CATALOG.rglob("*.csv"):
        dest = target / csv.relative_to(CATALOG)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(csv, dest)
    (home / ".sky" / "config.yaml").write_text("allowed_clouds:\n  - aws\n  - gcp\n")


_install_catalog(SESSION_HOME)


BESIDE = ROOT.parent / "shared"


def _beside_the_checkout_guard(event: str, args: tuple) -> None:
    """Fail any open under ../shared, the data folder some checkouts have beside them: a user's
    clone has nothing there, so everything a test reads lives in the repository."""
    if (
        event == "open"
        and isinstance(args[0], (str, Path))
        and Path(os.path.abspath(args[0])).is_relative_to(BESIDE)
    ):
        raise PermissionError(f"tests read only inside the repository, not {args[0]}")


sys.addaudithook(_beside_the_checkout_guard)

# Storage servers on loopback (moto for S3, an emulator for GCS). Credentials are dummies and
# both SDKs are told never to look for a cloud metadata server.
os.environ.update(
    {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "NO_GCE_CHECK": "true",
        "GCE_METADATA_HOST": "127.0.0.1:9",
        "GCE_METADATA_IP": "127.0.0.1:9",
    }
)
BIN = Path(sys.executable).parent

# Imported after HOME is set above: the project's helpers pull in nothing that reads it early.
from vicuna_sky.localcloud.loopback import stay_on_loopback  # noqa: E402
from vicuna_sky.ports import free_port, wait_for_port  # noqa: E402

# STS (SkyPilot's AWS catalog asks it who the caller is), every other AWS service, the GCE
# metadata server and the hub: a closed loopback port. The storage fixtures below set their
# service-specific endpoint (AWS_ENDPOINT_URL_S3, STORAGE_EMULATOR_HOST), which wins.
stay_on_loopback()


@pytest.fixture(autouse=True)
def _loopback_only() -> Iterator[None]:
    """Fail the test during which any process of the session tried to leave loopback."""
    before = NET_LOG.stat().st_size if NET_LOG.exists() else 0
    yield
    if NET_LOG.exists() and NET_LOG.stat().st_size > before:
        with NET_LOG.open() as log:
            log.seek(before)
            pytest.fail(f"a process tried to leave loopback:\n{log.read()[:6000]}")


def _serve(command: list[str], port: int, env_var: str) -> Iterator[str]:
    """Run a storage server on 127.0.0.1:port and point the SDKs at it through `env_var`."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc)
        url = f"http://127.0.0.1:{port}"
        os.environ[env_var] = url
        yield url
    finally:
        os.environ.pop(env_var, None)
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """The tiny random Llama (vicuna_sky.tiny), built once: tests read it and write elsewhere."""
    from vicuna_sky.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def moto_endpoint():
    port = free_port()
    command = [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    yield from _serve(command, port, "AWS_ENDPOINT_URL_S3")


@pytest.fixture(scope="session")
def gcs_endpoint():
    port = free_port()
    command = [str(BIN / "gcp-storage-emulator"), "start", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--in-memory"]
    yield from _serve(command, port, "STORAGE_EMULATOR_HOST")


def _make_bucket(scheme: str) -> str:
    name = f"ckpt-{uuid.uuid4().hex[:12]}"
    if scheme == "s3":
        import boto3

        boto3.client("s3").create_bucket(Bucket=name)
    else:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        storage.Client(project="emulator", credentials=AnonymousCredentials()).create_bucket(name)
    return name


@pytest.fixture(params=["file", "s3", "gs"])
def store_url(request, tmp_path):
    """The same suite runs on a local directory, S3 (moto) and GCS (emulator)."""
    if request.param == "file":
        return f"file://{tmp_path / 'bucket'}/runs/r1"
    request.getfixturevalue("moto_endpoint" if request.param == "s3" else "gcs_endpoint")
    return f"{request.param}://{_make_bucket(request.param)}/runs/r1"


@pytest.fixture
def new_bucket():
    """Create a bucket on the S3 or GCS test server (start it first with its fixture)."""
    return _make_bucket


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


def _run_cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "vicuna-sky"
    return subprocess.run(
        [str(exe), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200"},
    )


@pytest.fixture(scope="session")
def run_cli():
    """Run the real `vicuna-sky` console script in `cwd`; for module-scoped fixtures."""
    return _run_cli


@pytest.fixture
def cli(tmp_path):
    """Run the real `vicuna-sky` console script (in the test's tmp_path unless `cwd` says
    otherwise); returns the CompletedProcess."""

    def run(*args: str, cwd: Path | None = None, timeout: float = 300):
        return _run_cli(*args, cwd=cwd or tmp_path, timeout=timeout)

    return run


LONGEST_FIRST = (
    "tests/train/test_trainer.py",
    "tests/test_install_sets.py",
    "tests/serve/test_fleet.py",
    "tests/serve/test_vllm_cpu.py",
    "tests/localcloud/test_network.py",
    "tests/serve/test_clients.py",
    "tests/test_demo.py",
    "tests/test_journey.py",
    "tests/localcloud/test_chaos.py",
    "tests/serve/test_hostile_input.py",
    "tests/serve/test_hostile_workers.py",
    "tests/gguf/test_export.py",
    "tests/localcloud/test_cluster.py",
    "tests/train/test_attention.py",
    "tests/test_outputs_never_inputs.py",
)
"""The files that take longest (a minute or more each on two cores), longest first. `make test`
hands files to its two workers in collection order (--no-loadscope-reorder): started last,
one of these kept one worker busy for minutes after the other had finished. Any other file
keeps its usual place after them."""


HEAVY_FIXTURES = {
    "fleet", "module_fleet", "tls_fleet", "tiny_fleet", "own_tiny_fleet", "two_tiny_workers",
    "with_two_hf_workers", "tiny_chat_model", "smollm2", "controller_vms", "chaos", "cli",
    "run_cli", "moto_endpoint", "gcs_endpoint", "store_url", "tiny_model", "train_data",
    "run_trainer", "metadata_server", "page",
}  # fmt: skip
"""What `make check` leaves to `make test`: fixtures that start servers or build models."""


def pytest_addoption(parser) -> None:
    parser.addoption(
        "--quick",
        action="store_true",
        help="only tests that start no server and build no model (make check)",
    )


def pytest_collection_modifyitems(config, items) -> None:
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))
    if config.getoption("--quick"):
        slow = [
            item
            for item in items
            if HEAVY_FIXTURES & set(getattr(item, "fixturenames", ()))
            or item.nodeid.split("::")[0] in LONGEST_FIRST
        ]
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if item not in slow]


@pytest.fixture
def offline_env(tmp_path) -> dict[str, str]:
    """The environment of a CLI run with no SkyPilot catalog in its HOME and no way out (a
    proxy on a closed loopback port): anything fetched from the internet fails at once."""
    home = tmp_path / "home"
    home.mkdir()
    return {
        **os.environ,
        "HOME": str(home),
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
        "COLUMNS": "200",
    }
