"""benchmarks/train_gpu.sh (the one command a GPU machine runs) end to end in its CPU smoke
mode: the code path the GPU run takes (model and data built locally, the trainer under torchrun,
the bare loop, the figures and the JSON line), on a tiny Llama."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_mode_prints_both_runs_and_the_ratio(tmp_path):
    result = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "train_gpu.sh"), "--smoke", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    *table, last = result.stdout.strip().splitlines()
    figures = json.loads(last)
    assert figures["gpu"] == "cpu" and figures["steps"] == 5 and figures["layers"] == 2
    trainer, bare = figures["trainer"], figures["bare"]
    assert trainer["attention"] == "sdpa" and trainer["tokens_per_second"] > 0
    assert bare["tokens_per_second"] > 0 and bare["mfu"] is None  # no peak FLOP/s on CPU
    assert figures["ratio"] == trainer["tokens_per_second"] / bare["tokens_per_second"]
    # One periodic checkpoint (async DCP), its stall measured; none after the last step.
    assert trainer["checkpoint_steps"] == [3]
    assert trainer["checkpoint_host_stall_seconds"] > 0
    assert (tmp_path / "trainer" / "checkpoints" / "step-3" / ".metadata").exists()
    assert not (tmp_path / "trainer" / "export").exists()
    assert any(line.startswith("trainer / bare:") for line in table)
    # The model the benchmark trained is the one it counted.
    assert figures["params"] > 100_000
