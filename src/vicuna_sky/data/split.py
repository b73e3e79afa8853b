"""`vicuna-sky data split`: conversations split into segments that fit the training context.

Lengths are measured on the text the trainer sees: the conversation rendered by the training
template and tokenized. Segments break only between rounds (a question and its answer), each
segment is a complete conversation (the system message repeated), the last round is never lost,
and no segment is empty. A single round longer than the context follows `overlong`:

- `truncate` (default): keep the question, cut the answer to fit, mark the segment
  `"truncated": true` (the tokenizer then keeps the cut answer's end-of-turn token out of the
  loss). A question that alone does not fit is dropped.
- `drop`: drop the round.

A held-out set (`eval_fraction` or `eval_count`) is chosen among the input conversations before
they are segmented, so every segment of a conversation lands on the same side: no conversation
is partly trained on and partly evaluated. Which conversations are held out depends only on the
seed and their ids (a seeded hash), not on the order of the file or the tokenizer.
"""

from __future__ import annotations

import functools
import hashlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vicuna_sky.data.conversation import Template, from_sharegpt, get_template
from vicuna_sky.data.parallel import parallel_map
from vicuna_sky.data.sharegpt import GPT, HUMAN, SYSTEM, Problem, Report
from vicuna_sky.data.tokenize import count_tokens
from vicuna_sky.errors import VicunaSkyError

OVERLONG = ("truncate", "drop")

Measure = Callable[[list[dict]], int]
"""Token length of ShareGPT turns as rendered by the template."""


@dataclass(frozen=True)
class SplitConfig:
    tokenizer: str
    """Path or hub id of the tokenizer the model trains with."""
    max_length: int
    """Context length in tokens every segment must fit."""
    template: str = "vicuna_v1.1"
    overlong: str = "truncate"
    """What happens to one round longer than max_length: truncate or drop."""
    workers: int = 0
    eval_fraction: float = 0.0
    """Share of the conversations held out for evaluation (0 = none)."""
    eval_count: int = 0
    """Conversations held out for evaluation; wins over eval_fraction when set."""
    seed: int = 0
    """Which conversations are held out: the same seed and ids always pick the same ones."""


def _segment(sample: dict, turns: list[dict], first_turn: int, whole: bool) -> dict:
    out = {**sample, "conversations": turns}
    out.pop("truncated", None)
    if not whole:
        out["id"] = f"{sample['id']}_{first_turn}"
    return out


def _truncate_answer(
    system: list[dict],
    question: dict,
    answer: dict,
    measure: Measure,
    tokenizer: Any,
    max_length: int,
) -> dict | None:
    """The longest answer prefix (on token boundaries) that fits, or None if none does."""
    offsets = tokenizer(answer["value"], add_special_tokens=False, return_offsets_mapping=True)[
        "offset_mapping"
    ]
    ends = [end for _, end in offsets]

    def fits(k: int) -> bool:
        cut = {"from": GPT, "value": answer["value"][: ends[k - 1]]}
        return measure([*system, question, cut]) <= max_length

    lo, hi = 0, len(ends)  # fits(lo) is true by convention; find the largest k that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    if lo == 0:
        return None
    return {"from": GPT, "value": answer["value"][: ends[lo - 1]]}


def split_sample(
    sample: dict, measure: Measure, tokenizer: Any, max_length: int, overlong: str
) -> tuple[list[dict], Counter]:
    """Segments of one conversation and what happened to it (for the summary)."""
    counts: Counter = Counter()
    turns = sample["conversations"]
    system = turns[:1] if turns and turns[0]["from"] == SYSTEM else []
    body = turns[len(system) :]
    if len(body) % 2 or any(t["from"] != (HUMAN, GPT)[i % 2] for i, t in enumerate(body)):
        raise VicunaSkyError("roles must be human/gpt pairs; run `vicuna-sky data clean` first")
    if not body:  # a sample with nothing to learn from is skipped, never written
        raise VicunaSkyError("no human/gpt round")
    if measure(turns) <= max_length:
        return [_segment(sample, turns, 0, whole=True)], counts
    segments: list[dict] = []
    current: list[dict] = []
    start = 0  # index (in the original turns) of the current segment's first turn
    for i in range(0, len(body), 2):
        pair, index = body[i : i + 2], len(system) + i
        if current and measure([*system, *current, *pair]) <= max_length:
            current += pair
            continue
        if current:
            segments.append(_segment(sample, system + current, start, whole=False))
            current = []
        if measure([*system, *pair]) <= max_length:
            current, start = list(pair), index
            continue
        cut = (
            _truncate_answer(system, pair[0], pair[1], measure, tokenizer, max_length)
            if overlong == "truncate"
            else None
        )
        if cut is None:
            counts["rounds_dropped"] += 1
            continue
        counts["rounds_truncated"] += 1
        segment = _segment(sample, [*system, pair[0], cut], index, whole=False)
        segments.append({**segment, "truncated": True})
    if current:
        segments.append(_segment(sample, system + current, start, whole=False))
    # Split means two or more segments: one round cut to fit is counted as truncated only.
    if len(segments) > 1:
        counts["conversations_split"] += 1
    elif not segments:
        counts["conversations_dropped"] += 1
    return segments, counts


def measure_with(template: Template, tokenizer: Any) -> Measure:
    return lambda turns: count_tokens(from_sharegpt(turns), template, tokenizer)


_worker: dict[str, Any] = {}


def _load_worker(config: SplitConfig) -> None:
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tokenizer = load_tokenizer(config.tokenizer)
    template = get_template(config.template, tokenizer)
    _worker["tokenizer"] = tokenizer
    _worker["measure"] = measure_with(template, tokenizer)


def _split_in_worker(sample: dict, config: SplitConfig) -> tuple[list[dict], Counter, str]:
    try:
        segments, counts = split_sample(
            sample, _worker["measure"], _worker["tokenizer"], config.max_length, config.overlong
        )
    except VicunaSkyError as e:
        return [], Counter(), str(e)
    return segments, counts, ""


def load_tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if Path(name).is_file():
        raise VicunaSkyError(
            f"--tokenizer {name} is a file: give the directory that holds it (or a hub id)"
        )
    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as e:  # transformers raises many kinds for a bad directory
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VicunaSkyError(f"cannot load tokenizer {name!r}: {first}") from None


def unique_ids(samples: list[dict]) -> int:
    """Make ids unique in place (an input id may already look like a split id); returns renames."""
    seen: set[str] = set()
    renamed = 0
    for s in samples:
        base, n = s["id"], 1
        while s["id"] in seen:
            n += 1
            s["id"] = f"{base}#{n}"
        renamed += s["id"] != base
        seen.add(s["id"])
    return renamed


def held_out(samples: list[dict], config: SplitConfig) -> set[int]:
    """Indices of the input conversations held out: those whose seeded hash of the id ranks
    lowest. A hash, not a shuffle, so a conversation's side does not depend on the others."""
    n = len(samples)
    if config.eval_count:
        count = config.eval_count
    elif config.eval_fraction:
        count = max(1, round(config.eval_fraction * n))
    else:
        return set()
    if count >= n:
        raise VicunaSkyError(
            f"holding out {count} of {n} conversations leaves none to train on: "
            "hold out fewer (--eval-count / --eval-fraction)"
        )

    def rank(i: int) -> tuple[bytes, int]:
        key = f"{config.seed}\0{samples[i].get('id')}".encode()
        return hashlib.sha256(key).digest(), i  # equal ids (never after clean): input order

    return set(sorted(range(n), key=rank)[:count])


def split(samples: list[dict], config: SplitConfig, show_progress: bool = True) -> Report:
    """Segments to train on in `samples`; with a held-out share, the held-out conversations'
    segments in `held_out` (ids are unique across both)."""
    if config.overlong not in OVERLONG:
        raise VicunaSkyError(f"--overlong must be one of {', '.join(OVERLONG)}")
    if config.max_length < 8:
        raise VicunaSkyError(f"--max-length {config.max_length} is too small to hold a round")
    if not 0 <= config.eval_fraction < 1:
        raise VicunaSkyError(f"--eval-fraction {config.eval_fraction}: must be in [0, 1)")
    if config.eval_count < 0:
        raise VicunaSkyError(f"--eval-count {config.eval_count}: must not be negative")
    evaluate = held_out(samples, config)
    _load_worker(config)  # fail fast on a bad tokenizer/template, before forking workers
    results = parallel_map(
        functools.partial(_split_in_worker, config=config),
        samples,
        workers=config.workers,
        description="splitting",
        initializer=_load_worker,
        initargs=(config,),
        show_progress=show_progress,
    )
    report = Report(samples=[])
    for i, (sample, (segments, counts, error)) in enumerate(zip(samples, results, strict=True)):
        if error:
            report.problems.append(Problem(repr(sample["id"]), "conversations", error))
            report.counts["malformed"] += 1
            continue
        if i in evaluate:
            report.held_out += segments
            report.counts["conversations_held_out"] += 1
        else:
            report.samples += segments
        report.counts.update(counts)
    # Unique over both files: an eval record names one conversation, never a training one.
    report.counts["ids_renamed"] = unique_ids(report.samples + report.held_out)
    report.counts["segments"] = len(report.samples)
    if evaluate:
        report.counts["held_out_segments"] = len(report.held_out)
    return report
