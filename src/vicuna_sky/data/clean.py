"""`vicuna-sky data clean`: ShareGPT HTML pages in, clean markdown conversations out.

Per sample (in parallel): drop leading non-human turns and a trailing human turn, require
alternating roles, convert HTML to markdown, end the conversation at the first empty answer,
then apply the filters. Across samples (in order, in this process): drop repeated ids and repeated
(first question, first answer) pairs. Every removed sample is counted under the rule that removed
it; malformed samples are reported by id and field and skipped.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from lxml import etree

from vicuna_sky.data import language
from vicuna_sky.data.markdown import html_to_markdown
from vicuna_sky.data.parallel import parallel_map
from vicuna_sky.data.sharegpt import GPT, HUMAN, SYSTEM, Problem, Report

KEPT = "kept"
RULES = (
    "malformed",
    "too_short",
    "wrong_roles",
    "blocked_words",
    "blocked_response",
    "parser_error",
    "empty_answer",
    "language",
    "plugins",
    "duplicate_id",
    "duplicate_content",
)
"""Every reason a sample can be removed, in the order the summary lists them."""

RATE_LIMIT = "Too many requests in 1 hour. Try again later."


@dataclass(frozen=True)
class CleanConfig:
    blocked_words: tuple[str, ...] = ("openai", "chatgpt")
    """Case-insensitive substrings; a conversation containing one anywhere is dropped."""
    blocked_responses: tuple[str, ...] = (RATE_LIMIT,)
    """An answer that starts with one of these (after stray "!" or spaces) drops the sample."""
    min_chars: int = 16
    """Conversations with fewer characters of text in total are dropped."""
    lang: str | None = None
    """Keep only conversations in this ISO 639-1 language (e.g. "en"); None keeps all."""
    workers: int = 0
    """Worker processes; 0 = one per available core."""


def _is_blocked_response(text: str, responses: tuple[str, ...]) -> bool:
    head = text.lstrip(" !\n")
    return any(head.startswith(r) for r in responses)


def clean_sample(sample: dict, config: CleanConfig) -> tuple[dict | None, str, str]:
    """(cleaned sample or None, rule, detail). The rule is KEPT or one of RULES."""
    turns = list(sample["conversations"])
    system = [turns.pop(0)] if turns and turns[0]["from"] == SYSTEM else []
    while turns and turns[0]["from"] != HUMAN:
        turns.pop(0)
    if turns and turns[-1]["from"] == HUMAN:
        turns.pop()
    if len(turns) < 2:
        return None, "too_short", ""
    for i, turn in enumerate(turns):
        if turn["from"] != (HUMAN, GPT)[i % 2]:
            return None, "wrong_roles", f"turn {i} is {turn['from']!r}"
    cleaned = []
    for i, turn in enumerate(system + turns):
        try:
            text = html_to_markdown(turn["value"])
        except (RecursionError, ValueError, etree.LxmlError) as e:
            return None, "parser_error", f"conversations[{i}]: {type(e).__name__}"
        lowered = text.lower()
        if any(w in lowered for w in config.blocked_words):
            return None, "blocked_words", ""
        if turn["from"] == GPT and _is_blocked_response(text, config.blocked_responses):
            return None, "blocked_response", ""
        if turn["from"] != SYSTEM and (not text or not text[0].isprintable()):
            break  # an empty turn ends the usable conversation (as FastChat), pairs before stay
        cleaned.append({"from": turn["from"], "value": text})
    body = cleaned[len(system) :]
    body = body[: len(body) // 2 * 2]
    if not body:
        return None, "empty_answer", ""
    if sum(len(t["value"]) for t in body) < config.min_chars:
        return None, "too_short", ""
    if config.lang and not language.is_language(body, config.lang):
        return None, "language", ""
    return {**sample, "conversations": cleaned[: len(system)] + body}, KEPT, ""


def clean(samples: list[dict], config: CleanConfig, show_progress: bool = True) -> Report:
    """Clean well-formed samples (see `sharegpt.load`); order is kept."""
    if config.lang:
        language.check_code(config.lang)
    results = parallel_map(
        functools.partial(clean_sample, config=config),
        samples,
        workers=config.workers,
        description="cleaning",
        show_progress=show_progress,
    )
    report = Report(samples=[])
    seen_ids: set[str] = set()
    seen_pairs: set[tuple[str, str]] = set()
    for original, (sample, rule, detail) in zip(samples, results, strict=True):
        if rule == KEPT:
            body = [t for t in sample["conversations"] if t["from"] != SYSTEM]
            pair = (body[0]["value"], body[1]["value"])
            if sample["id"] in seen_ids:
                rule = "duplicate_id"
            elif sample.get("plugins") is not None:
                rule = "plugins"
            elif pair in seen_pairs:
                rule = "duplicate_content"
            else:
                seen_ids.add(sample["id"])
                seen_pairs.add(pair)
                report.samples.append(sample)
        report.counts[rule] += 1
        if rule != KEPT:
            report.dropped.append((str(original["id"]), rule))
        if rule == "parser_error":
            report.problems.append(Problem(repr(original["id"]), "conversations", detail))
    return report
