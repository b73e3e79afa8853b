"""Checkpoints: DCP to a local directory, uploaded in the background by checkpoints_sync.

A checkpoint holds the sharded model and optimizer (torch.distributed.checkpoint, so it can be
loaded by a different number of processes), the scheduler, step, sampler position and every
rank's RNG state. Of the model only what training changes: frozen parameters (a LoRA run's base
model) are loaded from the base model at every start, so they are neither written nor
uploaded. Locally a step directory is complete once DCP has written `.metadata` (it writes it
last); in the bucket once checkpoints_sync has committed its manifest. At start the newest
complete checkpoint wins, from the bucket or the local disk.

A periodic save holds training up only while the state is copied to host memory: DCP's
`async_save` writes the files in a background thread (over a gloo group of its own), and the
step directory is handed to the uploader once written. One save is in flight at a time. The
emergency save on a preemption notice, and every save of a multi-node run (whose commit is a
collective over the training group), are synchronous.
"""

from __future__ import annotations

import logging
import random
import shutil
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from checkpoints_sync import AsyncUploader, Checkpoints, open_store
from checkpoints_sync import manifest as manifest_lib
from checkpoints_sync.checkpoints import parse_step
from vicuna_sky.train.dist import World

log = logging.getLogger("vicuna_sky.train")
DCP_MARKER = ".metadata"
LOAD_TRAINED_ONLY = StateDictOptions(strict=False)
"""A checkpoint has no frozen parameters, and loading it leaves them as the base model gave
them. Not strict about them only: `dcp.load` still fails on any parameter of the template the
checkpoint lacks."""


def trained_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model, optimizer) state dicts without the frozen parameters. By every name they have:
    `ignore_frozen_params` drops a tied weight under its first name only, and SmolLM2's frozen
    output head (the embedding, tied) would stay in every LoRA checkpoint as 113 MB."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    frozen = {
        name
        for name, param in model.named_parameters(remove_duplicate=False)
        if not param.requires_grad
    }
    return {k: v for k, v in model_sd.items() if k not in frozen}, optim_sd


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def local_steps(root: Path) -> list[int]:
    """Complete local checkpoints, oldest first."""
    if not root.is_dir():
        return []
    return sorted(
        s
        for d in root.iterdir()
        if (s := parse_step(d.name)) is not None and (d / DCP_MARKER).exists()
    )


class CheckpointManager:
    def __init__(self, root: Path, url: str, keep: int, world: World) -> None:
        self.root, self.url, self.keep, self.world = Path(root), url, keep, world
        self.remote = Checkpoints(open_store(url)) if url else None
        # One machine: its first process uploads in the background. Several machines: each
        # holds only its own processes' shards, so the commit is made together (see save).
        single = self.remote and world.is_main and world.single_node
        self.uploader = AsyncUploader(self.remote, keep=keep) if single else None
        self.async_saves = world.single_node and world.checkpoint is not None
        self._saving: tuple[Future, Path, int] | None = None

    # -- resume ----------------------------------------------------------------------------
    def find_resume_step(self) -> int | None:
        """The newest complete checkpoint, bucket or local; a bucket one is downloaded (by each
        node's first process: every process reads the shards it needs from its node's disk)."""
        choice = None
        if self.world.local_rank == 0:
            local = local_steps(self.root)
            remote = self.remote.committed() if self.remote else []
            best_local = local[-1] if local else None
            for step in reversed(remote):
                if best_local is not None and best_local >= step:
                    break
                try:
                    self.remote.download(step, self.root / f"step-{step}", replace=True)
                    choice = step
                    log.info("downloaded step-%d from %s", step, self.url)
                    break
                except Exception as e:
                    log.warning("cannot use step-%d from the bucket: %s", step, e)
            if choice is None:
                choice = best_local
        # Each node's first process decided for its node; all nodes must resume from one step.
        steps = [
            s for first, s in _all_gather((self.world.local_rank == 0, choice), self.world) if first
        ]
        return None if any(s is None for s in steps) else min(steps)

    def load(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        extra: dict[str, Any],
    ) -> dict[str, Any]:
        model_sd, optim_sd = trained_state(model, optimizer)
        state = {
            "model": model_sd,
            "optim": optim_sd,
            "extra": extra,
            f"rng_rank{self.world.rank}": rng_state(),
        }
        dcp.load(state, checkpoint_id=str(self.root / f"step-{step}"))
        set_state_dict(
            model,
            optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
            options=LOAD_TRAINED_ONLY,
        )
        set_rng_state(state[f"rng_rank{self.world.rank}"])
        return state["extra"]

    # -- save ------------------------------------------------------------------------------
    def save(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        extra: dict[str, Any],
        blocking: bool = False,
    ) -> float:
        """Save step-N; the seconds training was held up (the previous save's end, the copy
        to host memory, and with `blocking` the whole write)."""
        start = time.monotonic()
        self.wait_for_save()
        directory = self.root / f"step-{step}"
        if self.world.local_rank == 0 and directory.exists():
            shutil.rmtree(directory)  # a stale half-save of this step from an earlier attempt
        torch.distributed.barrier()
        model_sd, optim_sd = trained_state(model, optimizer)
        state = {
            "model": model_sd,
            "optim": optim_sd,
            "extra": extra,
            f"rng_rank{self.world.rank}": rng_state(),
        }
        if self.async_saves and not blocking:
            future = dcp.async_save(
                state, checkpoint_id=str(directory), process_group=self.world.checkpoint
            )
            self._saving = (future, directory, step)
        else:
            dcp.save(state, checkpoint_id=str(directory))
            self._written(directory, step)
        return time.monotonic() - start

    def poll(self) -> None:
        """Hand a finished background save on to the uploader (cheap: call it every step)."""
        if self._saving is not None and self._saving[0].done():
            self.wait_for_save()

    def wait_for_save(self) -> None:
        """Block until the save in flight is written (its error, if any, is raised here)."""
        if self._saving is None:
            return
        future, directory, step = self._saving
        self._saving = None
        future.result()
        self._written(directory, step)

    def _written(self, directory: Path, step: int) -> None:
        if self.uploader:
            self.uploader.submit(directory, step)
        elif self.remote and not self.world.single_node:
            self._commit_across_nodes(directory, step)
        self._prune_local()

    def _commit_across_nodes(self, directory: Path, step: int) -> None:
        """Each node uploads the files its processes wrote; the first process then writes the
        manifest of all of them, so the step is committed only when every node's part is in."""
        files: tuple = ()
        if self.world.local_rank == 0:
            if self.world.is_main:
                self.remote.uncommit(step)
            torch.distributed.barrier()
            files = manifest_lib.build(directory, step).files
            self.remote.upload_files(directory, step, files)
        else:
            torch.distributed.barrier()
        everything = {f.path: f for part in _all_gather(files, self.world) for f in part}
        if self.world.is_main:
            manifest = manifest_lib.Manifest(
                step, time.time(), tuple(sorted(everything.values(), key=lambda f: f.path))
            )
            self.remote.write_manifest(manifest)
            self.remote.gc(self.keep)
        torch.distributed.barrier()

    def _prune_local(self) -> None:
        if self.world.local_rank != 0:
            return
        uploaded = {r.step for r in self.uploader.results if r.ok} if self.uploader else None
        steps = local_steps(self.root)
        for step in steps[: -self.keep]:
            if uploaded is None or step in uploaded:
                shutil.rmtree(self.root / f"step-{step}", ignore_errors=True)

    def wait(self) -> float:
        """Block until handed-over uploads are committed; seconds waited."""
        start = time.monotonic()
        self.wait_for_save()
        if self.uploader:
            self.uploader.wait()
        return time.monotonic() - start

    def close(self) -> None:
        if self._saving is not None:
            step = self._saving[2]
            try:  # on the way out after an error: finish the write, never raise over it
                self.wait_for_save()
            except Exception as e:
                log.warning("checkpoint step-%d was not written: %s", step, e)
        if self.uploader:
            self.uploader.close()


def _all_gather(value: object, world: World) -> list[object]:
    out: list[object] = [None] * world.size
    torch.distributed.all_gather_object(out, value)
    return out
