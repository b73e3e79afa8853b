"""The process group from torchrun's environment: gloo on CPU, nccl on GPU, one device mesh."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int
    local_size: int
    device: torch.device
    control: Any = field(default=None, compare=False)
    """A gloo group for host-side decisions (stop now?): an answer needs no GPU sync."""
    checkpoint: Any = field(default=None, compare=False)
    """A gloo group of its own for DCP's background saves, so their collectives never run
    concurrently with training's on the same group."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def single_node(self) -> bool:
        return self.size == self.local_size


def init() -> World:
    """Join the process group torchrun set up (a lone `python -m` run is a world of one)."""
    rank = int(os.environ.get("RANK", "0"))
    size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(size)))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(size))
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
    # On CPU the default group is gloo already; on GPU it is NCCL, whose results live on the
    # device and so cost a host sync to read.
    control = dist.new_group(backend="gloo") if backend != "gloo" else None
    checkpoint = dist.new_group(backend="gloo")
    return World(rank, size, local_rank, local_size, device, control, checkpoint)


def mesh(world: World):  # noqa: ANN201 (DeviceMesh)
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(world.device.type, (world.size,), mesh_dim_names=("dp",))


def any_rank(flag: bool, world: World) -> bool:
    """True on every rank when it is true on any: all ranks must stop at the same step."""
    t = torch.tensor([1 if flag else 0])  # on the host, over gloo: no wait for the GPU
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=world.control)
    return bool(t.item())


def broadcast_object(value: object, world: World) -> object:
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
