"""Which `Backend` a command runs on: SkyPilot's clouds, or with `--local` the local cloud on
this machine. Chosen here, at the top, so that the launch never imports the local cloud (which
implements the launch's interface, an arrow the other way)."""

from __future__ import annotations

from pathlib import Path

from vicuna_sky.launch.backend import Backend


def choose_backend(
    local: bool, runs_dir: Path, workdir: Path | None = None, hosts: bool = False
) -> Backend:
    """`workdir` (local only): one directory for the runs, the buckets and the exported model.
    `hosts` (local only): each node a host of its own (localcloud/network.py)."""
    if local:
        from vicuna_sky.localcloud.backend import LocalBackend

        return LocalBackend(runs_dir, workdir, hosts=hosts)
    from vicuna_sky.launch.skypilot_backend import SkyPilotBackend

    return SkyPilotBackend()
