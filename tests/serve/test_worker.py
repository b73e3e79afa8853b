"""The worker's concurrency limit cannot leak, whatever the backend does."""

import asyncio

import pytest

from vicuna_sky.serve.protocol import GenerateRequest, Registration
from vicuna_sky.serve.worker import GenerationFailed, Worker


class Raising:
    context_length = 100

    async def generate(self, request):
        yield "partial"
        raise RuntimeError("the backend broke")

    def count_tokens(self, text):
        return 1


def test_a_raising_backend_never_leaks_a_slot():
    reg = Registration(
        address="http://127.0.0.1:1", worker_id="w-12345678", models=["m"], max_concurrency=2
    )
    worker = Worker(Raising(), reg, "http://127.0.0.1:1")

    async def once() -> None:
        with pytest.raises(GenerationFailed, match="RuntimeError"):
            async for _ in worker.generate(GenerateRequest(model="m", prompt="x")):
                pass

    async def run() -> None:
        for _ in range(10):
            await once()
        assert worker.in_flight == 0
        # Both slots are free: two acquisitions succeed at once.
        await asyncio.wait_for(asyncio.gather(worker.slots.acquire(), worker.slots.acquire()), 1)

    asyncio.run(run())


def test_hf_generation_stops_when_its_reader_goes_away(tiny_chat_model):
    from vicuna_sky.serve.backends.hf import HFBackend
    from vicuna_sky.serve.protocol import ChatMessage

    backend = HFBackend(str(tiny_chat_model))
    backend.model.generation_config.eos_token_id = None  # it would run all 900 tokens (~1.6 s)
    request = GenerateRequest(
        model="m", messages=[ChatMessage(role="user", content="hi")], max_tokens=900, temperature=0
    )

    async def read_a_little() -> None:
        stream = backend.generate(request)
        async for _ in stream:
            break
        await stream.aclose()  # what a disconnected client amounts to

    asyncio.run(read_a_little())
    backend.last_thread.join(timeout=0.5)
    assert not backend.last_thread.is_alive()
