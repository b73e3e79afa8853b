"""The fleet with the official `openai` client: API surface, errors, failover, restart, drain."""

import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from .conftest import in_flight, with_two_hf_workers


def two_hf_workers(fleet, model):
    """Two tiny-Llama workers serving `vicuna-tiny`, the first one also as `tiny`."""
    also_tiny = ("--model-name", "tiny")
    return with_two_hf_workers(fleet, model, first_args=also_tiny, name="vicuna-tiny")


@pytest.fixture(scope="module")
def hf_fleet(module_fleet, tiny_chat_model):
    return two_hf_workers(module_fleet, tiny_chat_model)


@pytest.fixture
def own_hf_fleet(fleet, tiny_chat_model):
    return two_hf_workers(fleet, tiny_chat_model)


def test_openai_client_against_two_hf_workers(hf_fleet):
    client = hf_fleet.client()
    assert {m.id for m in client.models.list().data} == {"vicuna-tiny", "tiny"}
    chat = client.chat.completions.create(
        model="vicuna-tiny",
        messages=[{"role": "user", "content": "Hello!"}],
        max_tokens=8,
        temperature=0,
    )
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens > 0 and chat.choices[0].finish_reason in ("stop", "length")
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Hello!"}],
        max_tokens=8,
        temperature=0,
        stream=True,
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in stream)
    assert streamed == chat.choices[0].message.content  # greedy: same answer, streamed
    text = client.completions.create(model="tiny", prompt="Once upon", max_tokens=5, temperature=0)
    assert text.object == "text_completion" and text.choices[0].text
    emb = client.embeddings.create(model="tiny", input=["a cat", "a dog"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == 128


def test_errors_are_openai_shaped_4xx(hf_fleet):
    client = hf_fleet.client()
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="tiny", messages=[])
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(
            model="tiny", temperature=7, messages=[{"role": "user", "content": "x"}]
        )
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model="tiny", prompt="word " * 2000, max_tokens=10)
    r = httpx.post(
        f"{hf_fleet.url}/v1/chat/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and "error" in r.json()


def test_wrong_registration_secret_is_rejected(fleet):
    fleet.start_controller()
    r = httpx.post(
        f"{fleet.url}/workers/register",
        json={
            "address": "http://127.0.0.1:1",
            "worker_id": "a-worker-id",
            "models": ["m"],
            "max_concurrency": 1,
        },
        headers={"Authorization": "Bearer wrong"},
    )
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    good = fleet.start_worker("echo", "echo", "echo")
    bad = fleet.start_worker("echo", "echo", "sneaky", secret="wrong")
    fleet.wait_workers({good})
    time.sleep(1.5)
    assert bad not in fleet.available()
    assert {m.id for m in fleet.client().models.list().data} == {"echo"}


def test_api_keys(fleet):
    fleet.start_controller(env={"VICUNA_SKY_API_KEYS": "k1"})
    fleet.wait_workers({fleet.start_worker("echo", "echo", "echo")})
    with pytest.raises(openai.AuthenticationError):
        fleet.client(api_key="wrong").models.list()
    assert fleet.client(api_key="k1").models.list().data


def ask(client, i: int) -> str:
    r = client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": f"question {i}"}]
    )
    return r.choices[0].message.content


def ask_model(client, i: int, max_tokens: int = 8) -> str:
    """A greedy answer of the tiny hf model: the same from every worker, so a reference."""
    r = client.chat.completions.create(
        model="vicuna-tiny",
        messages=[{"role": "user", "content": f"question {i}"}],
        max_tokens=max_tokens,
        temperature=0,
    )
    return r.choices[0].message.content


def when_busy(fleet, address: str, then) -> threading.Thread:
    """Call `then()` as soon as the worker at `address` has a request in flight."""

    def watch() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if in_flight(address):
                then()
                return
            time.sleep(0.01)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_killing_a_worker_under_load_fails_no_request(own_hf_fleet):
    a, b = list(own_hf_fleet.workers)
    client = own_hf_fleet.client()
    expected = [ask_model(client, i) for i in range(24)]
    assert len(set(expected)) > 1  # answers that differ: a mix-up between requests would show
    watcher = when_busy(own_hf_fleet, a, own_hf_fleet.workers[a].stop)  # killed in the middle of it
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda i: ask_model(client, i), range(24)))
    watcher.join(5)
    assert own_hf_fleet.workers[a].proc.poll() is not None, "the worker was never killed"
    assert answers == expected
    assert own_hf_fleet.available() == {b}


def test_a_failed_worker_leaves_rotation_at_once(fleet):
    """Expiry is a minute here: only the controller marking the dead worker failed, on the
    first request that finds it gone, can take it out of rotation within the test."""
    fleet.start_controller("--expiry-seconds", "60")
    a = fleet.start_worker("echo", "echo", "echo")
    fleet.wait_workers({a})  # registered first: the first one picked while loads are equal
    b = fleet.start_worker("echo", "echo", "echo")
    fleet.wait_workers({a, b})
    fleet.workers[a].stop()
    client = fleet.client()
    assert [ask(client, i) for i in range(3)] == [f"echo: question {i}" for i in range(3)]
    workers = {w["address"]: w for w in fleet.worker_states()}
    assert workers[a]["failed"] and not workers[a]["available"]
    assert workers[b]["available"]


def stream_killing_its_worker(fleet, words: str, **kw):
    """Stream an echo of `words`; after 10 words the worker streaming it dies. Returns the text
    the client received and the last chunk."""
    stream = fleet.client().chat.completions.create(
        model="echo", messages=[{"role": "user", "content": words}], stream=True, **kw
    )
    received, killed, last = "", False, None
    for chunk in stream:
        received += chunk.choices[0].delta.content or ""
        last = chunk
        if not killed and len(received.split()) > 10:
            alive = [w for w, p in fleet.workers.items() if p.proc.poll() is None]
            busy = [w for w in alive if in_flight(w)]
            fleet.workers[busy[0]].stop()
            killed = True
    assert killed
    return received, last


def test_a_stream_continues_on_another_worker_when_its_worker_dies(fleet):
    fleet.start_controller()
    a = fleet.start_worker("echo", "echo", "echo", "--echo-delay", "0.05")
    fleet.wait_workers({a})
    b = fleet.start_worker("echo", "echo", "echo", "--echo-delay", "0.05")
    fleet.wait_workers({a, b})
    words = " ".join(f"w{i}" for i in range(40))
    received, _ = stream_killing_its_worker(fleet, words)
    assert received == f"echo: {words}"  # one unbroken answer

    # A continuation only has what is left of max_tokens, and usage counts both workers.
    fleet.wait_workers({fleet.start_worker("echo", "echo", "echo", "--echo-delay", "0.05")})
    received, last = stream_killing_its_worker(fleet, words, max_tokens=20)
    assert received == " ".join(f"echo: {words}".split()[:20])
    assert last.choices[0].finish_reason == "length" and last.usage.completion_tokens == 20


def test_the_only_worker_dying_mid_stream_is_an_error_to_the_client(fleet):
    """No other worker can continue the answer: the client must hear it as an error, never as
    a clean end of a shorter answer."""
    fleet.start_controller()
    fleet.wait_workers({fleet.start_worker("echo", "echo", "echo", "--echo-delay", "0.05")})
    words = " ".join(f"w{i}" for i in range(40))
    with pytest.raises(openai.APIError, match="no other worker could continue"):
        stream_killing_its_worker(fleet, words)


def test_controller_restart_routes_from_its_registry(fleet, tiny_chat_model):
    """The worker heartbeats once in ten minutes and the registry keeps it for a minute, so
    after the restart only the controller's SQLite registry can know the worker."""
    fleet.start_controller("--expiry-seconds", "60")
    model = str(tiny_chat_model)
    fleet.wait_workers(
        {fleet.start_worker("hf", model, "vicuna-tiny", "--heartbeat-seconds", "600")}
    )
    client = fleet.client()
    before = ask_model(client, 1)
    fleet.controller.stop()
    fleet.controller.start()
    fleet.wait_http(f"{fleet.url}/workers")
    assert ask_model(client, 1) == before  # the first request after the restart is served


def drain_with_work_in_flight(fleet, model: str, tell, reason: str, env=None) -> None:
    """The worker is alone when told to go, with an answer in flight: had it dropped the
    answer, no other worker could have given it. It must finish it, leave rotation and exit
    0; the next request goes to a worker started after."""
    a = fleet.start_worker("hf", model, "vicuna-tiny", env=env)
    fleet.wait_workers({a})
    client = fleet.client()
    # Long answers (400 tokens, about half a second): the signal finds this one in flight.
    expected = {i: ask_model(client, i, max_tokens=400) for i in (0, 1)}
    # The worker may count an answer a moment after the client has it: start from idle, so
    # the watcher sees the next request, not the tail of the last one.
    deadline = time.monotonic() + 30
    while in_flight(a) and time.monotonic() < deadline:
        time.sleep(0.01)
    watcher = when_busy(fleet, a, lambda: tell(a))
    assert ask_model(client, 0, 400) == expected[0]
    watcher.join(60)
    assert fleet.workers[a].proc.wait(30) == 0  # it exits on its own after draining
    log = fleet.workers[a].log.read_text()
    drained = re.search(rf"draining \({reason}\): (\d+) request", log)
    assert drained and int(drained[1]) == 1, log[-2000:]
    assert a not in fleet.available()
    b = fleet.start_worker("hf", model, "vicuna-tiny")
    fleet.wait_workers({b})
    assert ask_model(client, 1, 400) == expected[1]


def test_sigterm_drains_a_worker(fleet, tiny_chat_model):
    fleet.start_controller()
    tell = lambda a: fleet.workers[a].signal(signal.SIGTERM)  # noqa: E731
    drain_with_work_in_flight(fleet, str(tiny_chat_model), tell, "SIGTERM")


def test_a_preemption_notice_drains_a_worker(fleet, tiny_chat_model):
    from vicuna_sky.localcloud.metadata_server import MetadataServer

    fleet.start_controller()
    with MetadataServer() as metadata:
        env = metadata.env("aws") | {"VICUNA_SKY_NOTICE_POLL_SECONDS": "0.02"}
        tell = lambda _a: metadata.notice()  # noqa: E731
        drain_with_work_in_flight(
            fleet, str(tiny_chat_model), tell, "aws preemption notice", env=env
        )


def test_finish_reason_says_why_the_answer_ended(hf_fleet):
    client = hf_fleet.client()
    ask = {"model": "tiny", "prompt": "Hello, my name is", "temperature": 0}
    full = client.completions.create(max_tokens=24, **ask).choices[0]
    # The random tiny model never says EOS this early: it runs into max_tokens.
    assert full.finish_reason == "length" and len(full.text) > 12
    stop = full.text[6:10]
    cut = client.completions.create(max_tokens=24, stop=[stop], **ask).choices[0]
    assert cut.finish_reason == "stop" and stop not in cut.text and len(cut.text) < len(full.text)
