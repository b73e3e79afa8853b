"""`echo`: a fixed answer at once, for routing benchmarks and failover tests only."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from vicuna_sky.serve.protocol import ApiError, GenerateRequest


class EchoBackend:
    """Answers "echo: <last user message>" in word deltas, instantly."""

    context_length = 1_000_000
    delay = 0.0
    """Seconds per word; 0 for benchmarks, a little for tests that kill a worker mid-answer."""

    async def generate(self, request: GenerateRequest) -> AsyncIterator[str]:
        if request.guided_choice:
            raise ApiError(400, "guided_choice needs a model: the echo backend has none")
        last = (request.messages or [])[-1].content if request.messages else request.prompt or ""
        # One delta per word ("echo:", " w1", " w2", ...); a continuation starts after the prefix.
        words = f"echo: {last}".split(" ")
        deltas = [words[0], *(" " + w for w in words[1:])]
        if request.prefix:
            sent = ""
            while deltas and request.prefix.startswith(sent + deltas[0]):
                sent += deltas.pop(0)
        for delta in deltas[: request.max_tokens]:
            if self.delay:
                await asyncio.sleep(self.delay)
            yield delta

    def count_tokens(self, text: str, special: bool = True) -> int:
        return len(text.split())

    async def embed(self, texts: list[str]) -> list[list[float]]:
        return [[float(len(t)), float(sum(map(ord, t)) % 997)] for t in texts]
