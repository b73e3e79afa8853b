"""The worker: its concurrency limit cannot leak, whatever the backend does; a draining worker
takes no new work."""

import asyncio
import sys
import threading
import time

import httpx
import pytest

from vicuna_sky.localcloud.metadata_server import MetadataServer
from vicuna_sky.serve.model_worker import GenerationFailed, Worker
from vicuna_sky.serve.protocol import GenerateRequest, Registration

from .conftest import SECRET


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


def test_a_draining_worker_refuses_new_work_while_it_finishes_its_answer(fleet):
    """Issue #30 row 4: a preemption notice starts a drain while an answer is in flight (an
    echo worker, 0.1 s a word: 5 s of answer); a `/generate` sent to the worker directly (not
    through the controller, which already routes around it) is 503, and the answer in flight
    still ends whole."""
    fleet.start_controller()
    words = " ".join(f"w{i}" for i in range(50))
    answers: list[str] = []
    with MetadataServer() as metadata:
        env = metadata.env("aws") | {"VICUNA_SKY_NOTICE_POLL_SECONDS": "0.02"}
        worker = fleet.start_worker("echo", "echo", "echo", "--echo-delay", "0.1", env=env)
        fleet.wait_workers({worker})

        def ask() -> None:
            r = fleet.client().chat.completions.create(
                model="echo", messages=[{"role": "user", "content": words}], max_tokens=200
            )
            answers.append(r.choices[0].message.content)

        asking = threading.Thread(target=ask, daemon=True)
        asking.start()

        def health() -> dict:
            # The state shows only with the fleet secret.
            headers = {"Authorization": f"Bearer {SECRET}"}
            return httpx.get(f"{worker}/health", timeout=5, headers=headers).json()

        deadline = time.monotonic() + 30
        while not health()["in_flight"] and time.monotonic() < deadline:
            time.sleep(0.01)
        metadata.notice()
        while not health()["draining"] and time.monotonic() < deadline:
            time.sleep(0.01)
        state = health()
        assert state["draining"] and state["in_flight"] == 1, state
        r = httpx.post(
            f"{worker}/generate",
            json={"model": "echo", "prompt": "new work", "stream": False},
            headers={"Authorization": f"Bearer {SECRET}"},
            timeout=30,
        )
        assert r.status_code == 503, r.text
        assert health()["in_flight"] == 1  # the answer is still going: the 503 came during it
        asking.join(60)
    assert answers == [f"echo: {words}"]
    assert fleet.workers[worker].proc.wait(30) == 0


def test_a_keyless_worker_answers_this_machine_only_and_raises_its_descriptor_limit(
    fleet, tmp_path
):
    """A worker without a fleet secret (loopback only) refuses a request naming another host,
    as a keyless controller does (a web page rebinding its DNS to 127.0.0.1); with a secret, the
    secret decides. Started with 512 descriptors, it raises them to its budget: every
    connection it may keep, and room for its files and the hop."""
    from vicuna_sky.serve.http_server import MAX_CONNECTIONS

    low = tmp_path / "python-with-512-files"
    low.write_text(f'#!/bin/sh\nulimit -Sn 512\nexec "{sys.executable}" "$@"\n')
    low.chmod(0o755)
    keyless = fleet.start_worker("echo", "echo", "echo", secret="", python=str(low))
    keyed = fleet.start_worker("echo", "echo", "echo")
    for address in (keyless, keyed):
        fleet.wait_http(f"{address}/health", proc=fleet.workers[address])
    body = {"model": "echo", "prompt": "hi", "max_tokens": 2}
    foreign = {"Host": "attacker.example"}
    r = httpx.post(f"{keyless}/generate", json=body, headers=foreign)
    assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed"
    assert httpx.post(f"{keyless}/generate", json=body).status_code == 200
    r = httpx.post(
        f"{keyed}/generate", json=body, headers=foreign | {"Authorization": f"Bearer {SECRET}"}
    )
    assert r.status_code == 200, r.text
    log = fleet.workers[keyless].log.read_text()
    assert f"open files: {MAX_CONNECTIONS + 256} (raised from 512)" in log
