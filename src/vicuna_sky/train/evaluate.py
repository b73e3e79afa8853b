"""Validation loss: the token-weighted mean next-token loss over the whole held-out set.

The eval set is tokenized, labelled and (with --packing) packed exactly as the training data,
and every batch goes through the same forward and loss as a training micro-batch
(`loss.batch_loss_sum`), so the number is comparable with the training loss. Rows are dealt to
ranks round-robin in micro-batches; every rank runs the same number of forward passes (FSDP's
all-gathers are collective), a rank with no row left runs one whose labels are all masked.
The sums are all-reduced and divided by the set's answer-token count, known on every rank.

An eval leaves training exactly as it found it: no gradient, train mode restored, every RNG
state restored (dropout is off in eval mode, but nothing here relies on it), and the sampler is
never touched. A run with evals ends bit-identical to one without.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as torch_dist

from vicuna_sky.data.tokenize import IGNORE_INDEX
from vicuna_sky.train.checkpoint import rng_state, set_rng_state
from vicuna_sky.train.data import Dataset, collate
from vicuna_sky.train.dist import World
from vicuna_sky.train.loss import batch_loss_sum


class Evaluator:
    def __init__(
        self,
        dataset: Dataset,
        world: World,
        micro_batch_size: int,
        pad_id: int,
        attention: str,
        pad_to: int,
        chunk_tokens: int,
    ) -> None:
        self.dataset, self.world, self.micro = dataset, world, micro_batch_size
        self.pad_id, self.attention, self.pad_to = pad_id, attention, pad_to
        self.chunk_tokens = chunk_tokens
        self.tokens = sum(dataset.answer_tokens)
        """Answer tokens of the whole eval set: the denominator, the same on every rank."""

    def rows(self) -> list[list[int]]:
        """This rank's micro-batches of row indices; an empty one where it has run out."""
        per_round = self.world.size * self.micro
        rounds = math.ceil(len(self.dataset) / per_round)
        out = []
        for k in range(rounds):
            start = k * per_round + self.world.rank * self.micro
            out.append(list(range(start, min(start + self.micro, len(self.dataset)))))
        return out

    def loss(self, model: torch.nn.Module) -> float:
        """The mean loss per answer token over the whole eval set (every rank returns it)."""
        saved = rng_state()
        was_training = model.training
        model.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.world.device)
        try:
            with torch.no_grad():
                for indices in self.rows():
                    batch = collate(
                        self.dataset, indices or [0], self.pad_id, self.attention, self.pad_to
                    )
                    if not indices:  # the same forward as the others, counting nothing
                        batch["labels"].fill_(IGNORE_INDEX)
                    loss_sum = batch_loss_sum(model, batch, self.world.device, self.chunk_tokens)
                    total += loss_sum.double()
            torch_dist.all_reduce(total)
        finally:
            model.train(was_training)
            set_rng_state(saved)
        return total.item() / max(1, self.tokens)
