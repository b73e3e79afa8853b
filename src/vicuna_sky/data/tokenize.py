"""Token ids and labels for training: loss on the assistant's answers and nothing else.

Labels are built by construction. The template renders the conversation and reports the
character spans of the answers; the tokenizer's offset mapping says which characters each token
covers; a token carries loss exactly when it lies inside an answer span. A token that straddles
a span boundary means the template and tokenizer disagree about where an answer starts: that is a
`LabelMismatch`, raised, never a silently masked sample.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from vicuna_sky.data.conversation import Message, Template, from_sharegpt
from vicuna_sky.errors import VicunaSkyError

IGNORE_INDEX = -100
"""The label PyTorch's cross-entropy skips."""


class LabelMismatch(VicunaSkyError):
    """The tokens and the template's answer spans do not line up."""


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]

    @property
    def trainable(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def _label_tokens(
    offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]], text: str
) -> list[bool]:
    inside = [False] * len(offsets)
    hits = [0] * len(spans)
    j = 0  # spans and token offsets both run left to right: one pass over each
    for i, (a, b) in enumerate(offsets):
        if a == b:  # added special tokens (BOS) cover no text
            continue
        while j < len(spans) and spans[j][1] <= a:
            j += 1
        if j == len(spans):
            break
        start, end = spans[j]
        if start <= a and b <= end:
            inside[i] = True
            hits[j] += 1
        elif a < start < b or a < end < b:
            raise LabelMismatch(
                f"token {i} covers {text[a:b]!r} across an answer boundary at "
                f"character {start if a < start < b else end}"
            )
    for (start, end), n in zip(spans, hits, strict=True):
        if n == 0:
            raise LabelMismatch(f"the answer at characters {start}-{end} has no tokens")
    return inside


def tokenize_messages(
    messages: Sequence[Message],
    template: Template,
    tokenizer: Any,
    max_length: int | None = None,
    end_of_turn_on_last: bool = True,
) -> Tokenized:
    """Render, tokenize once, and label by offsets. `end_of_turn_on_last=False` (an answer that
    was truncated) keeps the last answer's end-of-turn tokens out of the loss, so the model is
    never taught to stop where the text was merely cut."""
    rendered = template.render(messages)
    enc = tokenizer(
        rendered.text,
        add_special_tokens=not rendered.has_bos,
        return_offsets_mapping=True,
    )
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    inside = _label_tokens(offsets, rendered.spans, rendered.text)
    if not end_of_turn_on_last and rendered.spans:
        tail = rendered.text[: rendered.spans[-1][1]]
        marker = next((s for s in template.stop if tail.endswith(s)), "")
        cut = rendered.spans[-1][1] - len(marker)
        for i, (a, _) in enumerate(offsets):
            if a >= cut and a < rendered.spans[-1][1]:
                inside[i] = False
    labels = [t if keep else IGNORE_INDEX for t, keep in zip(ids, inside, strict=True)]
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return Tokenized(ids, labels)


def tokenize_sample(
    sample: dict, template: Template, tokenizer: Any, max_length: int | None = None
) -> Tokenized:
    """A ShareGPT sample; a segment that `split` marked `truncated` gets no end-of-turn loss."""
    return tokenize_messages(
        from_sharegpt(sample["conversations"]),
        template,
        tokenizer,
        max_length,
        end_of_turn_on_last=not sample.get("truncated", False),
    )


def count_tokens(messages: Sequence[Message], template: Template, tokenizer: Any) -> int:
    """Length in tokens of the conversation as the trainer will see it (before truncation)."""
    rendered = template.render(messages)
    return len(tokenizer(rendered.text, add_special_tokens=not rendered.has_bos)["input_ids"])


@dataclass
class Packed:
    """Several samples in one sequence; `position_ids` restart at 0 where each sample starts."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]


def pack(samples: Iterable[Tokenized], max_length: int) -> list[Packed]:
    """Greedy packing in order (deterministic, so a seeded shuffle upstream stays meaningful).
    A sample's first label must be ignored: with position ids reset, the token before it belongs
    to another sample and must not be trained to predict it."""
    packs: list[Packed] = []
    current = Packed([], [], [])
    for sample in samples:
        n = min(len(sample.input_ids), max_length)
        if n == 0:
            continue
        if sample.labels[0] != IGNORE_INDEX:
            raise LabelMismatch("a sample's first token carries loss; it cannot be packed")
        if current.input_ids and len(current.input_ids) + n > max_length:
            packs.append(current)
            current = Packed([], [], [])
        current.input_ids += sample.input_ids[:n]
        current.labels += sample.labels[:n]
        current.position_ids += list(range(n))
    if current.input_ids:
        packs.append(current)
    return packs


def block_causal_mask(position_ids: Any) -> Any:
    """A boolean attention mask [batch, 1, L, L] for packed rows: causal, and a token sees only
    its own sample (a new sample begins wherever position ids go back to 0)."""
    import torch

    position_ids = torch.as_tensor(position_ids)
    if position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0)
    starts = (position_ids == 0).long()
    starts[:, 0] = 1
    segment = torch.cumsum(starts, dim=1)
    same = segment.unsqueeze(2) == segment.unsqueeze(1)
    length = position_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    return (same & causal).unsqueeze(1)
