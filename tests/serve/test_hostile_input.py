"""The fleet under hostile or broken input, one test per way it used to fail: no request takes a
model down or gets a 500, and no unauthenticated path reaches a model or the registry (broken
workers: test_hostile_workers.py).

Real processes on loopback (controller, echo and tiny-Llama hf workers) and the official openai
client, except where a test must send what no client library would."""

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from vicuna_sky.serve.auth import FLEET_SECRET_ENV

from .conftest import SECRET, chat, in_flight

JSON = {"Content-Type": "application/json"}


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


def test_made_up_model_names_leave_no_trace_and_are_bounded(fleet):
    """Each request for a model nobody serves made a metric child, never freed: 200 requests
    with 1 MiB names took the controller's memory from 182 to 382 MB and /metrics to 200 MiB.
    Metrics name served models only, and a name is as long as a worker may register."""
    from prometheus_client.parser import text_string_to_metric_families

    fleet.start_controller()
    fleet.wait_workers({fleet.start_worker("echo", "echo", "echo")})
    client = fleet.client()
    for n in range(20):
        with pytest.raises(openai.NotFoundError):
            chat(client, model=f"made-up-{n}")
        with pytest.raises(openai.NotFoundError):
            list(chat(client, model=f"made-up-streamed-{n}", stream=True))
    with pytest.raises(openai.BadRequestError, match="model"):
        chat(client, model="m" * 201)
    with pytest.raises(openai.BadRequestError, match="model"):
        client.embeddings.create(model="m" * 2**20, input="x")
    chat(client, model="echo")
    text = httpx.get(f"{fleet.url}/metrics", headers={"Authorization": f"Bearer {SECRET}"}).text
    names = {
        s.labels["model_name"]
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if "model_name" in s.labels
    }
    assert names == {"echo"}


def test_schemas_without_a_finite_answer_and_token_ids_that_are_not_integers_are_400(tiny_fleet):
    """`{"$ref": "#"}` compiled and answered "" with finish_reason stop; a two-step loop the
    same; `[true, false]` and `[1.0, 2.0]` were taken as token ids."""
    client = tiny_fleet.client()
    for schema in (
        {"$ref": "#"},
        {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
        {"type": "object", "properties": {"child": {"$ref": "#"}}},
        {"$ref": "https://example.com/schema.json"},
        {"$ref": "#/$defs/missing"},
    ):
        shaped = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
        with pytest.raises(openai.BadRequestError, match=r"\$ref|recursive"):
            chat(client, response_format=shaped)
    tool = {"type": "function", "function": {"name": "f", "parameters": {"$ref": "#"}}}
    with pytest.raises(openai.BadRequestError, match="recursive"):
        chat(client, tools=[tool], tool_choice="required")
    defs = {
        "type": "object",
        "properties": {"n": {"$ref": "#/$defs/N"}, "m": {"$ref": "#/$defs/N"}},
        "required": ["n", "m"],
        "additionalProperties": False,
        "$defs": {"N": {"type": "integer", "minimum": 0, "maximum": 9}},
    }
    shaped = {"type": "json_schema", "json_schema": {"name": "x", "schema": defs}}
    answer = json.loads(
        chat(client, response_format=shaped, max_tokens=40).choices[0].message.content
    )
    assert isinstance(answer["n"], int) and isinstance(answer["m"], int)  # shared, not looped
    for prompt in ([True, False], [1.0, 2.0], [[1, 2], [True]]):
        with pytest.raises(openai.BadRequestError, match="prompt"):
            client.completions.create(model="tiny", prompt=prompt, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="input"):
        client.embeddings.create(model="tiny", input=[[1.0, 2.0]])
    assert client.completions.create(model="tiny", prompt=[1, 2], max_tokens=2).choices
