"""Training data: tokenized samples, optional packing, a resumable seeded sampler, batches.

Order is a function of (seed, epoch) only, and the sampler's position counts samples consumed
globally, so a run resumed from a checkpoint sees exactly the batches it would have seen, on any
number of processes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vicuna_sky.data.conversation import get_template
from vicuna_sky.data.tokenize import (
    IGNORE_INDEX,
    Tokenized,
    block_causal_mask,
    pack,
    tokenize_sample,
)
from vicuna_sky.errors import VicunaSkyError


@dataclass
class Dataset:
    samples: list[Tokenized]
    position_ids: list[list[int]] | None = None
    """Set when samples are packs: position ids restart at each packed sample."""

    def __post_init__(self) -> None:
        # Per row: tokens, and tokens predicted with a loss (a label at position >= 1). The
        # trainer normalises by the global batch's count, known here on every process without
        # a collective (every process has the data and the global batch's indices).
        self.tokens = [len(s.input_ids) for s in self.samples]
        self.answer_tokens = [sum(x != IGNORE_INDEX for x in s.labels[1:]) for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)


def load_dataset(
    path: Path, tokenizer: Any, template: str, max_length: int, packing: bool
) -> Dataset:
    samples = json.loads(Path(path).read_text())
    tpl = get_template(template, tokenizer)
    tokenized = [tokenize_sample(s, tpl, tokenizer, max_length) for s in samples]
    tokenized = [t for t in tokenized if t.trainable > 0]
    if not tokenized:
        raise VicunaSkyError(f"{path}: no sample has an answer token to train on")
    if not packing:
        return Dataset(tokenized)
    packs = pack(tokenized, max_length)
    return Dataset(
        [Tokenized(p.input_ids, p.labels) for p in packs], [p.position_ids for p in packs]
    )


class ResumableSampler:
    """Global batches of sample indices: a seeded permutation per epoch, consumed in order.
    Each optimizer step takes `global_batch` indices; a rank's micro-batch k is a fixed slice."""

    def __init__(self, size: int, global_batch: int, seed: int) -> None:
        if size < global_batch:
            raise VicunaSkyError(
                f"{size} training samples cannot fill one global batch of {global_batch}"
            )
        self.size, self.global_batch, self.seed = size, global_batch, seed
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    @property
    def steps_per_epoch(self) -> int:
        return self.size // self.global_batch  # the remainder of an epoch is dropped

    def _permutation(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def next_batch(self) -> list[int]:
        if self.position + self.global_batch > self.size:
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        batch = self._order[self.position : self.position + self.global_batch]
        self.position += self.global_batch
        return batch

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "size": self.size,
            "global_batch": self.global_batch,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("size", "global_batch", "seed"):
            if state[key] != getattr(self, key):
                raise VicunaSkyError(
                    f"the checkpoint was taken with {key}={state[key]}, this run has "
                    f"{getattr(self, key)}: resume with the same data and batch settings"
                )
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._permutation(self.epoch)


def micro_batches(batch: list[int], rank: int, world: int, micro: int) -> list[list[int]]:
    """This rank's micro-batches of one global batch: slot (k * world + rank)."""
    per_step = world * micro
    return [
        batch[k * per_step + rank * micro : k * per_step + (rank + 1) * micro]
        for k in range(len(batch) // per_step)
    ]


def collate(
    dataset: Dataset, indices: list[int], pad_id: int, attention: str, pad_to: int = 0
) -> dict[str, torch.Tensor]:
    """Right-padded tensors, at least `pad_to` long (a fixed shape lets a compiled attention
    kernel be reused instead of recompiled per length). Packed rows get position ids and what
    the attention reads sample boundaries from: flash_attention_2 the position ids themselves,
    flex_attention `segments` (sample ids; the trainer makes its block mask on the device), SDPA
    a dense block-causal mask."""
    rows = [dataset.samples[i] for i in indices]
    length = max(pad_to, *(len(r.input_ids) for r in rows))
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        ids[i, :n] = torch.tensor(r.input_ids)
        labels[i, :n] = torch.tensor(r.labels)
        mask[i, :n] = 1
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    if dataset.position_ids is not None:
        pos = torch.zeros((len(rows), length), dtype=torch.long)
        for i, idx in enumerate(indices):
            p = dataset.position_ids[idx]
            pos[i, : len(p)] = torch.tensor(p)
            # Padding continues the last sample's positions so it forms no new segment.
            pos[i, len(p) :] = torch.arange(p[-1] + 1, p[-1] + 1 + length - len(p))
        batch["position_ids"] = pos
        batch["attention_mask"] = None
        if attention == "flex_attention":
            segments = torch.full((len(rows), length), -1, dtype=torch.long)  # padding: -1
            for i, idx in enumerate(indices):
                p = torch.tensor(dataset.position_ids[idx])
                segments[i, : len(p)] = torch.cumsum((p == 0).long(), 0)
            batch["segments"] = segments
        elif attention != "flash_attention_2":
            batch["attention_mask"] = block_causal_mask(pos)
    return batch
