"""`echo`: a fixed answer at once, for routing benchmarks and failover tests only."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

from vicuna_sky.serve.protocol import ApiError, GenerateRequest


class EchoBackend:
    """Answers "echo: <last user message>" in word deltas, instantly."""

    context_length = 1_000_000
    delay = 0.0
    """Seconds per word; 0 for benchmarks, a little for tests that kill a worker mid-answer."""
    instant_counts = True
    """Its token counts are word counts: the worker need not count in a thread."""

    async def generate(self, request: GenerateRequest) -> AsyncIterator[str]:
        if request.guided_choice or request.json_schema is not None:
            raise ApiError(400, "guided_choice and structured output need a model: echo has none")
        if request.messages:
            last = request.messages[-1].content or ""
        elif isinstance(request.prompt, list):
            last = " ".join(map(str, request.prompt))
        else:
            last = request.prompt or ""
        # One delta per word ("echo:", " w1", " w2", ...); a continuation starts after the prefix.
        # Made as they are sent: a list of max_tokens deltas (millions, with ignore_eos) would
        # hold the event loop, heartbeats included, for seconds before the first one.
        words = f"echo: {last}".split(" ")
        answer = [words[0], *(" " + w for w in words[1:])]
        limit = request.max_tokens
        repeat = request.ignore_eos and limit  # the answer again and again, up to max_tokens
        deltas = itertools.islice(itertools.cycle(answer), limit) if repeat else iter(answer)
        sent, skipping, count = "", bool(request.prefix), 0
        for delta in deltas:
            if skipping and request.prefix.startswith(sent + delta):
                sent += delta
                continue
            skipping = False
            if limit is not None and count >= limit:
                return
            # Yield to the event loop now and then even with no delay: a huge answer must not
            # starve heartbeats, disconnects and signal handlers.
            if self.delay:
                await asyncio.sleep(self.delay)
            elif count % 64 == 63:
                await asyncio.sleep(0)
            count += 1
            yield delta

    def count_tokens(self, text: str, special: bool = True) -> int:
        return len(text.split())

    async def embed(self, texts: list[str | list[int]]) -> list[list[float]]:
        return [
            [float(len(t)), float(sum(map(ord, t)) % 997 if isinstance(t, str) else sum(t) % 997)]
            for t in texts
        ]
