"""Next-token cross-entropy summed over answer tokens, without an fp32 copy of the full logits.

A [batch, length, vocab] tensor of logits is the largest activation of a Llama step (4 x 2048 x
32000 in bf16 is 0.5 GB); upcasting it whole to fp32 for the loss, and keeping that copy and its
softmax for the backward pass, costs 2-3 GB more and as many memory passes. Here the labels are
shifted instead of the logits (a sliced logits view would be copied to flatten it), and the loss
is computed chunk by chunk: each chunk is upcast to fp32 inside an activation checkpoint, so
forward and backward hold one chunk's fp32 logits at a time. The sum equals the unchunked loss
up to summation order.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from vicuna_sky.data.tokenize import IGNORE_INDEX


def _chunk_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


def next_token_loss_sum(
    logits: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = 4096
) -> torch.Tensor:
    """Sum over positions t of -log p(labels[t + 1] | logits[t]); IGNORE_INDEX labels add
    nothing. `logits` [batch, length, vocab] in any dtype, `labels` [batch, length]."""
    vocab = logits.size(-1)
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
    flat = logits.reshape(-1, vocab)  # a view: logits come contiguous from the LM head
    total = logits.new_zeros((), dtype=torch.float32)
    for start in range(0, flat.size(0), chunk_tokens):
        part = slice(start, start + chunk_tokens)
        if flat.requires_grad:
            total = total + checkpoint(_chunk_loss, flat[part], shifted[part], use_reentrant=False)
        else:
            total = total + _chunk_loss(flat[part], shifted[part])
    return total


def batch_loss_sum(
    model: torch.nn.Module, batch: dict, device: torch.device, chunk_tokens: int
) -> torch.Tensor:
    """One forward pass over a collated batch: its summed answer-token loss, on the device.
    Training and evaluation both call this, so an eval loss is the training loss's twin."""
    from vicuna_sky.train.model import document_block_mask

    batch = to_device(batch, device)
    labels = batch.pop("labels")
    segments = batch.pop("segments", None)
    if segments is not None:
        batch["attention_mask"] = document_block_mask(segments)
    logits = model(**batch).logits
    return next_token_loss_sum(logits, labels, chunk_tokens)


def to_device(batch: dict[str, torch.Tensor | None], device: torch.device) -> dict:
    """Host tensors to the device without a host sync: a copy from pageable memory makes the
    host wait for the device's queue, one from pinned memory is queued like a kernel."""
    if device.type != "cuda":
        return dict(batch)
    return {
        k: v.pin_memory().to(device, non_blocking=True) if v is not None else None
        for k, v in batch.items()
    }
