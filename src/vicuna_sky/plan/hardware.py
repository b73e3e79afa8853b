"""What the planner knows about a GPU type without asking a cloud: its peak dense bf16 tensor
FLOP/s and its memory, from the vendors' data sheets. Names are SkyPilot's (A100 is the 40 GB
part, A100-80GB the 80 GB one); a name is matched whatever its case."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Gpu:
    name: str
    """SkyPilot's name for it."""
    peak_flops: float
    """Dense bf16/fp16 tensor FLOP/s (no sparsity)."""
    memory_gb: float
    """Device memory, GB (1e9 bytes, as the data sheets state it)."""


GPUS = {
    g.name: g
    for g in (
        Gpu("A100", 312e12, 40),
        Gpu("A100-80GB", 312e12, 80),
        Gpu("H100", 989e12, 80),
        Gpu("H100-MEGA", 989e12, 80),
        Gpu("H200", 989e12, 141),
        Gpu("B200", 2250e12, 180),
        Gpu("L40S", 362e12, 48),
        Gpu("L4", 121e12, 24),
        Gpu("A10G", 70e12, 24),
        Gpu("A10", 125e12, 24),
        Gpu("V100", 125e12, 16),
        Gpu("V100-32GB", 125e12, 32),
        Gpu("T4", 65e12, 16),
    )
}

_BY_LOWER = {name.lower(): gpu for name, gpu in GPUS.items()}


def lookup(name: str) -> Gpu | None:
    """The GPU of this name in any case (`a100-80gb` is A100-80GB); None when unknown."""
    return _BY_LOWER.get(name.strip().lower())
