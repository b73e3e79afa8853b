"""What the local cloud tells its user: where a run keeps its files, and a run's logs."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from vicuna_sky.launch import jobs
from vicuna_sky.launch.tasks import Spec
from vicuna_sky.localcloud.cluster import LocalConfig
from vicuna_sky.recipe import Recipe
from vicuna_sky.terminal import make_console

console = make_console()


def print_local_places(spec: Spec, recipe: Recipe, task: object, config: LocalConfig) -> None:
    """Where a local run reads and writes: the folders standing in for the task's bucket."""
    bucket = task.envs.get("BUCKET_URL", recipe.bucket)
    folder = config.bucket_dir(bucket)
    console.print(f"local backend: {bucket} is the folder {folder}")
    console.print(f"  runs (status, attempts, logs): {Path(config.runs_dir).resolve()}")
    if spec is Spec.TRAIN:
        console.print(f"  data: {folder / task.envs.get('DATA_PATH', recipe.data.path)}")
        console.print(f"  checkpoints: {folder / 'runs' / task.envs.get('RUN_NAME', '')}")
        console.print(f"  exported model: {folder / 'models' / task.envs.get('RUN_NAME', '')}")


def show_local_logs(job: jobs.LocalJob, follow: bool = False) -> None:
    """A local run's newest attempt's logs; with `follow`, as they grow until it ends."""
    if follow:
        _follow(job)
        return
    for log in jobs.latest_logs(job):
        console.rule(str(log))
        console.print(log.read_text(errors="replace"), markup=False, highlight=False)


def _follow(job: jobs.LocalJob, poll: float = 0.5) -> None:
    """Print the run's events and its newest attempt's logs as they grow, until it ends (a
    recovery's new attempt is followed too)."""
    run_dir = Path(job.run_dir)
    offsets: dict[Path, int] = {}
    while True:
        current = jobs.LocalJob.load(run_dir)
        for path in [run_dir / "events.log", *jobs.latest_logs(current)]:
            if not path.exists():
                continue
            with path.open("rb") as f:
                f.seek(offsets.get(path, 0))
                chunk = f.read()
                offsets[path] = f.tell()
            if chunk:
                sys.stdout.write(chunk.decode(errors="replace"))
                sys.stdout.flush()
        if not jobs.in_progress(current):
            console.print(f"{current.name}: {current.status}")
            return
        time.sleep(poll)
