"""Benchmark: a training run through 10 preemptions (fixed seed), locally, end to end.

Runs `vicuna-sky chaos train` (sky/train.yaml on the local backend, bucket on a local S3 server)
and prints, per preemption, the steps lost (goal: at most one checkpoint interval without a
notice, 0 with one) and the time from relaunch to the first resumed step (against the first
attempt's time from its start to its first step), then the total
overhead against the uninterrupted run and whether the final weights are identical.

    .venv/bin/python benchmarks/chaos_recovery.py [--preemptions 10] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preemptions", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=40, help="tiny recipe: 2 steps per epoch")
    parser.add_argument("--checkpoint-every", type=int, default=4)
    args = parser.parse_args()
    cli = Path(sys.executable).parent / "vicuna-sky"
    with tempfile.TemporaryDirectory() as tmp:
        report_path = Path(tmp) / "report.json"
        cmd = [
            str(cli),
            "chaos",
            "train",
            "tiny-cpu",
            "--preemptions",
            str(args.preemptions),
            "--seed",
            str(args.seed),
            "--workdir",
            str(Path(tmp) / "chaos"),
            "--json",
            str(report_path),
            "--env",
            f"NUM_EPOCHS={args.epochs}",
            "--env",
            f"CHECKPOINT_EVERY_STEPS={args.checkpoint_every}",
        ]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if not report_path.exists():
            raise SystemExit(result.stdout[-3000:] + result.stderr[-3000:])
        report = json.loads(report_path.read_text())
    print(result.stdout)
    pre = report["preemptions"]
    for kind in ("kill", "notice"):
        mine = [p for p in pre if p["kind"] == kind]
        if not mine:
            continue
        lost = [p["steps_lost"] for p in mine]
        resume = [p["seconds_to_resume"] for p in mine]
        print(
            f"{kind:>6}: {len(mine)} preemptions, steps lost {lost} (max {max(lost)}, "
            f"checkpoint interval {args.checkpoint_every}), s to first resumed step "
            f"median {statistics.median(resume):.1f} max {max(resume):.1f}"
        )
    print(
        f"first attempt: {report['seconds_to_first_step']:.1f} s from its start to its first "
        "step (setup, model load), against the relaunches' s to first resumed step above"
    )
    overhead = report["wall_seconds"] - report["reference_wall_seconds"]
    print(
        f"total: {report['steps']} steps, wall {report['wall_seconds']:.1f} s vs "
        f"{report['reference_wall_seconds']:.1f} s uninterrupted (+{overhead:.1f} s, "
        f"{overhead / len(pre):.1f} s per preemption); identical weights: "
        f"{report['identical_to_uninterrupted']}"
    )


if __name__ == "__main__":
    main()
