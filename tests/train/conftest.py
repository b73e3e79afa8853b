"""Real torchrun runs of the trainer on CPU: a tiny Llama built locally, real conversations."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from vicuna_sky.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def train_data(tmp_path_factory) -> Path:
    """64 real conversations: 8 optimizer steps per epoch at a global batch of 8."""
    samples = json.loads((FIXTURES / "fastchat" / "dummy_conversation.json").read_text())[:64]
    path = tmp_path_factory.mktemp("data") / "train.json"
    path.write_text(json.dumps(samples))
    return path


class Run:
    """One `torchrun -m vicuna_sky.train` in its own working directory (its own local disk)."""

    def __init__(
        self,
        cwd: Path,
        args: list[str],
        nproc: int,
        env: dict | None = None,
        launcher: list[str] | None = None,
    ) -> None:
        cwd.mkdir(parents=True, exist_ok=True)
        self.cwd = cwd
        self.log = cwd / "train.log"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                *(launcher or ["--standalone"]),
                "--nproc_per_node",
                str(nproc),
                "-m",
                "vicuna_sky.train",
                *args,
            ],
            cwd=cwd,
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
            env={**os.environ, "VICUNA_SKY_CLOUD": "", **(env or {})},
            start_new_session=True,
        )

    def wait(self, timeout: float = 300) -> int:
        return self.proc.wait(timeout)

    def signal_group(self, sig: signal.Signals) -> None:
        """The whole machine: torchrun, and its workers in their own sessions."""
        from vicuna_sky.procs import signal_tree

        signal_tree(self.proc.pid, sig)

    def output(self) -> str:
        return self.log.read_text()

    def metrics(self) -> list[dict]:
        path = self.cwd / "metrics.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def trainer_argv(bucket: Path, model: Path, train_data: Path, **overrides: object) -> list[str]:
    """The trainer's command line for the tiny model: 2 epochs of `train_data`, checkpoints
    and the export under `bucket`; `overrides` (max_steps=4, ...) change or add flags."""
    values = {
        "model-path": str(model),
        "data-path": str(train_data),
        "max-length": "128",
        "epochs": "2",
        "lr": "1e-3",
        "warmup-ratio": "0.1",
        "global-batch-size": "8",
        "micro-batch-size": "2",
        "precision": "fp32",
        "checkpoint-every-steps": "2",
        "seed": "0",
        "checkpoint-url": f"file://{bucket}/ckpt",
        "export-url": f"file://{bucket}/model",
    }
    values.update({k.replace("_", "-"): str(v) for k, v in overrides.items()})
    return [x for k, v in values.items() for x in (f"--{k}", v)]


@pytest.fixture
def trainer_args(tiny_model, train_data, tmp_path):
    def args(bucket: Path | None = None, **overrides) -> list[str]:
        return trainer_argv(bucket or tmp_path / "bucket", tiny_model, train_data, **overrides)

    return args


@pytest.fixture
def run_trainer():
    runs: list[Run] = []

    def start(
        cwd: Path,
        args: list[str],
        nproc: int = 2,
        env: dict | None = None,
        launcher: list[str] | None = None,
    ) -> Run:
        runs.append(Run(cwd, args, nproc, env, launcher))
        return runs[-1]

    yield start
    for run in runs:
        if run.proc.poll() is None:
            run.signal_group(signal.SIGKILL)
            run.proc.wait(30)


def wait_until(condition, timeout: float = 240, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(every)
    raise TimeoutError("condition not met")


@pytest.fixture
def until():
    return wait_until


@pytest.fixture
def metadata_server():
    from vicuna_sky.localcloud.metadata_server import MetadataServer

    with MetadataServer() as server:
        yield server


def weights(export_dir) -> dict[str, torch.Tensor]:
    return load_file(str(export_dir / "model.safetensors"))


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
