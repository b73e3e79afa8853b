"""The fleet under hostile or broken input, one test per way it used to fail: no request takes a
model down, no unauthenticated path reaches a model, hung workers are failed over.

Real processes on loopback (controller, echo and tiny-Llama hf workers) and the official openai
client, except where a test must send what no client library would."""

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from vicuna_sky.serve.auth import FLEET_SECRET_ENV

from .conftest import SECRET, in_flight, with_two_hf_workers

QUESTION = [{"role": "user", "content": "hello there"}]
JSON = {"Content-Type": "application/json"}


def chat(client, model: str = "tiny", **kw):
    kw.setdefault("messages", QUESTION)
    kw.setdefault("max_tokens", 8)
    return client.chat.completions.create(model=model, **kw)


def two_tiny_workers(fleet, model):
    # Expiry 4 s: a loaded 2-core machine still heartbeats within it, and a worker blocked by
    # a long prompt on its event loop (about 30 s for the 6 MB one below) misses it for sure.
    return with_two_hf_workers(fleet, model, controller_args=("--expiry-seconds", "4"))


@pytest.fixture(scope="module")
def tiny_fleet(module_fleet, tiny_chat_model):
    return two_tiny_workers(module_fleet, tiny_chat_model)


@pytest.fixture
def own_tiny_fleet(fleet, tiny_chat_model):
    return two_tiny_workers(fleet, tiny_chat_model)


def test_roles_out_of_order_are_the_clients_error_and_take_no_worker_down(tiny_fleet):
    """Row 1: each such request used to take a worker out of rotation, then the next."""
    client = tiny_fleet.client()
    bad = [
        [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}],
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
    ]
    for messages in bad * 3:
        with pytest.raises(openai.BadRequestError, match="roles alternate"):
            chat(client, messages=messages)
    assert tiny_fleet.available() == set(tiny_fleet.workers)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert chat(client).choices[0].message.content is not None
    # A worker asked directly says the same, and stays healthy.
    worker = next(iter(tiny_fleet.workers))
    r = httpx.post(
        f"{worker}/generate",
        json={"model": "tiny", "messages": bad[1], "stream": False},
        headers={"Authorization": f"Bearer {SECRET}"},
    )
    assert r.status_code == 400 and "expected 'assistant'" in r.json()["error"]["message"]


def test_a_tiny_temperature_decodes_greedily_and_wedges_nothing(tiny_fleet):
    """Row 2: temperature 1e-300 overflowed the sampler inside the generation thread; the
    request never ended and its slot was lost. Five of them, more than a worker's 4 slots."""
    client = tiny_fleet.client()
    greedy = chat(client, temperature=0).choices[0].message.content
    with ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(lambda _: chat(client, temperature=1e-300), range(10)))
    assert {a.choices[0].message.content for a in answers} == {greedy}
    for worker in tiny_fleet.workers:
        assert in_flight(worker) == 0


def test_a_generation_that_raises_ends_its_request_and_frees_the_slot(tiny_chat_model):
    import asyncio

    from vicuna_sky.serve.backends.hf import HFBackend
    from vicuna_sky.serve.protocol import ChatMessage, GenerateRequest, Registration
    from vicuna_sky.serve.worker import GenerationFailed, Worker

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


def test_no_path_to_a_model_or_the_registry_without_credentials(fleet):
    """Rows 3 and 12: the workers' model routes, the worker list and the schema."""
    fleet.start_controller(env={"VICUNA_SKY_API_KEYS": "client-key"})
    # The readiness probe is open: it reaches no model.
    assert httpx.get(f"{fleet.url}/ready").status_code == 503
    worker = fleet.start_worker("echo", "echo", "echo")
    fleet.wait_workers({worker})
    assert httpx.get(f"{fleet.url}/ready").json() == {"ready": True}
    assert httpx.get(f"{fleet.url}/v1/models").status_code == 401
    body = {"model": "echo", "prompt": "x", "stream": False}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer client-key"}):
        assert httpx.post(f"{worker}/generate", json=body, headers=headers).status_code == 403
        r = httpx.post(f"{worker}/embed", json={"input": ["x"]}, headers=headers)
        assert r.status_code == 403
        assert httpx.get(f"{fleet.url}/workers", headers=headers).status_code == 401
        assert httpx.get(f"{fleet.url}/openapi.json", headers=headers).status_code == 401
    assert httpx.get(f"{fleet.url}/docs").status_code == 404
    admin = {"Authorization": f"Bearer {SECRET}"}
    assert httpx.post(f"{worker}/generate", json=body, headers=admin).status_code == 200
    assert httpx.get(f"{fleet.url}/openapi.json", headers=admin).json()["paths"]
    # Registration without the secret learns nothing, not even what a valid body looks like.
    r = httpx.post(f"{fleet.url}/workers/register", json={"junk": 1})
    assert r.status_code == 403
    # Secrets are nowhere on the command lines (`ps` shows those to every user).
    for proc in [fleet.controller, *fleet.workers.values()]:
        cmdline = Path(f"/proc/{proc.proc.pid}/cmdline").read_bytes()
        assert SECRET.encode() not in cmdline and b"client-key" not in cmdline


@pytest.mark.parametrize("module", ["controller", "worker"])
def test_a_server_reachable_from_other_machines_needs_the_secret(module, tmp_path):
    """Row 4: bound to 0.0.0.0 without the fleet secret, they refuse to start."""
    args = ["--host", "0.0.0.0", "--port", "1"]
    if module == "worker":
        args += ["--backend", "echo", "--model-path", "echo", "--controller-url", "http://x:1"]
    env = {k: v for k, v in os.environ.items() if k != FLEET_SECRET_ENV}
    result = subprocess.run(
        [sys.executable, "-m", f"vicuna_sky.serve.{module}", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line
    assert "reachable from other machines" in result.stderr and FLEET_SECRET_ENV in result.stderr


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


class _GarbledWorker(http.server.BaseHTTPRequestHandler):
    """Answers every generation with 200 and a body that is not an answer."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = b'{"finish_reason": 7, "text": ["not", "text"]}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_out_of_range_numbers_are_400_and_a_garbled_worker_is_failed_over(fleet):
    """Row 7."""
    # A long expiry: the garbled worker never heartbeats, only its answers can fail it.
    fleet.start_controller("--expiry-seconds", "60")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _GarbledWorker)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    garbled = f"http://127.0.0.1:{server.server_port}"
    body = {"address": garbled, "worker_id": "garbled-01", "models": ["echo"], "max_concurrency": 9}
    headers = {"Authorization": f"Bearer {SECRET}"}
    # Registered first, so picked first while loads are equal.
    httpx.post(f"{fleet.url}/workers/register", json=body, headers=headers).raise_for_status()
    good = fleet.start_worker("echo", "echo", "echo")
    fleet.wait_workers({good})
    client = fleet.client()
    for field, value in (("max_tokens", 2**70), ("seed", 2**80), ("temperature", 3)):
        with pytest.raises(openai.BadRequestError, match=field):
            chat(client, "echo", extra_body={field: value})
    try:
        answers = [chat(client, "echo").choices[0].message.content for _ in range(4)]
    finally:
        server.shutdown()
    assert answers == ["echo: hello there"] * 4
    states = {w["address"]: w for w in fleet.worker_states()}
    assert states[garbled]["failed"] and states[good]["available"]


def test_a_huge_body_is_413_and_a_huge_prompt_blocks_no_heartbeat(own_tiny_fleet):
    """Row 8: 50 MB is refused before it is parsed; 6 MB of prompt is tokenized off the event
    loop, so the worker keeps heartbeating (expiry here is 4 s) while it works."""
    r = httpx.post(
        f"{own_tiny_fleet.url}/v1/chat/completions",
        content=b'{"model": "tiny", "messages": [], "pad": "' + b"x" * 50_000_000 + b'"}',
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    client = own_tiny_fleet.client()
    result: list[object] = []

    def ask_long() -> None:
        try:
            chat(client, messages=[{"role": "user", "content": "word " * 1_200_000}])
        except openai.APIStatusError as e:
            result.append(e)

    asking = threading.Thread(target=ask_long, daemon=True)
    asking.start()
    seen_down = False
    while asking.is_alive():
        seen_down |= own_tiny_fleet.available() != set(own_tiny_fleet.workers)
        time.sleep(0.2)
    assert not seen_down
    assert result and result[0].status_code == 400 and "context length" in str(result[0])


def test_openai_fields_are_honoured_or_refused_by_name(tiny_fleet):
    """Rows 9 and 10: n, content parts; logprobs and penalties refused by name (tools and
    response_format are served: tests/serve/test_clients.py)."""
    client = tiny_fleet.client()
    three = chat(client, n=3, temperature=0)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert len({c.message.content for c in three.choices}) == 1  # greedy: three equal answers
    one = chat(client, temperature=0)
    assert three.usage.completion_tokens == 3 * one.usage.completion_tokens  # all three counted
    for extra in (
        {"logprobs": True},
        {"response_format": {"type": "xml"}},
        {"frequency_penalty": 0.5},
        {"no_such_field": 1},
    ):
        name = next(iter(extra))
        with pytest.raises(openai.BadRequestError, match=name):
            chat(client, extra_body=extra)
    parts = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "there"}],
        }
    ]
    assert (
        chat(client, messages=parts, temperature=0).choices[0].message.content
        == chat(client, temperature=0).choices[0].message.content
    )
    with pytest.raises(openai.BadRequestError):
        chat(client, messages=[{"role": "user", "content": [{"type": "image_url", "x": 1}]}])


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


def test_the_controller_answers_no_request_with_a_500(fleet):
    """A hypothesis run against the controller's OpenAPI schema: bodies built from the fields
    it declares (and some it does not), with values of every JSON type. Nothing is a 5xx except
    a 503 for a model no worker serves, and the controller stays healthy."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    fleet.start_controller()
    fleet.wait_workers({fleet.start_worker("echo", "echo", "echo")})
    headers = {"Authorization": f"Bearer {SECRET}"}
    schema = httpx.get(f"{fleet.url}/openapi.json", headers=headers).json()
    fields = sorted(
        {name for s in schema["components"]["schemas"].values() for name in s.get("properties", {})}
    )
    assert {"messages", "max_tokens", "guided_choice", "prompt", "input"} <= set(fields)
    paths = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
        max_leaves=12,
    )
    message = st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system", "tool"]), "content": json_values}
    )
    values = {
        "model": st.sampled_from(["echo", "nope"]) | json_values,
        "messages": st.lists(message, max_size=4) | json_values,
        "stream": st.booleans() | json_values,
    }
    extras = st.dictionaries(
        st.sampled_from([*fields, "tools", "logprobs"]) | st.text(max_size=8),
        json_values,
        max_size=8,
    )
    anything = extras.flatmap(
        lambda extra: st.fixed_dictionaries(values).map(lambda base: {**extra, **base})
    )
    # Valid requests with a field or two changed: most are still answered (200).
    text = st.text(min_size=1, max_size=30)
    valid = st.one_of(
        text.map(
            lambda x: (paths[0], {"model": "echo", "messages": [{"role": "user", "content": x}]})
        ),
        text.map(lambda x: (paths[1], {"model": "echo", "prompt": x})),
        text.map(lambda x: (paths[2], {"model": "echo", "input": x})),
    )
    changes = st.dictionaries(st.sampled_from(fields), json_values, max_size=2)
    requests = st.tuples(st.sampled_from(paths), anything) | st.tuples(valid, changes).map(
        lambda v: (v[0][0], {**v[0][1], **v[1]})
    )
    seen: list[int] = []
    with httpx.Client(base_url=fleet.url, timeout=30) as http:

        @settings(
            max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None
        )
        @given(request=requests)
        def never_500(request: tuple[str, dict]) -> None:
            path, body = request
            r = http.post(path, content=json.dumps(body, allow_nan=True), headers=JSON)
            seen.append(r.status_code)
            if r.status_code >= 500:
                assert r.status_code == 503 and body.get("model") != "echo", (body, r.text)
                return
            if r.status_code != 200 or not body.get("stream"):
                r.json()  # a JSON body, OpenAI-shaped for errors

        never_500()
        assert http.get("/v1/models").status_code == 200
    assert len(seen) == 300 and 200 in seen and 400 in seen
