"""The worker's concurrency limit cannot leak, whatever the backend does."""

import asyncio

import pytest

from vicuna_sky.serve.protocol import GenerateRequest, Registration
from vicuna_sky.serve.worker import Worker


class Raising:
    context_length = 100

    async def generate(self, request):
        yield "partial"
        raise RuntimeError("the backend broke")

    def count_tokens(self, text):
        return 1


def test_a_raising_backend_never_leaks_a_slot():
    reg = Registration(address="http://127.0.0.1:1", models=["m"], max_concurrency=2)
    worker = Worker(Raising(), reg, "http://127.0.0.1:1")

    async def once() -> None:
        with pytest.raises(RuntimeError):
            async for _ in worker.generate(GenerateRequest(model="m", prompt="x")):
                pass

    async def run() -> None:
        for _ in range(10):
            await once()
        assert worker.in_flight == 0
        # Both slots are free: two acquisitions succeed at once.
        await asyncio.wait_for(asyncio.gather(worker.slots.acquire(), worker.slots.acquire()), 1)

    asyncio.run(run())
