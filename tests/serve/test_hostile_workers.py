"""The fleet with broken workers, one test per way it used to fail: a generation that raises, an
engine stuck or a worker hung mid-answer, a stalled stream, a worker answering garbage, an
address taken over. Each is failed over or ended with an error, and never leaks a slot.

Real processes on loopback (controller, echo and tiny-Llama hf workers) and the official openai
client, except where a test must play a broken worker."""

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import SECRET, CannedWorker, chat, in_flight


def test_a_generation_that_raises_ends_its_request_and_frees_the_slot(tiny_chat_model):
    import asyncio

    from vicuna_sky.serve.backends.hf import HFBackend
    from vicuna_sky.serve.model_worker import GenerationFailed, Worker
    from vicuna_sky.serve.protocol import ChatMessage, GenerateRequest, Registration

    backend = HFBackend(str(tiny_chat_model))

    def broken(**kwargs):
        raise RuntimeError("CUDA error: an illegal memory access")

    backend.model.generate = broken
    registration = Registration(
        address="http://127.0.0.1:1", worker_id="w-12345678", models=["m"], max_concurrency=1
    )
    worker = Worker(backend, registration, "http://127.0.0.1:1")
    request = GenerateRequest(model="m", messages=[ChatMessage(role="user", content="hi")])

    async def twice() -> None:
        for _ in range(2):  # one slot: the second would wait forever if the first leaked it
            with pytest.raises(GenerationFailed, match="RuntimeError"):
                async for _ in worker.generate(request):
                    pass

    asyncio.run(asyncio.wait_for(twice(), 30))
    assert worker.in_flight == 0 and worker.healthy


def test_a_stuck_engine_reports_itself_unhealthy_and_its_requests_fail_over(fleet):
    """Row 2: a worker whose engine makes no progress still heartbeats; it says it is
    unhealthy, and the controller moves its request to another worker."""
    fleet.start_controller("--expiry-seconds", "1.5", "--first-token-timeout", "600")
    stuck = fleet.start_worker("echo", "echo", "echo", "--echo-delay", "60", "--stuck-seconds", "1")
    fleet.wait_workers({stuck})  # registered first: picked first while loads are equal
    healthy = fleet.start_worker("echo", "echo", "echo")
    fleet.wait_workers({stuck, healthy})
    client = fleet.client()
    started = time.monotonic()
    answer = chat(client, "echo", max_tokens=3)
    assert answer.choices[0].message.content == "echo: hello there"
    assert time.monotonic() - started < 20  # not the 60 s a word the stuck worker would take
    # It did have the request, and let it go when the controller gave up on it.
    metrics = httpx.get(f"{fleet.url}/metrics", headers={"Authorization": f"Bearer {SECRET}"})
    failed = {"model_name": "echo", "worker": stuck, "status": "failed"}
    assert [
        sample.value
        for family in text_string_to_metric_families(metrics.text)
        for sample in family.samples
        if sample.name == "vicuna_sky:worker_requests_total" and sample.labels == failed
    ] == [1.0]
    # Only its report moved the request (heartbeats go on, the first-token timeout is 600 s).
    # The controller then hung up on it, which ended the stuck generation: with nothing stuck
    # any more the worker says it is healthy again and is back in rotation.
    deadline = time.monotonic() + 10
    while fleet.available() != {stuck, healthy} and time.monotonic() < deadline:
        time.sleep(0.1)
    assert in_flight(stuck) == 0 and fleet.available() == {stuck, healthy}


def test_a_hung_worker_under_load_fails_no_request(own_tiny_fleet):
    """Row 5: SIGSTOP (hung, not dead) one of two workers in the middle of 40 requests."""
    a = next(iter(own_tiny_fleet.workers))
    client = own_tiny_fleet.client()
    stopped = threading.Event()

    def ask(i: int) -> str:
        if i == 8:
            own_tiny_fleet.workers[a].signal(signal.SIGSTOP)
            stopped.set()
        r = chat(client, messages=[{"role": "user", "content": f"q {i}"}], temperature=0)
        return r.choices[0].message.content

    try:
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(ask, range(40)))
    finally:
        own_tiny_fleet.workers[a].signal(signal.SIGCONT)
    assert stopped.is_set() and len(answers) == 40 and all(x is not None for x in answers)


def test_a_stalled_stream_continues_elsewhere_or_ends_with_an_error(fleet):
    """Row 5: SIGSTOP the worker of a stream mid-answer."""
    fleet.start_controller("--expiry-seconds", "1", "--inter-token-timeout", "5")
    a = fleet.start_worker("echo", "echo", "echo", "--echo-delay", "0.05")
    fleet.wait_workers({a})
    b = fleet.start_worker("echo", "echo", "echo", "--echo-delay", "0.05")
    fleet.wait_workers({a, b})
    words = " ".join(f"w{i}" for i in range(40))
    client = fleet.client()

    def stream_stopping_its_worker() -> tuple[str, float]:
        text, started, stopped = "", time.monotonic(), None
        stream = chat(
            client, "echo", messages=[{"role": "user", "content": words}], max_tokens=100,
            stream=True,
        )  # fmt: skip
        for chunk in stream:
            text += chunk.choices[0].delta.content or "" if chunk.choices else ""
            if stopped is None and len(text.split()) >= 5:
                busy = [x for x in fleet.workers if in_flight(x)]
                stopped = busy[0]
                fleet.workers[stopped].signal(signal.SIGSTOP)
        return text, time.monotonic() - started

    text, took = stream_stopping_its_worker()
    assert text == f"echo: {words}" and took < 30
    for proc in fleet.workers.values():
        proc.signal(signal.SIGCONT)
    # Only one worker: the client hears an error within the timeout, never a clean short end.
    for address, proc in list(fleet.workers.items())[1:]:
        proc.stop()
        fleet.workers.pop(address)
    fleet.wait_workers(set(fleet.workers))
    started = time.monotonic()
    with pytest.raises(openai.APIError, match="no other worker"):
        stream_stopping_its_worker()
    assert time.monotonic() - started < 30


def test_the_registry_keeps_each_address_to_its_worker(fleet):
    """Row 6: no take-over of a live worker's address, validated addresses, a bounded registry,
    and workers long silent are removed."""
    fleet.start_controller("--max-workers", "2", "--forget-seconds", "3", "--expiry-seconds", "1")
    a = fleet.start_worker("echo", "echo", "echo")
    fleet.wait_workers({a})
    secret = {"Authorization": f"Bearer {SECRET}"}

    def register(address: str, models: list[str], worker_id: str = "intruder-0001") -> int:
        body = {"address": address, "worker_id": worker_id, "models": models, "max_concurrency": 1}
        return httpx.post(f"{fleet.url}/workers/register", json=body, headers=secret).status_code

    assert register(a, ["other-model"]) == 409
    assert [m.id for m in fleet.client().models.list().data] == ["echo"]
    r = httpx.post(
        f"{fleet.url}/workers/drain", json={"address": a, "worker_id": "intruder-0001"},
        headers=secret,
    )  # fmt: skip
    assert r.status_code == 404 and a in fleet.available()
    for bad in ("ftp://x:1", "http://x", "http://u:p@x:1", "http://x:1/path", "not a url"):
        assert register(bad, ["m"]) == 400, bad
    assert register("http://127.0.0.1:9", ["m"]) == 200  # the second and last place
    assert register("http://127.0.0.1:10", ["m"]) == 429
    # A dead worker is forgotten, and its place taken by anyone.
    fleet.workers[a].stop()
    deadline = time.monotonic() + 20
    while a in {w["address"] for w in fleet.worker_states()} and time.monotonic() < deadline:
        time.sleep(0.2)
    assert a not in {w["address"] for w in fleet.worker_states()}
    assert register(a, ["other-model"], "newcomer-01") == 200


def test_out_of_range_numbers_are_400_and_a_garbled_worker_is_failed_over(fleet):
    """Row 7."""
    # A long expiry: the garbled worker never heartbeats, only its answers can fail it.
    fleet.start_controller("--expiry-seconds", "60")
    garbage = b'{"finish_reason": 7, "text": ["not", "text"]}'
    # Registered first, so picked first while loads are equal.
    with CannedWorker(fleet, 200, garbage, "garbled-01") as garbled:
        good = fleet.start_worker("echo", "echo", "echo")
        fleet.wait_workers({good})
        client = fleet.client()
        for field, value in (("max_tokens", 2**70), ("seed", 2**80), ("temperature", 3)):
            with pytest.raises(openai.BadRequestError, match=field):
                chat(client, "echo", extra_body={field: value})
        answers = [chat(client, "echo").choices[0].message.content for _ in range(4)]
    assert answers == ["echo: hello there"] * 4
    states = {w["address"]: w for w in fleet.worker_states()}
    assert states[garbled.address]["failed"] and states[good]["available"]


def test_no_done_after_an_error_and_usage_counts_generated_tokens(fleet, tiny_chat_model):
    """Row 11."""
    fleet.start_controller()
    worker = fleet.start_worker("hf", str(tiny_chat_model), "tiny")
    fleet.wait_workers({worker})
    client = fleet.client()
    answer = chat(client, max_tokens=20, temperature=0)
    if answer.choices[0].finish_reason == "length":
        assert answer.usage.completion_tokens == 20  # not 21 with a BOS counted
    else:
        assert answer.usage.completion_tokens < 20
    # The only worker killed mid-stream: the error event is the stream's last line.
    echo = fleet.start_worker("echo", "echo", "echo", "--echo-delay", "0.05")
    fleet.wait_workers({echo})
    lines: list[str] = []
    body = {"model": "echo", "stream": True, "max_tokens": 100}
    body["messages"] = [{"role": "user", "content": " ".join(f"w{i}" for i in range(60))}]
    with httpx.stream("POST", f"{fleet.url}/v1/chat/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line:
                lines.append(line)
            if len(lines) == 5:
                fleet.workers[echo].stop()
    assert '"error"' in lines[-1] and all("[DONE]" not in x for x in lines)
