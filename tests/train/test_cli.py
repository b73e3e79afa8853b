"""`-m vicuna_sky.train`'s exits (train/cli.py): a failure a restart cannot fix leaves the
NOT_RETRYABLE marker sky/train.yaml ends the job on, with one line that says what to change."""

from __future__ import annotations

import json

import pytest
import torch

from vicuna_sky.train import cli, trainer
from vicuna_sky.train.cli import NOT_RETRYABLE


def run(tmp_path, monkeypatch, raised: Exception, *extra: str) -> int:
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"id": "1", "conversations": []}]))

    # A CUDA allocator's failure cannot happen on this machine's CPU: the trainer stands in
    # for one that ran out of GPU memory at its first step.
    class OutOfMemoryOnTheFirstStep:
        def __init__(self, config: object) -> None:
            self.config = config

        def run(self) -> int:
            raise raised

    monkeypatch.setattr(trainer, "Trainer", OutOfMemoryOnTheFirstStep)
    checkpoints = tmp_path / "checkpoints"
    args = ["--model-path", "tiny-llama", "--data-path", str(data)]
    with pytest.raises(SystemExit) as exited:
        cli.main([*args, "--checkpoint-dir", str(checkpoints), *extra])
    return exited.value.code


def test_out_of_gpu_memory_is_not_retried_and_names_the_settings(tmp_path, monkeypatch, capsys):
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    code = run(tmp_path, monkeypatch, oom, "--micro-batch-size", "8")
    said = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(said) == 1
    assert "train.micro_batch_size (now 8)" in said[0] and "gpus_per_node" in said[0]
    assert "gradient_checkpointing" not in said[0]  # it is on already
    marker = (tmp_path / "checkpoints" / NOT_RETRYABLE).read_text()
    assert marker.startswith("out of GPU memory")
    run(tmp_path, monkeypatch, oom, "--gradient-checkpointing", "false")
    assert "turn train.gradient_checkpointing on" in capsys.readouterr().err


def test_any_other_crash_is_left_to_the_restarts(tmp_path, monkeypatch):
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(RuntimeError, match="NCCL"):
        run(tmp_path, monkeypatch, RuntimeError("NCCL error: unhandled system error"))
    assert not (tmp_path / "checkpoints" / NOT_RETRYABLE).exists()
